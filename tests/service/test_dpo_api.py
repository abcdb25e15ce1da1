"""Bad DPO input is refused by the HTTP API, naming the line and the field (in-process)."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PROMPT = {"messages": [{"role": "user", "content": "Say hi."}]}
GOOD = [{"role": "assistant", "content": "Hi!"}]
BAD = [{"role": "assistant", "content": "No."}]
PAIR = {"input": PROMPT, "preferred_output": GOOD, "non_preferred_output": BAD}
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}


def upload(client, rows, name="train.jsonl"):
    body = "\n".join(json.dumps(r) for r in rows).encode()
    return client.post(
        "/v1/files", files={"file": (name, io.BytesIO(body))}, data={"purpose": "fine-tune"}
    )


def create_job(client, file_id, **extra):
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, **extra}
    )


def error_of(resp):
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-dpo"
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    "bad,field,fragment",
    [
        (
            {"input": PROMPT, "preferred_output": GOOD},
            "non_preferred_output",
            "Field required",
        ),
        (
            {**PAIR, "preferred_output": [{"role": "user", "content": "Hi!"}]},
            "preferred_output",
            "assistant turns only",
        ),
        (
            {**PAIR, "non_preferred_output": [{"role": "assistant", "content": "  "}]},
            "non_preferred_output",
            "the answer is empty",
        ),
        ({"prompt": "Say hi.", "chosen": "Hi!"}, "rejected", "Field required"),
        ({"prompt": "Say hi.", "chosen": "", "rejected": "No."}, "chosen", "empty"),
    ],
    ids=["no-rejected", "user-preferred", "empty-answer", "trl-no-rejected", "trl-empty"],
)
def test_bad_preference_rows_are_a_400_naming_line_and_field(client, bad, field, fragment):
    resp = upload(client, [PAIR, PAIR, bad])
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == "file" and err["code"] == "invalid_file_format"
    assert "line 3" in err["message"] and f"'{field}" in err["message"], err["message"]
    assert fragment in err["message"], err["message"]
    assert client.get("/v1/files").json()["data"] == []


def test_a_preference_file_is_accepted_and_a_dpo_job_queued(client):
    f = upload(client, [PAIR, {"prompt": "Q", "chosen": "A", "rejected": "B"}]).json()
    assert f["status"] == "processed" and f["format"] == "preference" and f["rows"] == 2
    resp = create_job(client, f["id"], method=DPO)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2


def test_a_dpo_job_on_a_chat_file_is_a_400_naming_the_problem(client):
    fid = upload(client, [CHAT, CHAT]).json()["id"]
    resp = create_job(client, fid, method=DPO)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "training_file"
    msg = err["message"]
    assert "'chat'" in msg and "'dpo'" in msg and "preference" in msg, msg
    assert "line 1" in msg, msg  # and the first line that is not a preference row
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_bad_dpo_hyperparameters_are_a_400(client):
    fid = upload(client, [PAIR]).json()["id"]
    bad = {
        "type": "dpo",
        "dpo": {"hyperparameters": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}},
    }
    err = error_of(create_job(client, fid, method=bad))
    assert err["param"].startswith("method.dpo.hyperparameters")
    assert "one weight per loss type" in err["message"]
    err = error_of(
        create_job(
            client, fid, method={"type": "dpo", "dpo": {"hyperparameters": {"loss_type": "rpo"}}}
        )
    )
    assert err["param"].startswith("method.dpo.hyperparameters.loss_type")
