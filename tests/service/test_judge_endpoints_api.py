"""Remote judges at job creation: a ``score_model`` or ``label_model`` whose model one of
the server's judge endpoints (``POSTTRAIN_JUDGE_ENDPOINTS``) serves is accepted in a grpo
job (a multi grader's too) and by ``/graders/validate``, and keeps its name as written
(the training process asks the endpoint for it; nothing is resolved on the host); any
other model follows the present rules, with 400s naming the field. The in-process API,
its Redis and data directory are real; the endpoint is never called at creation."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings

ENDPOINTS = {
    "own": {
        "base_url": "http://127.0.0.1:9/v1",
        "api_key_env": "POSTTRAIN_TEST_JUDGE_KEY",
        "models": ["judge-chat"],
    }
}
SCORE = {
    "type": "score_model",
    "name": "rating",
    "model": "judge-chat",
    "input": [{"role": "user", "content": "Rate 0-10: {{sample.output_text}}"}],
    "range": [0, 10],
}
LABEL = {
    "type": "label_model",
    "name": "verdict",
    "model": "judge-chat",
    "input": [{"role": "user", "content": "correct or incorrect? {{sample.output_text}}"}],
    "labels": ["correct", "incorrect"],
    "passing_labels": ["correct"],
}
MULTI = {
    "type": "multi",
    "name": "both",
    "graders": {"s": SCORE, "v": LABEL},
    "calculate_output": "s / 10 + v",
}
HEADERS = {"Authorization": "Bearer k1"}


@pytest.fixture
def http(tmp_path, redis_client, unit_redis_url):
    settings = ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-judge-endpoints",
        api_keys="k1",
        judge_endpoints=json.dumps(ENDPOINTS),
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _job(http, graders: list) -> object:
    fid = http.post(
        "/v1/files",
        files={"file": ("p.jsonl", b'{"prompt": "q"}\n')},
        data={"purpose": "fine-tune"},
        headers=HEADERS,
    ).json()["id"]
    body = {"model": "tiny", "training_file": fid, "method": {"type": "grpo", "grpo": {}}}
    body["method"]["grpo"]["graders"] = graders
    return http.post("/v1/fine_tuning/jobs", json=body, headers=HEADERS)


def test_remote_judges_are_accepted_in_a_training_job_as_written(http):
    resp = _job(http, [SCORE, LABEL, MULTI])
    assert resp.status_code == 200, resp.text
    stored = http.get(f"/v1/fine_tuning/jobs/{resp.json()['id']}", headers=HEADERS).json()
    graders = stored["method"]["grpo"]["graders"]
    assert [g["model"] for g in graders[:2]] == ["judge-chat", "judge-chat"]
    assert {g["model"] for g in graders[2]["graders"].values()} == {"judge-chat"}
    # recorded for the worker, which checks its own endpoints serve them before the run
    record = http.app.state.jobs.get(resp.json()["id"])
    assert json.loads(record["judge_models"]) == ["judge-chat"]


def test_graders_validate_accepts_a_remote_judge(http):
    for grader in (SCORE, LABEL, MULTI):
        resp = http.post(
            "/v1/fine_tuning/alpha/graders/validate", json={"grader": grader}, headers=HEADERS
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["grader"] == grader


@pytest.mark.parametrize(
    "grader,param,words",
    [
        # a chat model under the model roots is no reward model, and no endpoint serves it
        ({**SCORE, "model": "tiny"}, "graders[0].model", "judge endpoint this server names"),
        ({**LABEL, "model": "tiny"}, "graders[0].model", "POSTTRAIN_JUDGE_ENDPOINTS"),
        (
            {**MULTI, "graders": {"s": SCORE, "v": {**LABEL, "model": "tiny"}}},
            "graders[0].graders.v.model",
            "POSTTRAIN_JUDGE_ENDPOINTS",
        ),
        ({**SCORE, "model": "nowhere"}, "graders[0].model", "model not found or not allowed"),
    ],
)
def test_other_models_follow_the_present_rules(http, grader, param, words):
    resp = _job(http, [grader])
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == f"method.grpo.{param}" and words in err["message"], err


def test_a_bad_setting_names_itself_and_the_field(tmp_path):
    bad = {"own": {**ENDPOINTS["own"], "base_url": "ftp://x"}}
    with pytest.raises(ValueError, match=r"POSTTRAIN_JUDGE_ENDPOINTS\.own\.base_url"):
        ApiSettings(data_dir=tmp_path, judge_endpoints=json.dumps(bad))


def test_an_egpo_grader_judge_asks_no_judge_endpoint(http):
    """EGPO's grader judge scores pairs in its own way and never asks an endpoint: its
    score_model is resolved as a local model, so an endpoint's model name is unknown."""
    fid = http.post(
        "/v1/files",
        files={"file": ("p.jsonl", b'{"prompt": "q"}\n')},
        data={"purpose": "fine-tune"},
        headers=HEADERS,
    ).json()["id"]
    judge = {"type": "grader", "grader": SCORE}
    body = {
        "model": "tiny",
        "training_file": fid,
        "method": {"type": "egpo", "egpo": {"hyperparameters": {"judge": judge}}},
    }
    resp = http.post("/v1/fine_tuning/jobs", json=body, headers=HEADERS)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "method.egpo.hyperparameters.judge.grader.model"
    assert "model not found or not allowed" in err["message"]
