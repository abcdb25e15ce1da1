"""Report lines from a training process become job-record updates in Redis."""

from __future__ import annotations

import json

import pytest

from trainers.reporting import Reporter
from workers.ingest import METRIC_EVENTS, ReportIngest
from workers.store import JobStatus


def _feed(store, reporter: Reporter) -> ReportIngest:
    rec = ReportIngest(store, "ftjob-r", "/models/tiny")
    for msg in reporter.sent:
        rec.handle_line(msg.model_dump_json())
    return rec


def test_logs_checkpoints_and_results_reach_the_record(store):
    store.create("ftjob-r", "{}", JobStatus.running)
    rep = Reporter()
    rep.log(1, 2, {"loss": 2.0, "learning_rate": 1e-3}, trained_tokens=100)
    rep.log(2, 2, {"loss": 1.0, "mean_token_accuracy": 0.5}, trained_tokens=200)
    rep.checkpoint(2, "jobs/ftjob-r/output/checkpoint-2", {}, final=True)
    rep.result(2, 200, "jobs/ftjob-r/output/checkpoint-2")
    out = _feed(store, rep).outcome
    assert out.result.trained_tokens == 200 and out.checkpoints == 1
    assert store.get("ftjob-r")["trained_tokens"] == "200"
    rows, _ = store.metrics("ftjob-r", None, 10)
    assert [r["loss"] for r in rows] == [2.0, 1.0]
    (ckpt,) = store.checkpoints("ftjob-r")
    # checkpoint metrics carry OpenAI's names, filled from the latest log line
    assert ckpt["metrics"] == {"step": 2, "train_loss": 1.0, "train_mean_token_accuracy": 0.5}
    assert ckpt["fine_tuned_model_checkpoint"] == "ft:tiny:ftjob-r:ckpt-step-2"


def test_a_trainer_error_reaches_the_outcome(store):
    store.create("ftjob-r", "{}", JobStatus.running)
    rec = ReportIngest(store, "ftjob-r", "m")
    rec.handle_line('{"type": "error", "code": "x", "message": "boom"}')
    assert rec.outcome.error == {"code": "x", "message": "boom", "param": None}
    assert not rec.outcome.invalid


@pytest.mark.parametrize(
    "line,fragment",
    [
        ("not json", "Invalid JSON"),
        ('{"type": "no_such_message"}', "no_such_message"),
        (
            '{"type": "log", "step": 1, "total_steps": 2, "metrics": {"loss": "high"}}',
            "metrics.loss",
        ),
        ('{"type": "event", "message": "x", "data": {"nested": {"a": 1}}}', "data.nested"),
        ('{"type": "checkpoint", "step": -1, "path": "p"}', "step"),
    ],
)
def test_an_invalid_report_fails_the_run_and_writes_nothing(store, line, fragment):
    store.create("ftjob-r", "{}", JobStatus.running)
    rec = ReportIngest(store, "ftjob-r", "m")
    rec.handle_line(line)
    rec.handle_line('{"type": "error", "code": "x", "message": "later"}')  # the first cause wins
    assert rec.outcome.invalid and rec.outcome.error["code"] == "invalid_report"
    assert fragment in rec.outcome.error["message"]
    assert (
        store.events("ftjob-r", None, 10)[0] == [] and store.metrics("ftjob-r", None, 10)[0] == []
    )


def test_long_runs_emit_bounded_metrics_events_but_keep_every_step(store):
    store.create("ftjob-r", "{}", JobStatus.running)
    total = 3 * METRIC_EVENTS + 7
    rep = Reporter()
    for step in range(1, total + 1):
        rep.log(step, total, {"loss": 1.0 / step}, trained_tokens=step)
    _feed(store, rep)
    metric_events = [
        f for _, f in store.events("ftjob-r", None, 10 * total)[0] if f["type"] == "metrics"
    ]
    assert METRIC_EVENTS // 2 <= len(metric_events) <= METRIC_EVENTS + 2
    steps = [json.loads(f["data"])["step"] for f in metric_events]
    assert steps[0] == total and steps[-1] == 1  # newest first; first and last kept
    rows, more = store.metrics("ftjob-r", None, 10 * total)
    assert len(rows) == total and not more
