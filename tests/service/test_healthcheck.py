"""``posttrain healthcheck``: what the images' health checks decide, against a real Redis
and real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest

from service import healthcheck
from tests.loopback import Handler, serving
from workers.fleet import advertise, withdraw


@pytest.fixture
def worker_env(monkeypatch, unit_redis_url, redis_client, tmp_path):
    monkeypatch.setenv("POSTTRAIN_REDIS_URL", unit_redis_url)
    monkeypatch.setenv("POSTTRAIN_KEY_PREFIX", "test:")
    monkeypatch.setenv("POSTTRAIN_DATA_DIR", str(tmp_path))
    return redis_client


def test_a_worker_is_healthy_while_its_entry_is_live_and_the_volume_writable(
    worker_env, tmp_path, frozen
):
    host = socket.gethostname()
    assert "no live training worker" in healthcheck.check_worker()
    # another host's worker does not make this one healthy
    advertise(worker_env, "test:", "posttrain.cpu", "celery@elsewhere", [], ["ddp"], 30)
    assert "no live training worker" in healthcheck.check_worker()
    advertise(worker_env, "test:", "posttrain.cpu", f"celery@{host}", [], ["ddp"], 30)
    assert healthcheck.check_worker() is None
    (tmp_path / "jobs").mkdir(exist_ok=True)
    thaw = frozen(tmp_path / "jobs")
    assert "not writable" in healthcheck.check_worker()
    thaw()
    withdraw(worker_env, "test:", "posttrain.cpu", f"celery@{host}")
    assert "no live training worker" in healthcheck.check_worker()


def test_a_worker_whose_redis_cannot_be_reached_is_unhealthy(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("POSTTRAIN_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("POSTTRAIN_REDIS_RETRIES", "0")
    monkeypatch.setenv("POSTTRAIN_DATA_DIR", str(tmp_path))
    assert "cannot read the worker registry" in healthcheck.check_worker()


@pytest.fixture
def answering(monkeypatch):
    """``answering(status, body)``: a loopback HTTP server that answers every GET so, its
    port set as both POSTTRAIN_PORT and POSTTRAIN_INFERENCE_PORT."""
    with contextlib.ExitStack() as stack:

        def serve(status: int, body: dict):
            class Answer(Handler):
                def do_GET(self):
                    self.reply(status, json.dumps(body).encode())

            port = stack.enter_context(serving(Answer)).rsplit(":", 1)[1]
            for name in ("POSTTRAIN_PORT", "POSTTRAIN_INFERENCE_PORT"):
                monkeypatch.setenv(name, port)

        yield serve


def test_the_api_is_healthy_only_when_ready(answering):
    answering(200, {"status": "ok", "redis": "ok", "data_dir": "ok"})
    assert healthcheck.run("api") == 0
    answering(503, {"status": "unavailable", "redis": "ok", "data_dir": "not_writable"})
    assert "not_writable" in healthcheck.check_api()
    assert healthcheck.run("api") == 1


def test_an_inference_worker_with_a_dead_engine_is_unhealthy(answering):
    answering(200, {"status": "ok", "engine": "vllm", "engines_alive": [], "models": []})
    assert healthcheck.check_inference() is None  # vLLM servers start with the first request
    answering(200, {"status": "ok", "engine": "transformers", "engines_alive": [False]})
    assert "an engine is down" in healthcheck.check_inference()
