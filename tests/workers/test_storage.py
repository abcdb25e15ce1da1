"""Bounded storage on a real Redis: metrics keyed by step, bounded streams, checkpoint
retention (record and files), and deleting a finished job's keys."""

from __future__ import annotations

import json

import pytest

from trainers.contract.checkpoints import mark_complete, resumable_checkpoint
from trainers.reporting import Reporter
from workers.ingest import ReportIngest
from workers.store import InvalidTransition, JobNotFound, JobStatus, JobStore

S = JobStatus
JOB = "ftjob-st"


def _running(store: JobStore, job_id: str = JOB) -> str:
    store.create(job_id, "{}", S.running)
    return job_id


# ---- metrics


def test_metrics_entries_are_keyed_by_step_and_paged_by_a_stream_id_cursor(store):
    _running(store)
    for step in range(1, 21):
        store.add_metrics(JOB, step, {"loss": 1.0 / step})
    ids = [sid for sid, _ in store.r.xrange(f"test:job:{JOB}:metrics", "-", "+", count=3)]
    assert ids == ["1-1", "2-1", "3-1"]
    rows, more = store.metrics(JOB, after_step=17, limit=5)
    assert [r["step"] for r in rows] == [18, 19, 20] and not more
    rows, more = store.metrics(JOB, after_step=None, limit=2)
    assert [r["step"] for r in rows] == [1, 2] and more
    assert store.metrics(JOB, after_step=-5, limit=1)[0][0]["step"] == 1


def test_a_resumed_run_replaces_rerun_steps_and_drops_the_lost_attempts_later_steps(store):
    _running(store)
    for step in range(1, 46):  # attempt 1 reaches step 45, its last checkpoint is step 40
        store.add_metrics(JOB, step, {"loss": 1.0, "attempt": 1})
    for step in range(41, 44):  # attempt 2 resumes at 40 and dies at 43
        store.add_metrics(JOB, step, {"loss": 0.5, "attempt": 2})
    rows, more = store.metrics(JOB, None, 1000)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 44)) and not more  # unique, ordered, nothing after 43
    assert {r["attempt"] for r in rows if r["step"] > 40} == {2}
    store.add_metrics(JOB, 44, {"loss": 0.25, "attempt": 3})  # appends again after a rewind
    assert store.metrics(JOB, 42, 10)[0][-1] == {"step": 44, "loss": 0.25, "attempt": 3}


def test_a_metrics_report_applied_twice_leaves_one_entry(store):
    _running(store)
    for step in (1, 2, 3, 3):
        store.add_metrics(JOB, step, {"loss": float(step)})
    assert [r["step"] for r in store.metrics(JOB, None, 10)[0]] == [1, 2, 3]


def test_a_stream_of_an_earlier_release_still_reads_and_appends(store):
    _running(store)
    key = f"test:job:{JOB}:metrics"
    for step in (1, 2, 3):  # auto ids, as the earlier release wrote them
        store.r.xadd(key, {"step": step, "values": json.dumps({"loss": 1.0})})
    store.add_metrics(JOB, 4, {"loss": 0.5})
    rows, more = store.metrics(JOB, after_step=2, limit=5)
    assert [r["step"] for r in rows] == [3, 4] and not more


def test_streams_are_bounded(redis_client):
    store = JobStore(redis_client, "test:", events_maxlen=100, metrics_maxlen=100)
    _running(store)
    for step in range(1, 1001):
        store.add_metrics(JOB, step, {"loss": 1.0})
        store.add_event(JOB, f"event {step}")
    # MAXLEN ~ trims whole macro-nodes: the bound is approximate but holds
    assert 100 <= redis_client.xlen(f"test:job:{JOB}:metrics") < 300
    assert 100 <= redis_client.xlen(f"test:job:{JOB}:events") < 300
    rows, _ = store.metrics(JOB, None, 1000)
    assert rows[-1]["step"] == 1000 and rows[0]["step"] > 700  # the oldest steps went


def test_writes_for_a_job_whose_record_is_gone_are_dropped(store):
    assert store.add_event("ftjob-gone", "late") is None
    store.add_metrics("ftjob-gone", 1, {"loss": 1.0})
    assert store.add_checkpoint("ftjob-gone", {"step": 1, "final": False}) == []
    assert store.r.keys("test:job:ftjob-gone*") == []


# ---- checkpoint retention


def _save(data_dir, step: int, complete: bool = True) -> str:
    path = data_dir / "jobs" / JOB / "output" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 16)
    if complete:
        mark_complete(path)
    return str(path.relative_to(data_dir))


def _on_disk(data_dir) -> list[int]:
    out = data_dir / "jobs" / JOB / "output"
    return sorted(int(p.name.split("-")[1]) for p in out.iterdir())


