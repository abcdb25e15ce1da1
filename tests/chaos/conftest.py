"""Fault injection against the real stack: its own AOF Redis, the API and workers.

The chaos tests kill and stall real processes (workers, trainers, the API, Redis)
and check what survived. Each records the faults it injected and what it found
(jobs lost, duplicated, stranded, records incomplete) in ``FAULTS``; the session
prints them as a table at the end (``pytest_terminal_summary``), and every test
asserts its counts are all 0.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.e2e.conftest import Stack, start_stack
from tests.e2e.test_sft_job import DEMO, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Fault:
    name: str
    injected: int = 0
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    stranded: int = 0
    incomplete: int = 0
    notes: list[str] = field(default_factory=list)


FAULTS: list[Fault] = []


def pytest_terminal_summary(terminalreporter):
    if not FAULTS:
        return
    tr = terminalreporter
    tr.section("chaos: faults injected and what survived")
    cols = ("times", 5), ("jobs", 4), ("lost", 4), ("dup", 4), ("strand", 6), ("incompl", 7)
    tr.write_line(f"{'fault':<44} " + " ".join(f"{n:>{w}}" for n, w in cols))
    for f in FAULTS:
        tr.write_line(
            f"{f.name:<44} {f.injected:>5} {f.jobs:>4} {f.lost:>4} {f.duplicated:>4} "
            f"{f.stranded:>6} {f.incomplete:>7}  {'; '.join(f.notes)}"
        )


class OwnRedis:
    """A redis-server with AOF (fsync always) on its own port, stoppable and restartable
    with its data: what a Redis outage looks like to posttrain."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="posttrain-chaos-redis-"))
        self.proc: subprocess.Popen | None = None
        self.outages = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
            ],
            stdout=open(self.dir / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url(), socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), 20, "the chaos redis-server", poll=0.05)

    def stop(self) -> None:
        """SIGTERM: Redis finishes its AOF and exits (clients see connection refused)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def outage(self, seconds: float) -> None:
        self.stop()
        self.outages += 1
        time.sleep(seconds)
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def own_redis():
    srv = OwnRedis()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(srv.dir, ignore_errors=True)


CHAOS_ENV = {
    "POSTTRAIN_LEASE_SECONDS": "3",
    "POSTTRAIN_HEARTBEAT_SECONDS": "0.5",
    "POSTTRAIN_REQUEUE_GRACE_SECONDS": "3",
    "POSTTRAIN_MAX_ATTEMPTS": "3",
    "POSTTRAIN_REDIS_SOCKET_TIMEOUT": "2",
    "POSTTRAIN_REDIS_CONNECT_TIMEOUT": "1",
    "POSTTRAIN_REDIS_RETRIES": "2",
    "POSTTRAIN_REDIS_HEALTH_CHECK_INTERVAL": "2",
}


@pytest.fixture(scope="module")
def cstack(tmp_path_factory, own_redis):
    st = start_stack(tmp_path_factory.mktemp("chaos"), own_redis.url(0), **CHAOS_ENV)
    try:
        yield st
    finally:
        st.stop()


def client(st: Stack) -> httpx.Client:
    return httpx.Client(base_url=f"{st.base_url}/v1", timeout=30)


def upload(st: Stack) -> str:
    with client(st) as c, DEMO.open("rb") as fh:
        return c.post(
            "/files", files={"file": ("demo.jsonl", fh)}, data={"purpose": "fine-tune"}
        ).json()["id"]


def job_body(st: Stack, file_id: str, n_epochs: int) -> dict:
    hp = {"n_epochs": n_epochs, "batch_size": 8, "learning_rate": 5e-3}
    return {
        "model": str(st.model_dir),
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }


def submit(st: Stack, file_id: str, n_epochs: int, **headers: str) -> str:
    with client(st) as c:
        r = c.post("/fine_tuning/jobs", json=job_body(st, file_id, n_epochs), headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["id"]


def record(st: Stack, job_id: str) -> dict:
    """The job record straight from Redis (works while the API is down); {} if unreachable."""
    try:
        return st.redis.hgetall(f"posttrain:job:{job_id}")
    except redis.RedisError:
        return {}


def wait_status(st: Stack, job_id: str, statuses, timeout: float = 240) -> dict:
    return wait_for(
        lambda: (rec := record(st, job_id)).get("status") in statuses and rec,
        timeout,
        f"job {job_id} to reach {statuses}",
        poll=0.2,
    )


def wait_step(st: Stack, job_id: str, step: int, timeout: float = 180) -> int:
    return int(
        wait_for(
            lambda: int(record(st, job_id).get("step") or 0) >= step and record(st, job_id)["step"],
            timeout,
            f"job {job_id} to pass step {step}",
            poll=0.05,
        )
    )


def audit(st: Stack, job_id: str) -> list[str]:
    """What is incomplete about a succeeded job's record (empty = complete): every step's
    metrics exactly once, trained tokens, a fine-tuned model, a downloadable final
    checkpoint."""
    problems = []
    with client(st) as c:
        job = c.get(f"/fine_tuning/jobs/{job_id}").json()
        rows = c.get(f"/fine_tuning/jobs/{job_id}/metrics", params={"limit": 10000}).json()
        steps = [r["step"] for r in rows["data"]]
        total = int(record(st, job_id).get("total_steps") or 0)
        if job["status"] != "succeeded":
            problems.append(f"status {job['status']}")
        if not job.get("trained_tokens"):
            problems.append(f"trained_tokens {job.get('trained_tokens')}")
        if not job.get("fine_tuned_model"):
            problems.append("no fine_tuned_model")
        if len(steps) != len(set(steps)):
            dup = sorted({s for s in steps if steps.count(s) > 1})
            problems.append(f"duplicate metric steps {dup[:10]}")
        if total == 0 or sorted(set(steps)) != list(range(1, total + 1)):
            missing = sorted(set(range(1, total + 1)) - set(steps))
            problems.append(f"metrics: {len(set(steps))} of {total} steps, missing {missing[:10]}")
        ckpts = c.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        final = [k for k in ckpts if k["step_number"] == total]
        if not final:
            problems.append("no final checkpoint")
        else:
            r = c.get(f"/fine_tuning/jobs/{job_id}/checkpoints/{final[0]['id']}/content")
            if r.status_code != 200 or len(r.content) < 1000:
                problems.append(f"final checkpoint download: {r.status_code}")
    return problems


def events(st: Stack, job_id: str) -> list[str]:
    with client(st) as c:
        data = c.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e["message"] for e in data]


def all_job_ids(st: Stack) -> list[str]:
    return st.redis.zrange("posttrain:jobs", 0, -1)
