"""``rollout_mode`` through the API. ``async`` is accepted only for a job that generates
on a worker-owned vLLM server (``rollout_engine: "vllm"``, ``vllm_mode: "server"``) with
settings TRL's asynchronous GRPO trainer honours; every other request is a 400 that names
the field and says why, and nothing is stored. ``sync`` is the default and is accepted;
``max_staleness`` is validated and belongs to ``async``."""

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
# What TRL's async trainer computes: no KL term, token-mean aggregation.
ASYNC = {
    "rollout_mode": "async",
    "rollout_engine": "vllm",
    "vllm_mode": "server",
    "beta": 0.0,
    "loss_type": "dapo",
}


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-rm"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def grpo(variant: str = "grpo", block: dict | None = None, **hps) -> dict:
    return {
        "type": "grpo",
        "grpo": {"variant": variant, "graders": [GRADER], "hyperparameters": hps, **(block or {})},
    }


def refused(client, redis_client, method, **extra) -> dict:
    fid = upload(client, [PROMPT]).json()["id"]
    before = set(redis_client.scan_iter("test:job*"))
    resp = create_job(client, fid, method=method, **extra)
    assert resp.status_code == 400, resp.text
    assert set(redis_client.scan_iter("test:job*")) == before
    return error_of(resp)


@pytest.mark.parametrize(
    "where",
    [
        {"rollout_engine": "auto"},
        {"rollout_engine": "transformers"},
        {"vllm_mode": "colocate"},  # vLLM in the training process: no server to generate on
        {"rollout_engine": "auto", "vllm_mode": "colocate"},
    ],
)
def test_async_off_a_vllm_server_is_refused_with_the_reason(client, redis_client, where):
    err = refused(client, redis_client, grpo(**{**ASYNC, **where}))
    assert err["param"].startswith("method.grpo")
    assert "rollout_mode 'async'" in err["message"]
    assert "vLLM server" in err["message"] and "rollout_mode 'sync'" in err["message"]
    assert "vllm_mode 'server'" in err["message"]


def test_async_on_a_vllm_server_is_accepted_with_max_staleness(client):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=grpo(**ASYNC, max_staleness=2, epsilon_high=0.28))
    assert resp.status_code == 200, resp.text
    hps = resp.json()["method"]["grpo"]["hyperparameters"]
    assert hps["rollout_mode"] == "async" and hps["max_staleness"] == 2
    # LoRA (its adapter is what reaches the server) is accepted too
    resp = create_job(client, fid, method=grpo(**ASYNC), training_type="lora")
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("variant", "hps", "field", "value"),
    [
        ("grpo", {"beta": 0.04}, "beta", "0.04"),
        ("grpo", {"beta": None}, "beta", "0.04"),  # the preset's KL term
        ("grpo", {"loss_type": None}, "loss_type", "'grpo'"),  # the preset's aggregation
        (
            "grpo",
            {"advantage_estimator": "dr_grpo", "scale_rewards": "none"},
            "advantage_estimator",
            "'dr_grpo'",
        ),
        ("grpo", {"objective": "hapo"}, "objective", "'hapo'"),
        ("grpo", {"dual_clip": 3.0}, "dual_clip", "3.0"),
        ("grpo", {"advantage_shaper": "xrpo_novelty"}, "advantage_shaper", "'xrpo_novelty'"),
        ("grpo", {"scale_rewards": "batch"}, "scale_rewards", "'batch'"),
        ("grpo", {"num_iterations": 2}, "num_iterations", "2"),
        ("grpo", {"mask_truncated_completions": True}, "mask_truncated_completions", "True"),
        (
            "grpo",
            {"importance_sampling_level": "sequence"},
            "importance_sampling_level",
            "'sequence'",
        ),
        ("grpo", {"reward_weights": [2.0]}, "reward_weights", "[2.0]"),
        ("dapo", {}, "steps_per_generation", "16"),
        ("hapo", {}, "advantage_estimator", "'hapo'"),
    ],
)
def test_settings_async_cannot_honour_are_refused_by_name(
    client, redis_client, variant, hps, field, value
):
    err = refused(client, redis_client, grpo(variant, **{**ASYNC, **hps}))
    assert err["param"].startswith("method.grpo")
    msg = err["message"]
    assert f"cannot take {field} {value}" in msg, msg
    origin = "the request" if hps.get(field) is not None else f"variant '{variant}'"
    assert f"(from {origin})" in msg and "rollout_mode 'sync'" in msg


