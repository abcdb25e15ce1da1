"""The child processes a worker owns (training runs, vLLM servers): tied to its life.

Each child starts in its own process group with ``PR_SET_PDEATHSIG`` so it dies
with the worker, and is stopped as a group: SIGTERM, then SIGKILL after a grace
period, so nothing it started (dataloader workers, NCCL helpers) outlives it.
``alive`` says whether a process id still names a running process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: runs in the child between fork and exec."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it if it is still there after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not; another user's is)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
