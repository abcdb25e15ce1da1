"""How a training process reports progress: typed JSON lines on a file descriptor.

The trainer knows nothing of Redis or Celery. Whoever starts it (the worker's
supervisor, or a test) passes a writable fd; every message is one of the models
in ``trainers.contract.messages``, written whole as one JSON line by the run's one
reporting process, so lines never interleave.

Control flows the other way as one signal: SIGUSR1 asks the trainer to pause,
that is, to save a resumable checkpoint at the next step boundary and exit
(``PauseRequest``). A run of several processes (ranks under ``accelerate
launch``) reports from rank 0 only (``main_process``: the others' reporters keep
their lines to themselves), and is asked to pause by a flag file every rank reads
at the step boundary, since the launcher between the supervisor and the ranks
does not pass SIGUSR1 on.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from trainers.contract import messages as m


class Reporter:
    """Writes report lines to ``fd``; with ``fd=None`` it only keeps them (tests, notebooks)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd
        self.sent: list[m.ReportMessage] = []
        self.journal_fd: int | None = None

    def keep_journal(self, path: Path) -> None:
        """Also append every line to ``path``: the run's own durable record, which the
        next attempt's supervisor replays if these lines never reached the job record
        (a worker that stalled or died while holding them)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.journal_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def send(self, msg: m.ReportMessage) -> None:
        if self.fd is None or msg.type != "samples":  # a long run's samples add up
            self.sent.append(msg)
        line = m.encode(msg)
        # samples stay out of the journal: its replay recovers metrics, and sample texts
        # would make it the largest file of a long run
        if self.journal_fd is not None and msg.type != "samples":
            _write_all(self.journal_fd, line)
        if self.fd is not None:
            _write_all(self.fd, line)

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

    def samples(self, step: int, rows: list[dict[str, Any]]) -> m.Samples:
        """Send one step's samples; returns the message (its rows validated and cut)."""
        msg = m.Samples(step=step, rows=rows)
        self.send(msg)
        return msg


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``: a line longer than the pipe's buffer may be taken in parts
    (a signal such as the pause request can end a blocked write early)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main_process() -> bool:
    """Whether this process reports: the only one, or rank 0 of a launched run."""
    return int(os.environ.get("RANK", "0")) == 0


def open_report_path(path: str) -> int | None:
    """The report fd of a launched run: the named pipe the supervisor reads, opened by
    rank 0 only; ``None`` (keep lines in memory) on every other rank."""
    return os.open(path, os.O_WRONLY) if main_process() else None


class PauseRequest:
    """Set by SIGUSR1 (from the supervisor), or by the flag file ``path`` appearing; read
    by the trainer callback at step ends (which makes the ranks of a run agree)."""

    def __init__(self, path: Path | None = None) -> None:
        self.requested = False
        self.path = path

    def is_requested(self) -> bool:
        return self.requested or (self.path is not None and self.path.exists())

    def install(self) -> PauseRequest:
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "requested", True))
        return self
