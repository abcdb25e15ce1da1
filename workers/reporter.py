"""Turns the training process's report lines into job-record updates.

The training process writes one JSON object per line to a pipe (see
``trainers.reporting``). This module is the only place those messages meet
Redis: metrics go to the metrics stream and as ``metrics`` events, checkpoints
to the checkpoint list, progress to the record (trained tokens, estimated end).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from workers.store import JobStore, new_id

log = logging.getLogger(__name__)

# TRL/transformers log keys -> OpenAI checkpoint metric names.
_CKPT_METRICS = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
}


METRIC_EVENTS = 1000


@dataclass
class RunOutcome:
    """What the supervisor learnt from the reports of one run."""

    result: dict[str, Any] | None = None
    paused: dict[str, Any] | None = None
    lines: int = 0
    error: dict[str, Any] | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    checkpoints: int = 0


def model_label(model: str) -> str:
    """The model's name for ``ft:`` identifiers: a local path contributes its last part."""
    return model.rstrip("/").rsplit("/", 1)[-1] if model.startswith(("/", ".")) else model


class RecordReporter:
    def __init__(self, store: JobStore, job_id: str, model_name: str):
        self.store, self.job_id, self.model_name = store, job_id, model_name
        self.outcome = RunOutcome()
        self._started = time.time()
        self._first_step: int | None = None

    def handle_line(self, line: str) -> None:
        try:
            msg = json.loads(line)
            handler = getattr(self, f"_on_{msg['type']}")
        except (ValueError, KeyError, AttributeError):
            log.warning("job %s: unreadable report line %r", self.job_id, line[:200])
            return
        handler(msg)
        self.outcome.lines += 1

    def _on_event(self, msg: dict) -> None:
        self.store.add_event(
            self.job_id, msg["message"], level=msg.get("level", "info"), data=msg.get("data")
        )

    def _on_log(self, msg: dict) -> None:
        step, total = int(msg["step"]), int(msg.get("total_steps") or 0)
        values = {k: v for k, v in msg["metrics"].items() if isinstance(v, (int, float))}
        self.outcome.last_metrics.update(values)
        self.store.add_metrics(self.job_id, step, values)
        if self._wants_event(step, total):
            data = {"step": step, "total_steps": total, **values}
            text = f"Step {step}/{total}"
            if "loss" in values:
                text += f": training loss={values['loss']:.4f}"
            self.store.add_event(self.job_id, text, type="metrics", data=data)
        fields: dict[str, Any] = {"step": step, "total_steps": total}
        if "num_tokens" in values:
            fields["trained_tokens"] = int(values["num_tokens"])
        eta = self._estimate_finish(step, total)
        if eta:
            fields["estimated_finish"] = eta
        self.store.set_fields(self.job_id, **fields)

    @staticmethod
    def _wants_event(step: int, total: int) -> bool:
        """At most ~METRIC_EVENTS metrics events per run, so they never push the job's
        message events out of the bounded events stream; the metrics stream keeps every step."""
        stride = max(1, -(-total // METRIC_EVENTS))
        return step % stride == 0 or step >= total or step == 1

    def _estimate_finish(self, step: int, total: int) -> int | None:
        if self._first_step is None:
            self._first_step = step
            self._started = time.time()
            return None
        done = step - self._first_step
        if total <= 0 or done <= 0:
            return None
        per_step = (time.time() - self._started) / done
        return int(time.time() + per_step * (total - step))

    def _on_checkpoint(self, msg: dict) -> None:
        step = int(msg["step"])
        metrics = {"step": step}
        for src, dst in _CKPT_METRICS.items():
            if src in msg.get("metrics", {}):
                metrics[dst] = msg["metrics"][src]
            elif src in self.outcome.last_metrics:
                metrics[dst] = self.outcome.last_metrics[src]
        ckpt_id = new_id("ftckpt")
        meta = {
            "id": ckpt_id,
            "step": step,
            "created_at": int(time.time()),
            "path": msg["path"],
            "metrics": metrics,
            "final": bool(msg.get("final")),
            "fine_tuned_model_checkpoint": (
                f"ft:{model_label(self.model_name)}:{self.job_id}:ckpt-step-{step}"
            ),
        }
        self.store.add_checkpoint(self.job_id, meta)
        self.outcome.checkpoints += 1
        self.store.add_event(
            self.job_id,
            f"Checkpoint created at step {step}",
            data={"checkpoint": ckpt_id, "step": step},
        )

    def _on_paused(self, msg: dict) -> None:
        self.outcome.paused = msg

    def _on_result(self, msg: dict) -> None:
        self.outcome.result = msg

    def _on_error(self, msg: dict) -> None:
        self.outcome.error = {
            "code": msg.get("code", "training_error"),
            "message": msg.get("message", "training failed"),
            "param": msg.get("param"),
        }
