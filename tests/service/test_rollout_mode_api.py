"""``rollout_mode: "async"`` through the API: a 400 that names the field and says why
(posttrain has no asynchronous GRPO path yet), nothing stored; ``sync`` is the default
and is accepted."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from tests.service.test_api import create_job, error_of, upload

PROMPT = {"messages": [{"role": "user", "content": "say 7"}], "answer": "7"}
GRADER = {
    "type": "string_check",
    "name": "seven",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-rm"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def grpo(**hps) -> dict:
    return {"type": "grpo", "grpo": {"graders": [GRADER], "hyperparameters": hps}}


@pytest.mark.parametrize("engine", ["auto", "vllm", "transformers"])
def test_async_rollouts_are_refused_with_the_reason(client, redis_client, engine):
    fid = upload(client, [PROMPT]).json()["id"]
    before = set(redis_client.scan_iter("test:job*"))
    resp = create_job(client, fid, method=grpo(rollout_mode="async", rollout_engine=engine))
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"].startswith("method.grpo")
    assert "rollout_mode 'async'" in err["message"]
    assert "vLLM" in err["message"] and "rollout_mode 'sync'" in err["message"]
    assert set(redis_client.scan_iter("test:job*")) == before


def test_sync_is_the_default_and_accepted(client):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=grpo(rollout_mode="sync"))
    assert resp.status_code == 200, resp.text
    hps = resp.json()["method"]["grpo"]["hyperparameters"]
    assert hps["rollout_mode"] == "sync"
