"""Report lines from a training process become job-record updates in Redis."""

from __future__ import annotations

import json

from trainers.reporting import Reporter
from workers.reporter import METRIC_EVENTS, RecordReporter
from workers.store import JobStatus


def _feed(store, reporter: Reporter) -> RecordReporter:
    rec = RecordReporter(store, "ftjob-r", "/models/tiny")
    for msg in reporter.sent:
        rec.handle_line(json.dumps(msg))
    return rec


def test_logs_checkpoints_and_results_reach_the_record(store):
    store.create("ftjob-r", "{}", JobStatus.running)
    rep = Reporter()
    rep.log(1, 2, {"loss": 2.0, "learning_rate": 1e-3, "num_tokens": 100.0})
    rep.log(2, 2, {"loss": 1.0, "mean_token_accuracy": 0.5, "num_tokens": 200.0})
    rep.checkpoint(2, "jobs/ftjob-r/output/checkpoint-2", {}, final=True)
    rep.result(200, "jobs/ftjob-r/output/checkpoint-2")
    out = _feed(store, rep).outcome
    assert out.result["trained_tokens"] == 200 and out.checkpoints == 1
    assert store.get("ftjob-r")["trained_tokens"] == "200"
    rows, _ = store.metrics("ftjob-r", None, 10)
    assert [r["loss"] for r in rows] == [2.0, 1.0]
    (ckpt,) = store.checkpoints("ftjob-r")
    # checkpoint metrics carry OpenAI's names, filled from the latest log line
    assert ckpt["metrics"] == {"step": 2, "train_loss": 1.0, "train_mean_token_accuracy": 0.5}
    assert ckpt["fine_tuned_model_checkpoint"] == "ft:tiny:ftjob-r:ckpt-step-2"


def test_unreadable_lines_are_skipped(store):
    store.create("ftjob-r", "{}", JobStatus.running)
    rec = RecordReporter(store, "ftjob-r", "m")
    rec.handle_line("not json")
    rec.handle_line('{"type": "no_such_message"}')
    rec.handle_line('{"type": "error", "code": "x", "message": "boom"}')
    assert rec.outcome.error == {"code": "x", "message": "boom", "param": None}


def test_long_runs_emit_bounded_metrics_events_but_keep_every_step(store):
    store.create("ftjob-r", "{}", JobStatus.running)
    total = 3 * METRIC_EVENTS + 7
    rep = Reporter()
    for step in range(1, total + 1):
        rep.log(step, total, {"loss": 1.0 / step})
    _feed(store, rep)
    metric_events = [
        f for _, f in store.events("ftjob-r", None, 10 * total)[0] if f["type"] == "metrics"
    ]
    assert METRIC_EVENTS // 2 <= len(metric_events) <= METRIC_EVENTS + 2
    steps = [json.loads(f["data"])["step"] for f in metric_events]
    assert steps[0] == total and steps[-1] == 1  # newest first; first and last kept
    rows, more = store.metrics("ftjob-r", None, 10 * total)
    assert len(rows) == total and not more
