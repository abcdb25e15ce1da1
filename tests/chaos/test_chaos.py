"""Chaos: kill and stall the real processes mid-job; no job is lost, duplicated,
stranded or left with an incomplete record (issue 10)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from service import stack
from tests.chaos.conftest import (
    FAULTS,
    Fault,
    all_job_ids,
    audit,
    client,
    events,
    job_body,
    record,
    submit,
    upload,
    wait_status,
    wait_step,
)
from tests.e2e.test_sft_job import DEMO, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(240)]
TERMINAL = ("succeeded", "failed", "cancelled")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


def _done(fault: Fault, st, job_ids: list[str], before: set[str]) -> None:
    """Count what did not survive, record it for the table, assert all 0."""
    fault.jobs = len(job_ids)
    now = set(all_job_ids(st))
    fault.lost = sum(1 for j in job_ids if j not in now)
    fault.duplicated = len(now - before) - len(set(job_ids))
    fault.stranded = sum(1 for j in job_ids if record(st, j).get("status") not in TERMINAL)
    fault.incomplete = sum(
        1 for j in job_ids if record(st, j).get("status") == "succeeded" and audit(st, j)
    )
    assert (fault.lost, fault.duplicated, fault.stranded, fault.incomplete) == (0, 0, 0, 0), [
        (j, audit(st, j)) for j in job_ids
    ]


def test_worker_sigkilled_twice_mid_job_resumes_with_continuous_steps(cstack):
    fault = Fault("worker SIGKILLed mid-job (x2, then succeeds)")
    FAULTS.append(fault)
    before = set(all_job_ids(cstack))
    job_id = submit(cstack, upload(cstack), n_epochs=30)
    for attempt in (1, 2):
        wait_status(cstack, job_id, ("running",))
        wait_for(lambda a=attempt: record(cstack, job_id).get("attempt") == str(a), 60, "claim")
        wait_step(cstack, job_id, 12 * attempt)
        os.killpg(cstack.worker.pid, signal.SIGKILL)  # the whole worker, as a lost machine
        cstack.worker.wait(timeout=10)
        fault.injected += 1
        cstack.start_worker(f"chaos-replacement-{attempt}")
    rec = wait_status(cstack, job_id, TERMINAL)
    assert rec["status"] == "succeeded" and rec["attempt"] == "3", rec
    msgs = events(cstack, job_id)
    assert sum(m.startswith("Worker lost after attempt") for m in msgs) == 2
    _done(fault, cstack, [job_id], before)  # includes: metric steps 1..N, each once


def test_trainer_killed_past_the_attempt_cap_fails_with_the_reason(cstack):
    fault = Fault("trainer SIGKILLed past the attempt cap (3)")
    FAULTS.append(fault)
    before = set(all_job_ids(cstack))
    job_id = submit(cstack, upload(cstack), n_epochs=30)
    for attempt in (1, 2, 3):
        wait_for(
            lambda a=attempt: (
                record(cstack, job_id).get("attempt") == str(a)
                and record(cstack, job_id).get("status") == "running"
            ),
            120,
            f"attempt {attempt}",
        )
        pid = int(wait_for(lambda: record(cstack, job_id).get("pid"), 30, "the trainer's pid"))
        wait_for(lambda p=pid: _alive(p), 10, "the trainer")
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        fault.injected += 1
        wait_for(
            lambda p=pid: (
                record(cstack, job_id).get("pid") != str(p)
                or record(cstack, job_id).get("status") in TERMINAL
            ),
            60,
            "the next attempt",
        )
    rec = wait_status(cstack, job_id, TERMINAL)
    assert rec["status"] == "failed", rec
    with client(cstack) as c:
        err = c.get(f"/fine_tuning/jobs/{job_id}").json()["error"]
    assert err["code"] == "training_crashed"
    assert "signal 9" in err["message"] and "gave up after 3 attempts" in err["message"]
    _done(fault, cstack, [job_id], before)


def test_redis_outage_mid_run_and_with_a_job_queued_loses_nothing(cstack, own_redis):
    """The issue's case: Redis goes down mid-run and the trainer finishes (reports its
    result, exits 0) while it is down, far past the lease. Its held reports reach the
    record once Redis is back; the run is not judged a crash; the queued job runs once."""
    fault = Fault("Redis stopped mid-run (AOF) until the trainer exited")
    FAULTS.append(fault)
    before = set(all_job_ids(cstack))
    fid = upload(cstack)
    running = submit(cstack, fid, n_epochs=30)
    queued = submit(cstack, fid, n_epochs=3)
    wait_step(cstack, running, 20)
    trainer = int(record(cstack, running)["pid"])
    assert record(cstack, queued)["status"] == "queued"
    down = time.monotonic()
    own_redis.stop()
    try:
        wait_for(lambda: not _alive(trainer), 120, "the trainer to finish during the outage")
        time.sleep(max(0.0, 6.0 - (time.monotonic() - down)))  # at least 2 leases
    finally:
        own_redis.start()
    fault.injected += 1
    fault.notes.append(f"outage {time.monotonic() - down:.0f} s")
    for job_id in (running, queued):
        rec = wait_status(cstack, job_id, TERMINAL)
        # the run that went through the outage is not judged a crash, and nothing ran twice
        assert rec["status"] == "succeeded" and rec["attempt"] == "1", (job_id, rec)
    assert not any("ended unexpectedly" in m for m in events(cstack, running))
    _done(fault, cstack, [running, queued], before)


def _journal(st, job_id: str, fence: str) -> list[dict]:
    """The report lines a run of ``fence`` journaled (trainers/reporting.py)."""
    paths = (st.data_dir / "jobs" / job_id / "reports").glob(f"{fence}-*.jsonl")
    lines = [line for p in paths for line in p.read_text().splitlines()]
    return [json.loads(line) for line in lines if line.endswith("}")]


def test_a_stalled_worker_is_fenced_no_second_trainer_writes_the_job(cstack):
    """The worker holding a job hangs (SIGSTOP) past its lease while its trainer runs on;
    a second worker takes the job over with a newer fencing token. The stale trainer
    never writes a checkpoint after that (it stops at the fence, or blocks on its
    stalled supervisor's pipe), and once the stalled worker wakes, its renewal is refused
    and it stops that trainer without touching the record."""
    fault = Fault("worker SIGSTOPped past its lease, then SIGCONT")
    FAULTS.append(fault)
    before = set(all_job_ids(cstack))
    second = stack.start_worker(cstack.env, cstack.logs / "chaos-b.log", name="chaos-b")
    try:
        job_id = submit(cstack, upload(cstack), n_epochs=100)
        wait_step(cstack, job_id, 12)
        rec = record(cstack, job_id)
        fence, stale_trainer = rec["fence"], int(rec["pid"])
        owner_pid = int(rec["lease_owner"].rsplit(":", 1)[1])
        group = os.getpgid(owner_pid)
        os.killpg(group, signal.SIGSTOP)  # the supervisor (and its worker) hang
        fault.injected += 1
        try:
            taken = wait_for(
                lambda: (
                    (r := record(cstack, job_id)).get("fence") not in (None, fence)
                    and r.get("status") == "running"
                    and r
                ),
                60,
                "the other worker to take the job over",
            )
            assert int(taken["fence"]) > int(fence)
            new_resumed = wait_for(
                lambda: [
                    m["data"]["step"]
                    for m in _journal(cstack, job_id, taken["fence"])
                    if m["type"] == "event" and m["message"].startswith("Resumed from")
                ],
                120,
                "the new attempt to resume",
            )[0]
        finally:
            os.killpg(group, signal.SIGCONT)
        wait_for(lambda: not _alive(stale_trainer), 60, "the stale trainer to be stopped")
        stale = _journal(cstack, job_id, fence)
        stale_ckpts = [m["step"] for m in stale if m["type"] == "checkpoint"]
        # every checkpoint the stale run saved predates the takeover: the new attempt
        # resumed from (at least) its newest, and it saved none after
        assert stale_ckpts and max(stale_ckpts) <= new_resumed, (stale_ckpts, new_resumed)
        rec = wait_status(cstack, job_id, TERMINAL)
        assert rec["status"] == "succeeded" and rec["fence"] == taken["fence"], rec
        fault.notes.append(f"stale saved to step {max(stale_ckpts)}; new resumed at {new_resumed}")
        _done(fault, cstack, [job_id], before)
    finally:
        stack.stop(second)


def test_api_killed_mid_upload_leaves_no_staging_file_after_restart(cstack):
    fault = Fault("API SIGKILLed mid-upload, restarted")
    FAULTS.append(fault)
    body = DEMO.read_bytes() * 40_000  # ~40 MB: validating it takes a while
    staging = cstack.data_dir / "files"
    port = int(cstack.base_url.rsplit(":", 1)[1])

    def send() -> None:
        try:
            httpx.post(
                f"{cstack.base_url}/v1/files",
                files={"file": ("big.jsonl", body)},
                data={"purpose": "fine-tune"},
                timeout=120,
            )
        except httpx.HTTPError:
            pass  # the API dies under it

    t = threading.Thread(target=send, daemon=True)
    t.start()
    wait_for(lambda: list(staging.glob(".upload-*")), 120, "a staging file", poll=0.05)
    os.killpg(cstack.api.pid, signal.SIGKILL)
    cstack.api.wait(timeout=10)
    fault.injected += 1
    t.join(timeout=30)
    assert list(staging.glob(".upload-*"))  # the kill left it behind
    cstack.api = stack.start_api(cstack.env, port, cstack.logs / "api-restarted.log")
    fault.incomplete = len(list(staging.glob(".upload-*")))
    assert fault.incomplete == 0


def test_api_killed_mid_create_creates_the_job_once_and_never_strands_it(cstack):
    """The API dies after writing the record and before the broker has the message: the
    client's retry with the same Idempotency-Key gets that job, and the reconciler sends
    it, so it runs exactly once."""
    fault = Fault("API SIGKILLed mid-create (record, no message)")
    FAULTS.append(fault)
    before = set(all_job_ids(cstack))
    fid = upload(cstack)
    blackhole = socket.socket()  # a broker that accepts connections and never answers
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    port = blackhole.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api_port = s.getsockname()[1]
    env = {**cstack.env, "POSTTRAIN_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
    doomed = stack.start_api(env, api_port, cstack.logs / "api-doomed.log")
    key = {"Idempotency-Key": "chaos-mid-create"}

    def create() -> None:
        try:
            httpx.post(
                f"http://127.0.0.1:{api_port}/v1/fine_tuning/jobs",
                json=job_body(cstack, fid, 3),
                headers=key,
                timeout=60,
            )
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=create, daemon=True)
    t.start()
    try:
        new = wait_for(lambda: set(all_job_ids(cstack)) - before, 30, "the record", poll=0.02)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=10)
        fault.injected += 1
    finally:
        stack.stop(doomed)
        blackhole.close()
    t.join(timeout=30)
    (job_id,) = new
    assert record(cstack, job_id)["status"] == "queued"
    with client(cstack) as c:  # the client retries through the healthy API
        again = c.post("/fine_tuning/jobs", json=job_body(cstack, fid, 3), headers=key)
    assert again.status_code == 200 and again.json()["id"] == job_id
    assert again.headers["Idempotent-Replayed"] == "true"
    rec = wait_status(cstack, job_id, TERMINAL)
    assert rec["status"] == "succeeded" and rec["attempt"] == "1", (rec.get("error"), rec)
    assert any("no message in the broker" in m for m in events(cstack, job_id))
    _done(fault, cstack, [job_id], before)
