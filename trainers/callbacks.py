"""The bridge from a transformers ``Trainer`` to the job's reporter.

Every trainer in posttrain adds ``ReportingCallback``: it forwards logged
metrics, announces each saved checkpoint (after the save has finished, so a
checkpoint the record names always exists, and is marked complete so a
retry never resumes from a torn one), forces a save at the last step so
every run ends with a downloadable checkpoint, and on a pause request saves and
stops at the next step boundary. A method whose iteration spans several optimizer
steps (EGPO: a half and a full step) sets ``steps_per_iteration`` in its training
arguments; checkpoints and pauses then wait for the iteration's last step. A run
whose fencing token was superseded (``trainers.contract.fencing``) raises ``StaleFence``
before it saves, and never marks a checkpoint complete. With several ranks (under
``accelerate launch``) the ranks agree on a pause at each step end, and only rank 0
marks and reports a checkpoint, once every rank's part of it is on disk.

Counters live in the trainer's own ``TrainerState``, which every checkpoint saves
and every resume restores, so they continue across pause/resume and crash/retry:
``trained_tokens`` is ``state.num_input_tokens_seen`` (non-padding input tokens,
counted by transformers when the runner sets ``include_num_input_tokens_seen``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trainers.contract import fencing
from trainers.contract.checkpoints import checkpoint_dir, mark_complete
from trainers.contract.plan import RunPlan
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


def _distributed():
    """accelerate's process state when the run has several ranks, else ``None``."""
    from accelerate import PartialState

    state = PartialState()
    return state if state.num_processes > 1 else None


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
            runtime = logs.get("train_runtime", float("nan"))
            if self.paused_at is not None:
                what = f"Training paused at step {self.paused_at} after {runtime:.1f} s"
            else:
                what = f"Training finished in {runtime:.1f} s"
            self.reporter.event(f"{what}, mean loss {logs['train_loss']:.4f}", **logs)
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
        elif state.global_step % getattr(args, "steps_per_iteration", 1):
            # inside a multi-step iteration (EGPO's half step): no checkpoint, no pause yet
            control.should_save = False
        elif self._pause_agreed():
            control.should_save = control.should_training_stop = True
            self.paused_at = state.global_step
        if control.should_save:  # a superseded run stops here instead of saving
            fencing.check(self.plan.fence_file, self.plan.fence)

    def _pause_agreed(self) -> bool:
        """Whether to pause now. With several ranks, all of them decide together (a
        request any rank has seen counts), so all stop and save at the same step."""
        requested = self.pause.is_requested()
        dist = _distributed()
        if dist is None:
            return requested
        import torch
        from accelerate.utils import reduce

        return reduce(torch.tensor(float(requested), device=dist.device), "sum").item() > 0

    def on_save(self, args, state, control, **kwargs):
        ckpt = checkpoint_dir(args.output_dir, state.global_step)
        dist = _distributed()
        if dist is not None:  # every rank's part is saved; then rank 0 alone marks and reports
            dist.wait_for_everyone()
            if not dist.is_main_process:
                return
        if not ckpt.is_dir():
            return
        name_base_model(ckpt, self.plan.model_name)
        with fencing.fenced(self.plan.fence_file, self.plan.fence):
            mark_complete(ckpt)
        final = state.global_step >= state.max_steps
        self.reporter.checkpoint(state.global_step, self.plan.relative(ckpt), self.last_logs, final)


def name_base_model(ckpt: Path, name: str | None) -> None:
    """A LoRA checkpoint's ``adapter_config.json`` names its base model by the path peft
    saw (a directory of this server); name it as the job did (``model``: a hub id, a
    model root's directory name, an ``ft:`` model), so the download loads elsewhere."""
    config = ckpt / "adapter_config.json"
    if name is None or not config.is_file():
        return
    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = name
    config.write_text(json.dumps(data, indent=2))


class NonFiniteCallback(TrainerCallback):
    """Stops a run at the first non-finite training loss or gradient norm, before that
    step's checkpoint is saved, and never lets a checkpoint with non-finite weights be
    written: at every step that is about to save, the trainable weights are checked too.

    transformers logs each step's ``loss`` and ``grad_norm`` (the runner sets
    ``logging_steps=1`` and ``logging_nan_inf_filter=False``, so a NaN loss is logged as
    NaN instead of being replaced by the window's mean), and calls ``on_log`` before it
    saves. On a trip the callback cancels the save and stops training; the runner then
    fails the job with ``what`` and ``step`` (``trainers.runner``), leaving the last
    checkpoint saved before, whose weights were finite when it was saved.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.what = ""

    @staticmethod
    def _bad_logs(logs: dict[str, Any]) -> list[str]:
        """Training losses (``loss``, ``*_loss`` of a method's extra models) and the
        gradient norm that are not finite; evaluation metrics are not training signals."""
        return sorted(
            f"{k}={v}"
            for k, v in logs.items()
            if (k in ("loss", "grad_norm") or k.endswith("_loss"))
            and not k.startswith("eval_")
            and isinstance(v, (int, float))
            and not math.isfinite(v)
        )

    @staticmethod
    def _weights_finite(model) -> bool:
        import torch

        params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if not params:
            return True
        return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())

    def _trip(self, state, control, what: str) -> None:
        if self.step is None:
            self.step, self.what = state.global_step, what
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = self._bad_logs(logs or {})
        if bad:
            self._trip(state, control, f"non-finite {', '.join(bad)}")
        elif control.should_save and not self._weights_finite(kwargs.get("model")):
            self._trip(state, control, "non-finite weights")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None:  # nothing may save once the run has diverged
            control.should_save = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        return self.on_step_end(args, state, control, **kwargs)
