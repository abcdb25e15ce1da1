"""How a training process reports progress: JSON lines on a file descriptor.

The trainer knows nothing of Redis or Celery. Whoever starts it (the worker's
supervisor, or a test) passes a writable fd; every message is one JSON object
on one line, written with a single ``os.write`` so lines never interleave.

Messages: ``event`` (level, message), ``log`` (step, total_steps, metrics),
``checkpoint`` (step, path relative to the data dir, metrics, final),
``result`` (trained_tokens, checkpoint), ``paused`` (step, checkpoint),
``error`` (code, message, param).

Control flows the other way as one signal: SIGUSR1 asks the trainer to pause,
that is, to save a resumable checkpoint at the next step boundary and exit
(``PauseRequest``).
"""

from __future__ import annotations

import json
import math
import os
import signal
from typing import Any


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


class Reporter:
    """Writes report lines to ``fd``; with ``fd=None`` it only keeps them (tests, notebooks)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd
        self.sent: list[dict[str, Any]] = []

    def _send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)
        if self.fd is not None:
            os.write(self.fd, (json.dumps(msg) + "\n").encode())

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        self._send({"type": "event", "level": level, "message": message, "data": data or None})

    def log(self, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        self._send(
            {"type": "log", "step": step, "total_steps": total_steps, "metrics": _clean(metrics)}
        )

    def checkpoint(
        self, step: int, path: str, metrics: dict[str, Any], final: bool = False
    ) -> None:
        self._send(
            {
                "type": "checkpoint",
                "step": step,
                "path": path,
                "metrics": _clean(metrics),
                "final": final,
            }
        )

    def result(self, trained_tokens: int, checkpoint: str) -> None:
        self._send({"type": "result", "trained_tokens": trained_tokens, "checkpoint": checkpoint})

    def paused(self, step: int, checkpoint: str) -> None:
        self._send({"type": "paused", "step": step, "checkpoint": checkpoint})

    def error(self, code: str, message: str, param: str | None = None) -> None:
        self._send({"type": "error", "code": code, "message": message, "param": param})


class PauseRequest:
    """Set by SIGUSR1 (from the supervisor), read by the trainer callback at step ends."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> PauseRequest:
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "requested", True))
        return self
