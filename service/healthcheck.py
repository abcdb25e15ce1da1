"""``posttrain healthcheck api|worker|inference``: the probes the images' health checks run.

Each answers for the service in its own container and exits 0 (healthy) or 1, printing
why not:

* ``api``: ``GET /readyz`` on ``127.0.0.1:$POSTTRAIN_PORT`` answers 200 (Redis answers
  and the data directory takes a write).
* ``worker``: a training worker of this host has a live entry in Redis' worker registry
  (``workers.fleet``; its main process rewrites it every heartbeat, so a wedged worker
  or an unreachable Redis turns unhealthy), and the data directory takes a write.
* ``inference``: the inference worker's front answers ``GET /health`` on
  ``127.0.0.1:$POSTTRAIN_INFERENCE_PORT`` and every engine it started is alive.

Only the standard library, pydantic settings and the Redis client are imported: a probe
runs every few seconds and must stay cheap (never torch, Celery or FastAPI).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def _get(url: str, timeout: float = 4.0) -> tuple[str | None, bytes]:
    """(None, body) when ``url`` answers 200; otherwise (why not, b"")."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
            return (None if resp.status == 200 else f"{url} answered {resp.status}"), body
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}: {exc.read(300).decode(errors='replace')}", b""
    except OSError as exc:
        return f"{url}: {exc}", b""


def writable(directory: Path) -> str | None:
    """None when a file can be created in and removed from ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".health-{os.getpid()}-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"{directory} is not writable: {exc.strerror or exc}"
    return None


def check_api() -> str | None:
    port = os.environ.get("POSTTRAIN_PORT", "8000")
    return _get(f"http://127.0.0.1:{port}/readyz")[0]


def check_inference() -> str | None:
    port = os.environ.get("POSTTRAIN_INFERENCE_PORT", "8100")
    problem, body = _get(f"http://127.0.0.1:{port}/health")
    if problem is None and not all(json.loads(body).get("engines_alive", [])):
        return f"an engine is down (the worker restarts it): {body.decode()}"
    return problem


def check_worker(hostname: str | None = None) -> str | None:
    from workers.fleet import fleet_queues, live_workers
    from workers.redis_client import make_redis
    from workers.settings import WorkerSettings

    s = WorkerSettings()
    host = hostname or socket.gethostname()
    try:
        client = make_redis(s)
        live = [
            w["name"]
            for queue in fleet_queues(client, s.key_prefix)
            for w in live_workers(client, s.key_prefix, queue)
        ]
    except Exception as exc:  # any failure to read the registry is unhealthy
        return f"cannot read the worker registry in Redis: {exc}"
    # a Celery node name is NAME@HOST; the default and `--hostname x@%h` both end in HOST
    if not any(name.rpartition("@")[2] == host for name in live):
        return f"no live training worker of host {host} in Redis (live: {sorted(live)})"
    return writable(Path(s.data_dir) / "jobs")


CHECKS = {"api": check_api, "worker": check_worker, "inference": check_inference}


def run(service: str) -> int:
    problem = CHECKS[service]()
    if problem is None:
        print(f"{service}: ok")
        return 0
    print(f"{service}: unhealthy: {problem}")
    return 1