def test_tools_validation_and_processes_are_refused_for_async(client, redis_client):
    tool = {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
        "endpoint": {"url": "https://tools.example.com/add"},
    }
    err = refused(client, redis_client, grpo(block={"tools": [tool]}, **ASYNC))
    assert "tools" in err["message"] and "rollout_mode 'sync'" in err["message"]

    err = refused(client, redis_client, grpo(**ASYNC), resources={"gpus": 2})
    assert "one training process" in err["message"]

    vid = upload(client, [PROMPT], name="valid.jsonl").json()["id"]
    err = refused(client, redis_client, grpo(**ASYNC), validation_file=vid)
    assert err["param"] == "validation_file" and "rollout_mode 'async'" in err["message"]


def test_reinforcement_takes_async_too(client):
    fid = upload(client, [PROMPT]).json()["id"]
    method = {
        "type": "reinforcement",
        "reinforcement": {"grader": GRADER, "hyperparameters": ASYNC},
    }
    resp = create_job(client, fid, method=method)
    assert resp.status_code == 200, resp.text


def test_max_staleness_is_validated_and_belongs_to_async(client, redis_client):
    err = refused(client, redis_client, grpo(**ASYNC, max_staleness=-1))
    assert "max_staleness" in err["param"]
    err = refused(client, redis_client, grpo(max_staleness=2))
    assert "max_staleness applies to rollout_mode 'async'" in err["message"]


def test_sync_is_the_default_and_accepted(client):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=grpo(rollout_mode="sync"))
    assert resp.status_code == 200, resp.text
    hps = resp.json()["method"]["grpo"]["hyperparameters"]
    assert hps["rollout_mode"] == "sync"


# ---- against the live workers of the job's queue


def _serve(client, name: str, engines: list[str] | None) -> None:
    """A live worker entry on the job's queue, as a worker's heartbeat writes it."""
    from workers.fleet import advertise

    jobs = client.app.state.jobs
    advertise(jobs.r, jobs.p, "posttrain.test-rm", name, [], ["ddp"], ttl=600, engines=engines)


def test_a_vllm_job_is_refused_where_no_live_worker_has_vllm(client, redis_client):
    """Workers say what they sample with; a job whose rollout_engine is 'vllm' on a queue
    whose live workers have none is refused naming rollout_engine (async included: it
    needs the vLLM command a server-mode worker starts), not failed when a worker takes it."""
    _serve(client, "cpu-1", ["transformers"])
    err = refused(client, redis_client, grpo(**ASYNC))
    assert err["param"] == "method.grpo.hyperparameters.rollout_engine"
    assert err["message"] == (
        "method.grpo.hyperparameters.rollout_engine: no live worker of queue "
        "'posttrain.test-rm' can run this job (cpu-1 cannot start a vLLM server (its "
        "POSTTRAIN_VLLM_COMMAND is not installed))"
    )
    colocate = grpo(rollout_engine="vllm", vllm_mode="colocate")
    err = refused(client, redis_client, colocate)
    assert "cpu-1 has no vLLM installed for its runs" in err["message"]
    fid = upload(client, [PROMPT]).json()["id"]
    assert create_job(client, fid, method=grpo()).status_code == 200  # auto: no vLLM needed
    # one worker with the vLLM command is enough; a worker that lists nothing is not checked
    _serve(client, "gpu-1", ["transformers", "vllm-server"])
    assert create_job(client, fid, method=grpo(**ASYNC)).status_code == 200
    assert refused(client, redis_client, colocate)["param"].endswith("rollout_engine")
    _serve(client, "old-1", None)
    assert create_job(client, fid, method=colocate).status_code == 200


def test_a_worker_advertises_the_engines_it_has(tmp_path):
    import sys

    from workers.settings import WorkerSettings
    from workers.vllm_server import rollout_engines

    def engines(command: str) -> list[str]:
        return rollout_engines(WorkerSettings(data_dir=tmp_path, vllm_command=command))

    assert engines("vllm-not-installed-here serve") == ["transformers"]  # vLLM: not here
    stand_in = f"{sys.executable} tests/workers/fixtures/fake_vllm.py"
    assert engines(stand_in) == ["transformers", "vllm-server"]
