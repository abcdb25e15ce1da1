"""Which checkpoint a restarted run resumes from, and which old ones retention removes.

A training process can die at any instant, including half-way through writing
``checkpoint-N``. transformers' ``get_last_checkpoint`` picks the highest-numbered
directory whether or not it is whole, so a retry would load a torn checkpoint and
fail. posttrain marks a checkpoint complete only after the trainer's save has
returned (``mark_complete``, called from the reporting callback), and resumes
from the newest marked one; unmarked directories are torn writes and are removed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

MARKER = ".posttrain-complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# Files of a checkpoint that only a resumed run needs (optimizer, scheduler, RNG and
# trainer state, OREO's critic optimizer, GRPO's rollout and EGPO's iteration state): a
# download leaves them out and holds weights and configs only. BCO's state file is not
# among them: it holds delta, the threshold its implicit rewards are read against, which
# belongs to the trained model.
RESUME_ONLY = frozenset(
    {
        MARKER,
        "optimizer.pt",
        "scheduler.pt",
        "scaler.pt",
        "training_args.bin",
        "critic_state.pt",
        "posttrain_rollout_state.json",
        "posttrain_egpo_state.json",
    }
)
_RESUME_ONLY = re.compile(r"^rng_state.*\.pth$")


def resume_only(name: str) -> bool:
    """Whether a checkpoint file of this name is trainer state, not part of the model."""
    return name in RESUME_ONLY or _RESUME_ONLY.match(name) is not None


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written under a run's output directory."""
    return Path(output_dir) / f"checkpoint-{step}"


def mark_complete(ckpt: Path) -> None:
    """Durably record that every file of ``ckpt`` has been written."""
    for f in ckpt.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    marker = ckpt / MARKER
    with marker.open("w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).is_file()


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``; torn ones are deleted."""
    if not output_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name))),
        reverse=True,
    )
    for _, path in found:
        if path.is_dir() and is_complete(path):
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` directory name; None for anything else."""
    m = _CKPT.match(Path(path).name)
    return int(m.group(1)) if m else None


def remove_checkpoints(output_dir: Path, keep_steps: set[int]) -> list[int]:
    """Delete every ``checkpoint-N`` directory under ``output_dir`` older than the newest
    kept one and not kept; return the deleted steps, oldest first.

    Retention (the worker, after a new checkpoint was marked complete and recorded) calls
    this with the steps the job's record keeps. Directories newer than the newest kept step
    are never touched: one may be a save in progress, and the resume point is always the
    newest complete checkpoint, which is at or after the newest kept step. Older ones not
    kept are pruned entries, or leftovers of a run that stopped before it could report or
    delete them.
    """
    if not keep_steps or not Path(output_dir).is_dir():
        return []
    newest = max(keep_steps)
    doomed = sorted(
        (step, p)
        for p in Path(output_dir).iterdir()
        if (step := checkpoint_step(p)) is not None and step < newest and step not in keep_steps
    )
    for _, path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return [step for step, _ in doomed]


def newest_complete_step(output_dir: Path) -> int:
    """The step of the newest complete checkpoint under ``output_dir`` (0 if none), found
    without removing anything (the supervisor's view of where the next attempt resumes)."""
    if not output_dir.is_dir():
        return 0
    steps = [
        int(m.group(1))
        for p in output_dir.iterdir()
        if (m := _CKPT.match(p.name)) and is_complete(p)
    ]
    return max(steps, default=0)
