"""Which checkpoint a restarted run resumes from.

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
