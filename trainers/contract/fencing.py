"""Fenced checkpoint writes: a superseded run can never publish a checkpoint (torch-free).

Each claim of a job gets a fencing token from Redis (``workers.store``). Before it
starts a training process, the supervisor writes its token to the job's fence
file (``write_fence``); the run plan carries the same token. The trainer checks
the file before it saves a checkpoint and again, under the file's lock, while
it marks the checkpoint complete (``fenced``). A run whose token is no longer
the file's (its worker stalled, the lease expired and another worker claimed the
job) stops with ``StaleFence`` instead of writing.

The lock is a POSIX record lock (``fcntl.lockf``), which also works across hosts
on NFS. A new owner's ``write_fence`` waits for a stale run's in-progress
marking to finish, so a checkpoint is either complete before the new attempt
starts looking for one, or never marked at all (and then removed as torn).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StaleFence(RuntimeError):
    """This run's claim was superseded by a newer one: it must not write the job's files."""


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def _read(fd: int) -> int:
    raw = os.pread(fd, 64, 0).strip()
    return int(raw) if raw else 0


def write_fence(path: Path, token: int) -> None:
    """Make ``token`` the job's current fence (the supervisor, before it starts a run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path) as fd:
        if _read(fd) > token:
            raise StaleFence(f"fencing token {token} is older than the job's {_read(fd)}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{token}\n".encode(), 0)
        os.fsync(fd)


def read_fence(path: Path) -> int:
    with _locked(path) as fd:
        return _read(fd)


def check(path: Path | None, token: int | None) -> None:
    """Raise ``StaleFence`` unless ``token`` is still the job's fence (no-op without one)."""
    if path is None or token is None:
        return
    with fenced(path, token):
        pass


@contextmanager
def fenced(path: Path | None, token: int | None) -> Iterator[None]:
    """Hold the fence lock for a write that only the current owner may do."""
    if path is None or token is None:
        yield
        return
    with _locked(path) as fd:
        current = _read(fd)
        if current != token:
            raise StaleFence(
                f"this run's fencing token {token} was superseded by {current}: "
                "another attempt owns the job, so this one stops without writing"
            )
        yield
