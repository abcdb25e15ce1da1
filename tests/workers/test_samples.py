"""Samples of an RL job's rollouts: from report lines to the job's bounded stream in Redis."""

from __future__ import annotations

import json

from trainers.reporting import Reporter
from workers.ingest import ReportIngest
from workers.store import JobStatus, JobStore

JOB = "ftjob-s"


def _row(i: int = 0, **extra) -> dict:
    return {
        "prompt": f"<|user|>q{i}<|end|><|assistant|>",
        "completion": f"answer {i}",
        "reward": 1.0,
        "rewards": {"says_answer": 1.0},
        "advantage": 0.5,
        "group": 0,
        "completion_tokens": 3,
        "truncated": False,
        **extra,
    }


def _steps(rows) -> list[int]:
    return [r["step"] for _, r in rows]


def test_rows_page_oldest_first_by_cursor_and_by_step(store):
    store.create(JOB, "{}", JobStatus.running)
    for step in (1, 2, 3):
        assert store.add_samples(JOB, step, [_row(0), _row(1)]) == 2
    rows, more = store.samples(JOB, None, 4)
    assert [sid for sid, _ in rows] == ["1-1", "1-2", "2-1", "2-2"] and more
    assert rows[0][1] == {**_row(0), "step": 1, "created_at": rows[0][1]["created_at"]}
    rest, more = store.samples(JOB, rows[-1][0], 4)
    assert [sid for sid, _ in rest] == ["3-1", "3-2"] and not more
    # one step's rows, and a cursor inside, before or past that step
    assert [sid for sid, _ in store.samples(JOB, None, 10, step=2)[0]] == ["2-1", "2-2"]
    assert [sid for sid, _ in store.samples(JOB, "2-1", 10, step=2)[0]] == ["2-2"]
    assert _steps(store.samples(JOB, "1-1", 10, step=2)[0]) == [2, 2]
    assert store.samples(JOB, "3-1", 10, step=2)[0] == []
    assert store.samples(JOB, None, 10, step=9)[0] == []
    # a cursor whose row is gone (trimmed) still pages on from where it was
    assert _steps(store.samples(JOB, "1-9", 10)[0]) == [2, 2, 3, 3]


def test_a_resumed_attempt_replaces_the_lost_attempts_rows_from_its_step_on(store):
    store.create(JOB, "{}", JobStatus.running)
    for step in (1, 2, 3, 4):
        store.add_samples(JOB, step, [_row(step)])
    store.add_samples(JOB, 3, [_row(30), _row(31)])  # resumed from the checkpoint at 2
    rows, _ = store.samples(JOB, None, 10)
    assert [sid for sid, _ in rows] == ["1-1", "2-1", "3-1", "3-2"]
    assert [r["completion"] for _, r in rows][2:] == ["answer 30", "answer 31"]
    store.add_samples(JOB, 1, [_row(10)])  # back to the start: nothing of the old run left
    assert [sid for sid, _ in store.samples(JOB, None, 10)[0]] == ["1-1"]


def test_the_stream_is_bounded_and_deleted_with_the_job(redis_client):
    store = JobStore(redis_client, "test:", samples_maxlen=100)
    store.create(JOB, "{}", JobStatus.running)
    for step in range(1, 251):
        store.add_samples(JOB, step, [_row(0), _row(1), _row(2), _row(3)])
    # MAXLEN ~ trims whole macro-nodes: the bound is approximate but holds
    assert 100 <= redis_client.xlen(f"test:job:{JOB}:samples") < 300
    rows, _ = store.samples(JOB, None, 1000)
    assert rows[-1][0] == "250-4" and rows[0][1]["step"] > 150  # the oldest steps went
    store.transition(JOB, JobStatus.succeeded)
    store.delete_job(JOB)
    assert redis_client.keys(f"test:job:{JOB}*") == []


def test_samples_of_a_job_whose_record_is_gone_are_dropped(store):
    assert store.add_samples("ftjob-gone", 1, [_row()]) == 0
    assert store.r.keys("test:job:ftjob-gone*") == []


def _ingest(store) -> ReportIngest:
    store.create(JOB, "{}", JobStatus.running)
    return ReportIngest(store, JOB, "m")


def test_a_samples_report_reaches_the_stream(store):
    rec = _ingest(store)
    rep = Reporter()
    rep.samples(7, [_row(0), _row(1, reward=float("nan"), rewards={"says_answer": None})])
    rec.handle_line(rep.sent[0].model_dump_json())
    rows, _ = store.samples(JOB, None, 10)
    assert [sid for sid, _ in rows] == ["7-1", "7-2"]
    assert rows[1][1]["reward"] is None and rows[1][1]["rewards"] == {"says_answer": None}
    assert not rec.outcome.invalid and rec.outcome.lines == 1


BAD_SAMPLES = [
    json.dumps({"type": "samples", "step": 1, "rows": []}),  # no rows
    json.dumps({"type": "samples", "step": 1, "rows": [_row()] * 17}),  # over the cap
    json.dumps({"type": "samples", "step": -1, "rows": [_row()]}),
    json.dumps({"type": "samples", "step": 1, "rows": [{**_row(), "advantage": "high"}]}),
    json.dumps({"type": "samples", "step": 1, "rows": [{**_row(), "extra": 1}]}),
    '{"type":"samples","step":1,"rows":[{"prompt":"cut sh',  # a line torn by a kill
]


def test_an_invalid_samples_report_is_skipped_and_the_run_goes_on(store):
    rec = _ingest(store)
    for line in BAD_SAMPLES:
        rec.handle_line(line)
    rep = Reporter()
    rep.log(1, 2, {"loss": 1.0}, trained_tokens=10)
    rep.samples(2, [_row()])
    for msg in rep.sent:
        rec.handle_line(msg.model_dump_json())
    assert not rec.outcome.invalid and rec.outcome.error is None
    assert rec.outcome.skipped_samples == len(BAD_SAMPLES)
    assert _steps(store.samples(JOB, None, 10)[0]) == [2]  # only the valid one
    assert [r["step"] for r in store.metrics(JOB, None, 10)[0]] == [1]
    warns = [f for _, f in store.events(JOB, None, 10)[0] if f["level"] == "warn"]
    assert len(warns) == 1 and "samples report" in warns[0]["message"]  # said once
    # any other invalid line still fails the run
    rec.handle_line('{"type": "log", "step": -1}')
    assert rec.outcome.invalid and rec.outcome.error["code"] == "invalid_report"
