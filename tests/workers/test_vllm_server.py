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
    assert err["code"] == "rollout_engine_unavailable", err
    (start,) = [json.loads(x) for x in record.read_text().splitlines()]
    assert start["argv"][:2] == ["serve", str(model)]
    with pytest.raises(ProcessLookupError):
        os.kill(start["pid"], 0)  # stopped with the run
    plan = json.loads((tmp_path / "jobs" / "ftjob-v" / "plan-1.json").read_text())
    assert plan["vllm_server_url"].startswith("http://127.0.0.1:")
    messages = [f["message"] for _, f in store.events("ftjob-v", None, 20)[0]]
    assert any(m.startswith("Started a vLLM server") for m in messages)
    assert "Stopped the run's vLLM server" in messages


ROLLOUTS = Path(__file__).parent / "vllm_rollouts.py"


def _async_spec(model: Path, file_id: str, **fields):
    from trainers.contract.spec import JobSpec

    hp = {
        "rollout_mode": "async",
        "rollout_engine": "vllm",
        "vllm_mode": "server",
        "beta": 0.0,
        "loss_type": "dapo",
        "num_generations": 2,
        "batch_size": 4,
        "max_completion_length": 6,
        "max_steps": 2,
        "max_staleness": 1,
    }
    grader = {
        "type": "string_check",
        "name": "g",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    return JobSpec.model_validate(
        {
            "model": str(model),
            "training_file": file_id,
            "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
            **fields,
        }
    )


def test_an_async_lora_job_gets_a_server_that_takes_adapters(tmp_path):
    from workers.vllm_server import lora_serving

    spec = _async_spec(tmp_path, "file-x", training_type="lora", lora={"r": 4, "alpha": 8})
    lora = lora_serving(spec)
    assert (lora.max_lora_rank, lora.max_loras) == (8, 3)  # rank 4 -> 8; max_staleness 1 + 2
    cmd = server_command(WorkerSettings(), "/models/m", 8123, lora)
    assert cmd[-5:] == ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "3"]
    assert lora_serving(_async_spec(tmp_path, "file-x")) is None  # full weights: no adapters


def test_an_async_grpo_job_trains_on_its_own_server(store, file_store, tmp_path, monkeypatch):
    """Through the supervisor and a real training process: the worker starts the run's
    server (the sampling stand-in of ``vllm serve``), the job trains on TRL's
    AsyncGRPOTrainer against it, succeeds, and the server is stopped with the run."""
    from trainers.tiny_model import build_tiny_model
    from workers.store import JobStatus
    from workers.supervisor import Supervisor

    log = tmp_path / "vllm.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    model = build_tiny_model(tmp_path / "model")
    staged = file_store.staging_path()
    rows = [
        {
            "messages": [{"role": "user", "content": f"Who lives on mountain {i}?"}],
            "answer": "Heidi",
        }
        for i in range(4)
    ]
    staged.write_text("\n".join(json.dumps(r) for r in rows))
    rec = file_store.commit(
        staged,
        filename="p.jsonl",
        purpose="fine-tune",
        formats=["prompt_only"],
        rows=4,
        extra_fields=["answer"],
    )
    spec = _async_spec(model, rec["id"])
    store.create("ftjob-a", spec.model_dump_json(), JobStatus.queued)
    claim = store.claim("ftjob-a", "w1", 30, 3)
    settings = WorkerSettings(
        vllm_command=f"{sys.executable} {ROLLOUTS}",
        vllm_start_timeout=120,
        data_dir=tmp_path,
        train_threads=1,
        key_prefix="test:",
    )
    sup = Supervisor(settings, store, file_store, "w1")

    assert sup.run("ftjob-a", claim.attempt) == "succeeded", store.get("ftjob-a").get("error")
    events = [json.loads(x) for x in log.read_text().splitlines()]
    (start,) = [e for e in events if e["event"] == "start"]
    assert start["argv"][:2] == ["serve", str(model)]
    assert [e["version"] for e in events if e["event"] == "weights"] == [1, 2, 3]
    with pytest.raises(ProcessLookupError):
        os.kill(start["pid"], 0)  # stopped with the run
    messages = [f["message"] for _, f in store.events("ftjob-a", None, 50)[0]]
    assert any(m.startswith("Asynchronous rollouts: TRL's AsyncGRPOTrainer") for m in messages)
