"""Starting the stack's processes: Redis (if none answers), the API, a worker.

Used by ``posttrain demo`` and by the end-to-end tests, so both exercise the
same commands a deployment runs (uvicorn with the app factory, a Celery worker).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis


def redis_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(url: str, log: Path) -> subprocess.Popen | None:
    """Start a throwaway redis-server for ``url`` if nothing answers there."""
    if redis_alive(url):
        return None
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            f"no Redis answers at {url} and redis-server is not installed; "
            "install it (apt-get install redis-server) or set POSTTRAIN_REDIS_URL"
        )
    port = urlparse(url).port or 6379
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    _wait(lambda: redis_alive(url), 10, f"redis-server on port {port}")
    return proc


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/readyz", proc), 30, "the API")
    return proc


def start_worker(
    env: dict[str, str], log: Path, name: str = "posttrain-worker"
) -> subprocess.Popen:
    queue = env.get("POSTTRAIN_QUEUE", "posttrain.gpu")
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        queue,
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"{name}@%h",
        "--loglevel",
        "INFO",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    _wait(
        lambda: proc.poll() is not None or "ready." in log.read_text(errors="replace"),
        60,
        "the Celery worker",
    )
    if proc.poll() is not None:
        raise RuntimeError(f"the worker exited with {proc.returncode}; see {log}")
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_inference(env: dict[str, str], log: Path, port: int) -> subprocess.Popen:
    """``posttrain inference`` (its engine as its child) on ``port``; ready once the engine
    answers and the worker has registered."""
    cmd = [sys.executable, "-m", "service.cli", "inference", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    _wait(
        lambda: proc.poll() is not None or "serving at" in log.read_text(errors="replace"),
        240,
        "the inference worker",
    )
    if proc.poll() is not None:
        raise RuntimeError(f"the inference worker exited with {proc.returncode}; see {log}")
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """Stop a process started here (and its process group) gracefully, then forcefully."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def _http_ok(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")
