"""Turns the training process's report lines into job-record updates.

The training process writes one typed message per line to a pipe
(``trainers.contract.messages``, parsed here with the same models). This module is the
only place those messages meet Redis. A line that is not a valid message ends
the run as failed with ``invalid_report`` (``RunOutcome.invalid``) rather than
crashing the supervisor or storing something the API cannot serve; an invalid samples
line is only logged and skipped, since samples are for reading, never for running.
Metrics go to the metrics stream and as ``metrics`` events, checkpoints to the
checkpoint list, samples of an RL job's rollouts to its samples stream, progress to the
record (trained tokens, estimated end).

Checkpoint retention happens here too: a checkpoint report arrives only after its
save returned and the checkpoint was marked complete, so that is when the older
ones beyond the job's ``keep_checkpoints`` are dropped from the record (one Lua
call, ``JobStore.add_checkpoint``) and then their directories deleted
(``trainers.contract.checkpoints.remove_checkpoints``). Record first, files second: the API
never lists a checkpoint whose files are already gone. A job whose spec names an eval
gets a run of it per checkpoint (``on_checkpoint``: ``workers.ckptevals``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.contract import messages as m
from trainers.contract.checkpoints import remove_checkpoints
from workers.store import JobStore, new_id

log = logging.getLogger(__name__)

# TRL/transformers log keys -> OpenAI checkpoint metric names.
_CKPT_METRICS = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
    # extensions for reward-based methods (OpenAI's checkpoint object has no reward field)
    "reward": "train_mean_reward",
    "eval_reward": "valid_mean_reward",
}


METRIC_EVENTS = 1000


@dataclass
class RunOutcome:
    """What the supervisor learnt from the reports of one run."""

    result: m.Result | None = None
    paused: m.Paused | None = None
    lines: int = 0
    error: dict[str, Any] | None = None
    invalid: bool = False  # a line was not a valid report message
    skipped_samples: int = 0  # invalid samples lines, skipped without failing the run
    last_metrics: dict[str, float] = field(default_factory=dict)
    checkpoints: int = 0


def _is_samples(line: str) -> bool:
    """Whether an invalid report line is (or starts as) a samples report."""
    try:
        return json.loads(line).get("type") == "samples"
    except (ValueError, AttributeError, RecursionError):  # not JSON, or cut short
        return line.lstrip().startswith(('{"type":"samples"', '{"type": "samples"'))


def model_label(model: str) -> str:
    """The model's name for ``ft:`` identifiers: a local path contributes its last part, a
    fine-tuned model its base's label."""
    if model.startswith("ft:") and len(model.split(":")) > 2:
        return model.split(":")[1]
    return model.rstrip("/").rsplit("/", 1)[-1] if model.startswith(("/", ".")) else model


