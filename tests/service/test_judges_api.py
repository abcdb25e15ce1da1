"""EGPO judges at job creation, in-process (FastAPI TestClient, real Redis): a bad judge
is a 400 naming its field, and nothing is written."""

from __future__ import annotations

import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import Qwen2ForSequenceClassification

from service.main import create_app
from service.settings import ApiSettings
from trainers.tiny_model import build_tiny_model, build_tokenizer, tiny_config

JUDGE = "method.egpo.hyperparameters.judge"
STYLES = {
    "type": "pattern_table",
    "classes": [{"name": "low", "pattern": "^[a-h]"}, {"name": "high", "pattern": "^[i-z]"}],
    "preferences": [[0.5, 0.8, 0.2], [0.2, 0.5, 0.8], [0.8, 0.2, 0.5]],
}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    """A model root with the tiny base model, a pairwise classifier and a causal LM."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / "tiny")
    tok = build_tokenizer()
    config = tiny_config(tok, hidden_size=32, num_layers=1)
    config.num_labels = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForSequenceClassification(config).save_pretrained(root / "pair")
    tok.save_pretrained(root / "pair")
    return root


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url, models_root):
    settings = ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-judges",
        model_roots=str(models_root),
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def training_file(client):
    body = "\n".join(json.dumps({"prompt": f"Say something {i}."}) for i in range(4)).encode()
    resp = client.post(
        "/v1/files", files={"file": ("p.jsonl", io.BytesIO(body))}, data={"purpose": "fine-tune"}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def create(client, training_file, judge):
    body = {
        "model": "tiny",
        "training_file": training_file,
        "method": {"type": "egpo", "egpo": {"hyperparameters": {"judge": judge}}},
    }
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_a_valid_judge_creates_the_job(client, training_file, models_root):
    for judge in (STYLES, {"type": "preference_model", "model": str(models_root / "pair")}):
        resp = create(client, training_file, judge)
        assert resp.status_code == 200, resp.text
        assert resp.json()["method"]["egpo"]["hyperparameters"]["judge"]["type"] == judge["type"]


@pytest.mark.parametrize(
    ("judge", "param", "words"),
    [
        ({"type": "oracle"}, JUDGE, "unknown judge type 'oracle'"),
        ({**STYLES, "classes": [{"name": "x", "pattern": "[a-"}], "preferences": [[0.5] * 2] * 2},
         f"{JUDGE}.classes[0].pattern", "does not compile"),
        ({**STYLES, "preferences": [[0.5, 0.8, 0.2], [0.2, 0.5, 0.8], [0.9, 0.2, 0.5]]},
         f"{JUDGE}.preferences", "must be 1"),
        ({"type": "reward_model", "model": "pair", "temperature": -1},
         f"{JUDGE}.temperature", "greater than 0"),
        ({"type": "grader", "grader": {"type": "regex", "name": "r", "pattern": "a",
                                       "input": "{{sample.nope}}"}},
         f"{JUDGE}.grader.input", "unknown sample variable"),
    ],
)  # fmt: skip
def test_bad_judges_are_400s_naming_the_field(client, training_file, judge, param, words):
    resp = create(client, training_file, judge)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param
    assert words in err["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize(
    ("kind", "model", "words"),
    [
        ("reward_model", "pair", "has 2 labels; this judge needs 1"),
        ("preference_model", "tiny", "not a sequence-classification model"),
        ("preference_model", "no/such/model", ""),
    ],
)
def test_a_judge_model_that_does_not_load_is_a_400(client, training_file, kind, model, words):
    resp = create(client, training_file, {"type": kind, "model": model})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == f"{JUDGE}.model"
    assert words in err["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_grader_judge_reading_a_missing_row_field_is_a_400(client, training_file):
    grader = {"type": "string_check", "name": "right", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "ilike"}  # fmt: skip
    resp = create(client, training_file, {"type": "grader", "grader": grader})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "training_file" and "item.answer" in err["message"]

    rows = "\n".join(json.dumps({"prompt": f"{i}+{i}?", "answer": str(2 * i)}) for i in range(3))
    upload = client.post(
        "/v1/files",
        files={"file": ("qa.jsonl", io.BytesIO(rows.encode()))},
        data={"purpose": "fine-tune"},
    )
    resp = create(client, upload.json()["id"], {"type": "grader", "grader": grader})
    assert resp.status_code == 200, resp.text
