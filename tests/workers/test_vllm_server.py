"""The worker starts, health-checks and stops a run's vLLM server (a fake ``vllm`` binary)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from workers.settings import WorkerSettings
from workers.vllm_server import VLLMServer, server_command

FAKE = Path(__file__).parent / "fixtures" / "fake_vllm.py"


def _settings(**kw) -> WorkerSettings:
    return WorkerSettings(vllm_command=f"{sys.executable} {FAKE}", vllm_start_timeout=20, **kw)


def test_the_command_is_trls_vllm_serve_with_weight_transfer():
    cmd = server_command(WorkerSettings(), "/models/m", 8123)
    assert cmd[:3] == ["vllm", "serve", "/models/m"] and "--port" in cmd
    assert cmd[cmd.index("--weight-transfer-config") + 1] == '{"backend":"nccl"}'
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"


def test_a_server_is_started_healthy_and_stopped_with_its_group(tmp_path, monkeypatch):
    record = tmp_path / "starts.jsonl"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    server = VLLMServer.start(_settings(), "/models/m", tmp_path / "vllm.log")
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    (start,) = [json.loads(x) for x in record.read_text().splitlines()]
    assert start["argv"][:2] == ["serve", "/models/m"]
    server.stop(grace=5)
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(start["pid"], 0)


def test_a_server_that_dies_at_start_is_an_error_naming_its_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    with pytest.raises(RuntimeError, match="exited with code 3"):
        VLLMServer.start(_settings(), "/models/m", tmp_path / "vllm.log")


def test_a_server_mode_grpo_run_gets_its_own_server_for_the_run_only(
    store, file_store, tmp_path, monkeypatch
):
    """The supervisor starts the run's vLLM server before the trainer, hands the trainer
    its URL, and stops it when the run ends: here the run fails at once because this
    CPU host cannot run vLLM rollouts, which must still leave no server behind."""
    from trainers.contract.spec import JobSpec
    from trainers.tiny_model import build_tiny_model
    from workers.store import JobStatus
    from workers.supervisor import Supervisor

    record = tmp_path / "starts.jsonl"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    model = build_tiny_model(tmp_path / "model")
    staged = file_store.staging_path()
    staged.write_text(json.dumps({"prompt": "Who lives on the mountain?", "answer": "Heidi"}))
    rec = file_store.commit(
        staged,
        filename="p.jsonl",
        purpose="fine-tune",
        formats=["prompt_only"],
        rows=1,
        extra_fields=["answer"],
    )
    grader = {
        "type": "string_check",
        "name": "g",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    hp = {"num_generations": 2, "batch_size": 2, "rollout_engine": "vllm", "vllm_mode": "server"}
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "training_file": rec["id"],
            "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
        }
    )
    store.create("ftjob-v", spec.model_dump_json(), JobStatus.queued)
    claim = store.claim("ftjob-v", "w1", 30, 3)
    sup = Supervisor(
        _settings(data_dir=tmp_path, train_threads=1, key_prefix="test:"), store, file_store, "w1"
    )

    assert sup.run("ftjob-v", claim.attempt) == "failed"
    err = json.loads(store.get("ftjob-v")["error"])
    assert err["code"] == "rollout_engine_unavailable"
    (start,) = [json.loads(x) for x in record.read_text().splitlines()]
    assert start["argv"][:2] == ["serve", str(model)]
    with pytest.raises(ProcessLookupError):
        os.kill(start["pid"], 0)  # stopped with the run
    plan = json.loads((tmp_path / "jobs" / "ftjob-v" / "plan-1.json").read_text())
    assert plan["vllm_server_url"].startswith("http://127.0.0.1:")
    messages = [f["message"] for _, f in store.events("ftjob-v", None, 20)[0]]
    assert any(m.startswith("Started a vLLM server") for m in messages)
    assert "Stopped the run's vLLM server" in messages
