"""One engine server as a child process: started in its own session, dead with its
parent, health-checked over HTTP, stopped (TERM, then KILL) however the worker ends."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class EngineFailed(RuntimeError):
    """The engine process exited, or did not answer its health check in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _prctl():
    """libc's ``prctl``, looked up in the parent (None off Linux). The child between fork
    and exec must not load a library: with other threads running at the fork (the event
    loop's executor, httpx), the loader's lock can be held by a thread that does not exist
    in the child, which then hangs before exec, and so does ``Popen`` in the parent."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl) -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the engine gets SIGTERM when the worker that started it dies, even by
    SIGKILL, so no engine outlives its worker holding memory and a port."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str],
        log_path: Path,
        *,
        health_path: str = "/health",
        start_timeout: float = 120.0,
    ):
        self.name, self.argv, self.port, self.env = name, argv, port, env
        self.log_path, self.health_path, self.start_timeout = log_path, health_path, start_timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the engine. It blocks until the child has exec'd: async callers run it in
        a thread (``asyncio.to_thread``), never on their event loop."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        prctl = _prctl()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(prctl),
            )
        self.starts += 1
        log.info("started engine %s (pid %s): %s", self.name, self.proc.pid, " ".join(self.argv))

    async def healthy(self, client: httpx.AsyncClient, wait: float = 5.0) -> bool:
        if not self.alive():
            return False
        try:
            r = await client.get(self.url + self.health_path, timeout=wait)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineFailed(
                    f"engine {self.name} exited with {self.proc and self.proc.returncode} while "
                    f"starting (log: {self.log_path})"
                )
            if await self.healthy(client, wait=2.0):
                return
            await asyncio.sleep(0.25)
        raise EngineFailed(f"engine {self.name} did not answer {self.health_path} in time")

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
