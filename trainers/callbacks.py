"""The bridge from a transformers ``Trainer`` to the job's reporter.

Every trainer in posttrain adds ``ReportingCallback``: it forwards logged
metrics, announces each saved checkpoint (after the save has finished, so a
checkpoint the record names always exists, and is marked complete so a
retry never resumes from a torn one), forces a save at the last step so
every run ends with a downloadable checkpoint, and on a pause request saves and
stops at the next step boundary.

Counters live in the trainer's own ``TrainerState``, which every checkpoint saves
and every resume restores, so they continue across pause/resume and crash/retry:
``trained_tokens`` is ``state.num_input_tokens_seen`` (non-padding input tokens,
counted by transformers when the runner sets ``include_num_input_tokens_seen``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trainers.checkpoints import mark_complete
from trainers.plan import RunPlan
from trainers.reporting import PauseRequest, Reporter

# Keys in a step's logs that are not that step's metrics. transformers adds the run's
# wall time and throughput to every step once it counts tokens; TRL's ``num_tokens``
# (and ``eval_num_tokens``) restart at 0 on every resume, ``trained_tokens`` does not.
_NOT_STEP_METRICS = frozenset(
    {
        "num_tokens",
        "eval_num_tokens",
        "num_input_tokens_seen",
        "train_runtime",
        "train_tokens_per_second",
    }
)


class ReportingCallback(TrainerCallback):
    def __init__(self, plan: RunPlan, reporter: Reporter, pause: PauseRequest | None = None):
        self.plan, self.reporter = plan, reporter
        self.pause = pause or PauseRequest()
        self.paused_at: int | None = None
        self.last_logs: dict[str, Any] = {}
        self.trained_tokens = 0

    def _count(self, state) -> int:
        self.trained_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        return self.trained_tokens

    def on_train_begin(self, args, state, control, **kwargs):
        self._count(state)
        if state.global_step:
            self.reporter.event(
                f"Resumed from checkpoint at step {state.global_step}", step=state.global_step
            )
        self.reporter.event(f"Training for {state.max_steps} steps", total_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "train_loss" in logs:  # the trainer's closing summary, not a step
            self.reporter.event(
                f"Training finished in {logs.get('train_runtime', float('nan')):.1f} s, "
                f"mean loss {logs['train_loss']:.4f}",
                **logs,
            )
            return
        logs = {k: v for k, v in logs.items() if k not in _NOT_STEP_METRICS}
        if not logs:
            return
        self.last_logs.update(logs)
        if any(k.startswith("eval_") for k in logs) and "loss" not in logs:
            shown = "reward" if "eval_reward" in logs else "loss"
            self.reporter.event(
                f"Validation at step {state.global_step}: "
                f"{shown}={logs.get('eval_' + shown, float('nan')):.4f}",
                **logs,
            )
            return
        self.reporter.log(state.global_step, state.max_steps, logs, self._count(state))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
        elif self.pause.requested:
            control.should_save = control.should_training_stop = True
            self.paused_at = state.global_step

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        mark_complete(ckpt)
        final = state.global_step >= state.max_steps
        self.reporter.checkpoint(state.global_step, self.plan.relative(ckpt), self.last_logs, final)
