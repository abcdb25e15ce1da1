"""Run a function in a forked child with a deadline and a memory cap (torch-free).

The API process runs user-supplied work this way (compiling user regexes, running a
grader on a sample): whatever the input does, the API's own threads, memory and GIL are
untouched. Children come from a fork server (started on first use, never at import),
which is safe to use from a threaded server where a plain ``fork`` is not; the fork
server imports ``preload`` once, so each child starts with those modules loaded.

The memory cap is the child's address space (``RLIMIT_AS``) at start plus
``memory_bytes``: an allocation past it raises ``MemoryError`` in the child, and the
caller gets ``Bounded(kind="memory")`` instead of an API that grew by gigabytes.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["ok", "error", "timeout", "memory", "died"]


@dataclass
class Bounded:
    """What the child did: ``ok`` (``value`` is the result), ``error`` (``detail`` names
    the exception), ``timeout``, ``memory`` (over its cap) or ``died`` (exit code in
    ``detail``)."""

    kind: Kind
    value: Any = None
    detail: str = ""
    seconds: float = 0.0


def _address_space() -> int | None:
    """This process's virtual size in bytes (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _child(conn: Any, memory_bytes: int | None, target: Callable, args: tuple) -> None:
    try:
        if memory_bytes is not None:
            now = _address_space()
            if now is not None:
                cap = now + memory_bytes
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            conn.send(("ok", target(*args), ""))
        except MemoryError:
            conn.send(("memory", None, ""))
        except Exception as exc:  # reported, not lost with the child
            conn.send(("error", None, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_bounded(
    target: Callable,
    args: tuple,
    *,
    timeout_s: float,
    memory_bytes: int | None,
    preload: Sequence[str] = (),
) -> Bounded:
    """``target(*args)`` in a fork-server child, killed after ``timeout_s`` and capped at
    ``memory_bytes`` more than it started with (None: no cap). ``target`` and ``args``
    must pickle (a module-level function, plain data)."""
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, memory_bytes, target, args), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            return Bounded("timeout", seconds=time.perf_counter() - start)
        kind, value, detail = recv.recv()
        return Bounded(kind, value, detail, time.perf_counter() - start)
    except (EOFError, OSError):
        proc.join(1.0)
        detail = f"exit code {proc.exitcode}"
        return Bounded("died", detail=detail, seconds=time.perf_counter() - start)
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
