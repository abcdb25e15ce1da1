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
