"""How a training process reports progress: typed JSON lines on a file descriptor.

The trainer knows nothing of Redis or Celery. Whoever starts it (the worker's
supervisor, or a test) passes a writable fd; every message is one of the models
in ``trainers.messages``, written as one JSON line with a single ``os.write`` so
lines never interleave.

Control flows the other way as one signal: SIGUSR1 asks the trainer to pause,
that is, to save a resumable checkpoint at the next step boundary and exit
(``PauseRequest``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from trainers import messages as m


class Reporter:
    """Writes report lines to ``fd``; with ``fd=None`` it only keeps them (tests, notebooks)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd
        self.sent: list[m.ReportMessage] = []

    def send(self, msg: m.ReportMessage) -> None:
        self.sent.append(msg)
        if self.fd is not None:
            os.write(self.fd, m.encode(msg))

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        self.send(m.Event(level=level, message=message, data=data or None))

    def log(
        self, step: int, total_steps: int, metrics: dict[str, Any], trained_tokens: int | None
    ) -> None:
        self.send(
            m.Log(
                step=step, total_steps=total_steps, metrics=metrics, trained_tokens=trained_tokens
            )
        )

    def checkpoint(
        self, step: int, path: str, metrics: dict[str, Any], final: bool = False
    ) -> None:
        self.send(m.Checkpoint(step=step, path=path, metrics=metrics, final=final))

    def result(self, step: int, trained_tokens: int, checkpoint: str) -> None:
        self.send(m.Result(step=step, trained_tokens=trained_tokens, checkpoint=checkpoint))

    def paused(self, step: int, trained_tokens: int, checkpoint: str) -> None:
        self.send(m.Paused(step=step, trained_tokens=trained_tokens, checkpoint=checkpoint))

    def error(self, code: str, message: str, param: str | None = None) -> None:
        self.send(m.Error(code=code, message=message, param=param))


class PauseRequest:
    """Set by SIGUSR1 (from the supervisor), read by the trainer callback at step ends."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> PauseRequest:
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "requested", True))
        return self
