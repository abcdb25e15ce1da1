"""The test suite's own throwaway ``redis-server``, on a free loopback port.

Tests never touch a Redis they did not start: ``pytest_configure`` (in
``tests/conftest.py``) starts one server for the whole session with nothing
persisted, and every test picks a database of it through ``url(db)``. The
machine's own Redis (usually 127.0.0.1:6379) is never written or flushed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

_proc: subprocess.Popen | None = None
_base: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> str:
    """Start the session's server (idempotent); return its base URL without a database."""
    global _proc, _base
    if _base is not None:
        return _base
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the tests need the redis-server binary (apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="posttrain-test-redis-"))
    port = _free_port()
    _proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=open(workdir / "redis.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    base = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis.from_url(f"{base}/0", socket_connect_timeout=0.5).ping():
                break
        except redis.RedisError:
            if _proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test redis-server did not start; see {workdir}") from None
            time.sleep(0.05)
    _base = base
    return base


def stop() -> None:
    global _proc, _base
    if _proc is not None and _proc.poll() is None:
        _proc.terminate()
        _proc.wait(timeout=10)
    _proc, _base = None, None


def url(db: int) -> str:
    """URL of database ``db`` on the session's server (started on first use)."""
    return f"{start()}/{db}"