def _report(rec: ReportIngest, step: int, path: str, final: bool = False) -> None:
    rep = Reporter()
    rep.checkpoint(step, path, {"loss": 1.0 / step}, final=final)
    rec.handle_line(rep.sent[0].model_dump_json())


def test_retention_keeps_the_newest_n_plus_the_final_one_in_the_record_and_on_disk(store, tmp_path):
    _running(store)
    rec = ReportIngest(store, JOB, "m", data_dir=tmp_path, keep_checkpoints=2)
    for step in (10, 20, 30):
        _report(rec, step, _save(tmp_path, step))
    assert [c["step"] for c in store.checkpoints(JOB)] == [20, 30]
    assert _on_disk(tmp_path) == [20, 30]
    # a save in progress (newer than every reported one, not yet marked) is never touched
    _save(tmp_path, 40, complete=False)
    _report(rec, 35, _save(tmp_path, 35), final=True)
    assert _on_disk(tmp_path) == [20, 30, 35, 40]
    _report(rec, 45, _save(tmp_path, 45))
    _report(rec, 50, _save(tmp_path, 50))
    assert [c["step"] for c in store.checkpoints(JOB)] == [35, 45, 50]  # final kept + 2
    assert _on_disk(tmp_path) == [35, 45, 50]  # the torn 40 went once it was behind


def test_the_checkpoint_a_resume_needs_is_never_pruned(store, tmp_path):
    _running(store)
    rec = ReportIngest(store, JOB, "m", data_dir=tmp_path, keep_checkpoints=1)
    for step in (5, 10, 15):
        _report(rec, step, _save(tmp_path, step))
        out = tmp_path / "jobs" / JOB / "output"
        assert resumable_checkpoint(out).name == f"checkpoint-{step}"
        assert [c["step"] for c in store.checkpoints(JOB)] == [step]
    # a checkpoint that was complete but never reported (the trainer died before its report
    # was applied) is newer than the record's and is what a retry resumes from: kept
    _save(tmp_path, 20)
    assert resumable_checkpoint(tmp_path / "jobs" / JOB / "output").name == "checkpoint-20"
    assert _on_disk(tmp_path) == [15, 20]


def test_leftovers_of_an_earlier_attempt_are_swept_and_a_repeated_report_is_one_entry(
    store, tmp_path
):
    _running(store)
    rec = ReportIngest(store, JOB, "m", data_dir=tmp_path, keep_checkpoints=2)
    orphan = _save(tmp_path, 3)  # complete on disk, its report lost with its worker
    assert orphan
    _report(rec, 10, path10 := _save(tmp_path, 10))
    _report(rec, 10, path10)  # the same report applied again (held through an outage)
    assert [c["step"] for c in store.checkpoints(JOB)] == [10]
    assert _on_disk(tmp_path) == [10]


def test_keep_zero_keeps_every_checkpoint(store, tmp_path):
    _running(store)
    rec = ReportIngest(store, JOB, "m", data_dir=tmp_path, keep_checkpoints=0)
    for step in (1, 2, 3, 4):
        _report(rec, step, _save(tmp_path, step))
    assert [c["step"] for c in store.checkpoints(JOB)] == [1, 2, 3, 4]
    assert _on_disk(tmp_path) == [1, 2, 3, 4]


# ---- deleting a finished job


@pytest.mark.parametrize("status", [S.queued, S.running, S.pausing, S.paused])
def test_an_unfinished_job_cannot_be_deleted(store, status):
    store.create(JOB, "{}", status)
    with pytest.raises(InvalidTransition) as exc:
        store.delete_job(JOB)
    assert exc.value.current == status and store.exists(JOB)


def test_deleting_a_finished_job_removes_every_key_it_owns(store):
    store.create(JOB, "{}", S.running, idempotency_key="k-1")
    store.remember_idempotency("k-1", JOB, "h")
    store.create("ftjob-other", "{}", S.running)
    store.add_event(JOB, "hello")
    store.add_metrics(JOB, 1, {"loss": 1.0})
    store.add_samples(JOB, 1, [{"prompt": "p", "completion": "c"}])
    store.add_checkpoint(JOB, {"step": 1, "final": True})
    store.transition(JOB, S.failed, error={"code": "x", "message": "y", "param": None})
    store.delete_job(JOB)
    assert store.r.keys(f"test:*{JOB}*") == []
    assert store.remember_idempotency("k-1", "ftjob-new", "h") is None  # the key is free
    assert store.list_ids(None, 10)[0] == ["ftjob-other"]
    with pytest.raises(JobNotFound):
        store.delete_job(JOB)