class ReportIngest:
    """``data_dir`` and ``keep_checkpoints`` (0 = keep all) enable checkpoint retention."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        model_name: str,
        *,
        data_dir: Path | None = None,
        keep_checkpoints: int = 0,
        on_checkpoint: Callable[[dict], Any] | None = None,
    ):
        self.store, self.job_id, self.model_name = store, job_id, model_name
        self.on_checkpoint = on_checkpoint  # the job's eval per checkpoint (workers.ckptevals)
        self.data_dir, self.keep = data_dir, keep_checkpoints if data_dir is not None else 0
        self.outcome = RunOutcome()
        self._started = time.time()
        self._first_step: int | None = None

    def handle_line(self, line: str) -> None:
        """Apply one report line; an invalid one marks the run failed (once), except an
        invalid samples line, which is skipped (``_skip_samples``)."""
        try:
            msg = m.parse_report(line)
        except m.InvalidReport as exc:
            if _is_samples(line):
                self._skip_samples(exc)
                return
            log.warning("job %s: invalid report line: %s", self.job_id, exc)
            if not self.outcome.invalid:
                self.outcome.invalid = True
                self.outcome.error = {
                    "code": "invalid_report",
                    "message": f"the training process sent an invalid report: {exc}",
                    "param": None,
                }
            return
        getattr(self, f"_on_{msg.type}")(msg)
        self.outcome.lines += 1

    def _skip_samples(self, exc: m.InvalidReport) -> None:
        """Samples are for reading, never for running: a report of them that does not
        validate is logged and dropped, and the job goes on (its events say so once)."""
        log.warning("job %s: skipped an invalid samples report: %s", self.job_id, exc)
        self.outcome.skipped_samples += 1
        if self.outcome.skipped_samples == 1:
            self.store.add_event(
                self.job_id,
                "A samples report of the training process was invalid and skipped; training "
                "goes on (the worker's log says why)",
                level="warn",
            )

    def _on_samples(self, msg: m.Samples) -> None:
        rows = [r.model_dump(mode="json") for r in msg.rows]
        self.store.add_samples(self.job_id, msg.step, rows)

    def _on_event(self, msg: m.Event) -> None:
        self.store.add_event(self.job_id, msg.message, level=msg.level, data=msg.data)

    def _on_log(self, msg: m.Log) -> None:
        step, total = msg.step, msg.total_steps
        values = {k: v for k, v in msg.metrics.items() if v is not None}
        self.outcome.last_metrics.update(values)
        self.store.add_metrics(self.job_id, step, values)
        if self._wants_event(step, total):
            data = {"step": step, "total_steps": total, **values}
            text = f"Step {step}/{total}"
            if "loss" in values:
                text += f": training loss={values['loss']:.4f}"
            self.store.add_event(self.job_id, text, type="metrics", data=data)
        fields: dict[str, Any] = {"step": step, "total_steps": total}
        if msg.trained_tokens is not None:
            fields["trained_tokens"] = msg.trained_tokens
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

    def _on_checkpoint(self, msg: m.Checkpoint) -> None:
        step = msg.step
        metrics = {"step": step}
        for src, dst in _CKPT_METRICS.items():
            if msg.metrics.get(src) is not None:
                metrics[dst] = msg.metrics[src]
            elif src in self.outcome.last_metrics:
                metrics[dst] = self.outcome.last_metrics[src]
        ckpt_id = new_id("ftckpt")
        meta = {
            "id": ckpt_id,
            "step": step,
            "created_at": int(time.time()),
            "path": msg.path,
            "metrics": metrics,
            "final": msg.final,
            "fine_tuned_model_checkpoint": (
                f"ft:{model_label(self.model_name)}:{self.job_id}:ckpt-step-{step}"
            ),
        }
        pruned = self.store.add_checkpoint(self.job_id, meta, keep=self.keep)
        self.outcome.checkpoints += 1
        if self.keep:
            self._remove_files(msg.path, pruned)
        self.store.add_event(
            self.job_id,
            f"Checkpoint created at step {step}",
            data={"checkpoint": ckpt_id, "step": step},
        )
        if self.on_checkpoint is not None:
            try:
                self.on_checkpoint(meta)
            except Exception:  # the training goes on; the job says what was missed
                log.exception("job %s: no eval run for the checkpoint at %s", self.job_id, step)
                self.store.add_event(  # the details (paths, library text) go to the log only
                    self.job_id,
                    f"No eval run could be started for the checkpoint at step {step}",
                    level="warn",
                )

    def _remove_files(self, new_path: str, pruned: list[dict]) -> None:
        """Delete the directories of checkpoints the record no longer keeps (pruned now, or
        left over by an earlier attempt), never one the record still lists."""
        output_dir = (Path(self.data_dir) / new_path).parent
        kept = {c["step"] for c in self.store.checkpoints(self.job_id)}
        removed = remove_checkpoints(output_dir, kept)
        if pruned:
            log.info("job %s: pruned checkpoints at steps %s", self.job_id, removed)

    def _on_paused(self, msg: m.Paused) -> None:
        self.outcome.paused = msg
        self.store.set_fields(self.job_id, trained_tokens=msg.trained_tokens)

    def _on_result(self, msg: m.Result) -> None:
        self.outcome.result = msg

    def _on_error(self, msg: m.Error) -> None:
        if not self.outcome.invalid:
            self.outcome.error = {"code": msg.code, "message": msg.message, "param": msg.param}
