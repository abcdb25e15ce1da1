"""A crashed worker or training process never loses a job: it resumes from its checkpoint."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests import redis_server
from tests.e2e.conftest import start_stack
from tests.e2e.test_sft_job import DEMO, wait_for

pytestmark = pytest.mark.e2e
RECOVERY_DB = 13


@pytest.fixture(scope="module")
def rstack(tmp_path_factory):
    st = start_stack(
        tmp_path_factory.mktemp("recovery"),
        redis_server.url(RECOVERY_DB),
        POSTTRAIN_LEASE_SECONDS="3",
        POSTTRAIN_HEARTBEAT_SECONDS="0.5",
    )
    try:
        yield st
    finally:
        st.stop()


def _submit(st, n_epochs: int) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=f"{st.base_url}/v1", timeout=30)
    with DEMO.open("rb") as fh:
        fid = c.post(
            "/files", files={"file": ("demo.jsonl", fh)}, data={"purpose": "fine-tune"}
        ).json()["id"]
    hp = {"n_epochs": n_epochs, "batch_size": 8, "learning_rate": 5e-3}
    job = c.post(
        "/fine_tuning/jobs",
        json={
            "model": str(st.model_dir),
            "training_file": fid,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        },
    ).json()
    return c, job["id"]


def _after_first_checkpoint(c: httpx.Client, job_id: str) -> int:
    ckpts = wait_for(
        lambda: c.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"],
        120,
        "a first checkpoint",
        poll=0.1,
    )
    return ckpts[-1]["step_number"]


def _messages(c: httpx.Client, job_id: str) -> list[str]:
    return [
        e["message"]
        for e in c.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    ]


def _wait_end(c: httpx.Client, job_id: str) -> dict:
    return wait_for(
        lambda: (
            (j := c.get(f"/fine_tuning/jobs/{job_id}").json())["status"]
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        240,
        "the job to end",
    )


def test_killed_training_process_is_retried_and_resumes(rstack):
    c, job_id = _submit(rstack, n_epochs=30)
    step = _after_first_checkpoint(c, job_id)
    pid = int(rstack.redis.hget(f"posttrain:job:{job_id}", "pid"))
    # A save the kill interrupted: newer than any real checkpoint, and half-written.
    torn = rstack.data_dir / "jobs" / job_id / "output" / f"checkpoint-{step + 1000}"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"\0" * 100)
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    job = _wait_end(c, job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    msgs = _messages(c, job_id)
    assert any("ended unexpectedly (signal 9); retrying" in m for m in msgs)
    assert any(m.startswith("Resumed from checkpoint at step") for m in msgs)
    assert not torn.exists()  # the retry skipped and removed it


def test_a_retry_does_not_need_the_training_file_any_more(rstack):
    """A job keeps its own link to its files from its first start: the user deleting (or
    the expiry sweep removing) the file afterwards cannot make its retry fail."""
    c, job_id = _submit(rstack, n_epochs=30)
    _after_first_checkpoint(c, job_id)
    file_id = c.get(f"/fine_tuning/jobs/{job_id}").json()["training_file"]
    assert c.delete(f"/files/{file_id}").status_code == 200
    assert c.get(f"/files/{file_id}").status_code == 404
    pid = int(rstack.redis.hget(f"posttrain:job:{job_id}", "pid"))
    os.kill(pid, signal.SIGKILL)
    job = _wait_end(c, job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert any(m.startswith("Resumed from checkpoint at step") for m in _messages(c, job_id))


def test_killed_worker_loses_no_job(rstack):
    c, job_id = _submit(rstack, n_epochs=30)
    _after_first_checkpoint(c, job_id)
    pid = int(rstack.redis.hget(f"posttrain:job:{job_id}", "pid"))
    os.killpg(rstack.worker.pid, signal.SIGKILL)  # the whole worker, as a lost machine
    rstack.worker.wait(timeout=10)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the orphaned trainer to die")
    assert c.get(f"/fine_tuning/jobs/{job_id}").json()["status"] == "running"  # lease still live
    rstack.start_worker("e2e-replacement")
    job = _wait_end(c, job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    msgs = _messages(c, job_id)
    assert any(m.startswith("Worker lost after attempt 1; job re-queued") for m in msgs)
    assert any(m.startswith("Resumed from checkpoint at step") for m in msgs)


def test_resume_is_refused_unless_the_job_is_paused(rstack):
    """Only paused -> queued is reachable through the API (issue 10, item 1): a resume of a
    running job used to re-queue it, killing its live trainer and running a second one."""
    c, job_id = _submit(rstack, n_epochs=100)
    wait_for(
        lambda: c.get(f"/fine_tuning/jobs/{job_id}").json()["status"] == "running", 60, "running"
    )
    fence = rstack.redis.hget(f"posttrain:job:{job_id}", "fence")
    r = c.post(f"/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f"job {job_id} is running and cannot be resumed"
    _after_first_checkpoint(c, job_id)
    assert c.post(f"/fine_tuning/jobs/{job_id}/pause").status_code == 200
    r = c.post(f"/fine_tuning/jobs/{job_id}/resume")  # still pausing (or already paused)
    status = c.get(f"/fine_tuning/jobs/{job_id}").json()["status"]
    assert r.status_code == 400 or status != "pausing"
    if r.status_code == 400:
        assert "is pausing and cannot be resumed" in r.json()["error"]["message"]
    wait_for(
        lambda: c.get(f"/fine_tuning/jobs/{job_id}").json()["status"] == "paused", 120, "paused"
    )
    rec = rstack.redis.hgetall(f"posttrain:job:{job_id}")
    assert rec["fence"] == fence and rec["attempt"] == "0"  # one claim, never re-queued
    assert c.post(f"/fine_tuning/jobs/{job_id}/resume").status_code == 200
    assert c.post(f"/fine_tuning/jobs/{job_id}/cancel").status_code == 200


# ---- an eval run whose worker is killed mid-run
ROWS = 120
CRITERIA = 6  # string checks per row: each grade is its own bounded child (~10 ms)


def _group_alive(pgid: int) -> bool:
    """Any process (not a zombie) left in process group ``pgid``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, _ppid, pgrp = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _all_items(c: httpx.Client, path: str) -> list[dict]:
    items, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = c.get(f"{path}/output_items", params=params).json()
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def test_killed_worker_resumes_an_eval_run_grading_each_row_once(rstack):
    """SIGKILL the whole worker (its grading process too) once the run's progress events
    say a fifth of the rows are stored; a new worker resumes the run after its lease
    runs out, and every row is graded and stored once: the rows stored before the kill
    keep their output items, and none is graded again."""
    c = httpx.Client(base_url=f"{rstack.base_url}/v1", timeout=30)
    check = {"type": "string_check", "input": "{{sample.output_text}}", "operation": "eq"}
    ev = c.post(
        "/evals",
        json={
            "name": "slow enough",
            "data_source_config": {
                "type": "custom",
                "item_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                "include_sample_schema": True,
            },
            "testing_criteria": [
                {**check, "name": f"c{k}", "reference": "{{item.a}}"} for k in range(CRITERIA)
            ],
        },
    ).json()["id"]
    content = [
        {"item": {"a": f"a{i}"}, "sample": {"output_text": "no" if i % 5 == 0 else f"a{i}"}}
        for i in range(ROWS)
    ]
    source = {"type": "file_content", "content": content}
    run_id = c.post(
        f"/evals/{ev}/runs", json={"data_source": {"type": "jsonl", "source": source}}
    ).json()["id"]
    path = f"/evals/{ev}/runs/{run_id}"

    def events() -> list[dict]:
        return c.get(f"{path}/events", params={"limit": 1000}).json()["data"]

    wait_for(
        lambda: any(e["type"] == "progress" and e["data"]["done"] >= ROWS // 5 for e in events()),
        90,
        "a fifth of the rows graded",
        poll=0.05,
    )
    os.killpg(rstack.worker.pid, signal.SIGKILL)  # the worker, its pool and grading process
    rstack.worker.wait(timeout=10)
    wait_for(lambda: not _group_alive(rstack.worker.pid), 10, "the worker's processes to die")
    before = {i["id"]: i for i in _all_items(c, path)}
    assert 0 < len(before) < ROWS, len(before)  # the kill landed mid-run
    assert c.get(path).json()["status"] == "in_progress"  # its lease has not run out yet
    rstack.start_worker("e2e-eval-replacement")
    run = wait_for(
        lambda: (r := c.get(path).json())["status"] in ("completed", "failed", "canceled") and r,
        120,
        "the run to finish",
    )
    assert run["status"] == "completed", run["error"]
    failed = len(range(0, ROWS, 5))
    assert run["result_counts"] == {
        "total": ROWS, "errored": 0, "failed": failed, "passed": ROWS - failed,
    }  # fmt: skip
    after = _all_items(c, path)
    assert sorted(i["datasource_item_id"] for i in after) == list(range(ROWS))
    assert len({i["id"] for i in after}) == ROWS
    kept = {i["id"]: i for i in after if i["id"] in before}
    assert kept == before  # the rows stored before the kill, as they were (created_at too)
    rec = rstack.redis.hgetall(f"posttrain:evalrun:{run_id}")
    assert rec["progress"] == str(ROWS) and rec.get("regraded", "0") == "0"  # each once
    said = events()
    kinds = [e["type"] for e in said]
    assert kinds.count("started") == kinds.count("requeued") == kinds.count("resumed") == 1
    (resumed,) = [e for e in said if e["type"] == "resumed"]
    assert resumed["data"]["stored"] == len(before) and resumed["data"]["attempt"] == 2
    assert resumed["data"]["worker"].startswith("e2e-eval-replacement@")
    (started,) = [e for e in said if e["type"] == "started"]
    (requeued,) = [e for e in said if e["type"] == "requeued"]
    assert requeued["data"] == {"worker": started["data"]["worker"], "stored": len(before)}
    assert kinds[0] == "completed" and said[0]["data"]["regraded"] == 0
