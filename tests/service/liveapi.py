"""The real API process for tests that need real HTTP: uvicorn started with the
deployment's command (``service.stack.start_api``) on a database of the suite's
throwaway Redis, plus helpers that speak raw HTTP/1.1 over one socket."""

from __future__ import annotations

import http.client
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import redis

from service import stack
from tests import redis_server

LIVE_DB = 11
KEY = "live-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveAPI:
    base_url: str
    port: int
    data_dir: Path
    redis: redis.Redis
    log: Path
    proc: object = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def stop(self) -> None:
        stack.stop(self.proc)
        self.redis.flushdb()


def start_live_api(root: Path, **env_overrides: str) -> LiveAPI:
    url = redis_server.url(LIVE_DB)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    env = {
        **os.environ,
        "POSTTRAIN_REDIS_URL": url,
        "POSTTRAIN_DATA_DIR": str(root / "data"),
        "POSTTRAIN_QUEUE": f"posttrain.live.{root.name}",
        "POSTTRAIN_API_KEYS": KEY,
        **env_overrides,
    }
    models = root / "data" / "models" / "tiny"
    models.mkdir(parents=True, exist_ok=True)
    (models / "config.json").write_text('{"model_type": "llama"}')
    port = free_port()
    api = LiveAPI(f"http://127.0.0.1:{port}", port, root / "data", client, root / "api.log")
    api.proc = stack.start_api(env, port, api.log)
    return api


def raw_request(
    sock: socket.socket, head: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on an open connection and read its whole response."""
    sock.sendall(head.encode("latin-1") + body)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
