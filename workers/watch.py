"""The watch loop of one training run: from its start until its child exits.

``RunWatch.run`` pumps the child's report lines into the record (``ReportIngest``)
while it renews the job's lease, acts on cancel and pause, and keeps two watchdogs
(no progress, exit deadline after the final report). Lines Redis cannot take are held,
also after the child exits, until Redis is back. It returns the run's ``Verdict``; how
the run is stopped or paused is the caller's (``stop``, ``pause``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from workers.ingest import ReportIngest
from workers.settings import WorkerSettings
from workers.store import JobStatus, JobStore
from workers.verdict import Verdict, decide

log = logging.getLogger(__name__)
S = JobStatus


@dataclass
class _WatchState:
    renewed: float
    last_report: float  # when the child last wrote a report line (the stall watchdog)
    next_beat: float = 0.0
    next_poll: float = 0.0
    pause_sent: bool = False
    final_at: float | None = None  # when its final report (result/paused/error) arrived
    killed_after_final: bool = False


def _is_final(line: bytes) -> bool:
    """A result, paused or error report: the child should exit right after it."""
    try:
        return json.loads(line).get("type") in ("result", "paused", "error")
    except (ValueError, AttributeError):
        return False


def _lost(verdict: Verdict | None) -> bool:
    return verdict is not None and verdict.kind == "lease_lost"


class RunWatch:
    """Watches one run of ``job_id`` under the claim (``owner``, ``fence``).

    ``stop`` stops the run's processes (cancel, lease lost, watchdogs, invalid report);
    ``pause`` asks it to pause at its next step boundary.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        owner: str,
        fence: int | None,
        job_id: str,
        proc: subprocess.Popen,
        reporter: ReportIngest,
        *,
        stop: Callable[[], None],
        pause: Callable[[], None],
    ):
        self.s, self.store, self.owner, self.fence = settings, store, owner, fence
        self.job_id, self.proc, self.reporter = job_id, proc, reporter
        self.stop, self.pause = stop, pause

    def run(self, read_fd: int) -> Verdict:
        """Pump reports, renew the lease and poll for cancel until the child exits.

        Report lines are applied only under a lease renewed within its period: a worker
        that stalled renews first, and stops its trainer unread if the job was taken over.
        Lines Redis cannot take are held, also after the child exits, until it is back
        (``_flush``). Watchdogs stop a child that reports nothing for ``stall_seconds`` or
        outlives its final report by ``exit_deadline_seconds``.
        """
        proc, reporter = self.proc, self.reporter
        buf = b""
        pending: list[str] = []
        now = time.monotonic()
        state = _WatchState(renewed=now, last_report=now)
        verdict: Verdict | None = None
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], 0.25)
                chunk = pipe.read(65536) if ready else b""
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    pending += [line.decode("utf-8", "replace") for line in lines]
                    state.last_report = time.monotonic()
                    if state.final_at is None and any(map(_is_final, lines)):
                        state.final_at = state.last_report
                if verdict is None:
                    verdict = self._control(state)
                    if verdict is not None:
                        self.stop()
                if self._lease_current(state) and not _lost(verdict):
                    pending = self._apply(reporter, pending)
                if ready and not chunk:  # EOF: the child closed its end (exited)
                    proc.wait()
                    break
                if verdict is None and reporter.outcome.invalid:
                    verdict = Verdict("failed", "invalid report")
                    self.stop()
                if verdict is None:
                    verdict = self._watchdogs(state)
                if proc.poll() is not None and not ready:
                    break
        if not _lost(verdict) and pending:
            pending = self._flush(pending)
            if pending:
                verdict = Verdict("lease_lost", f"{len(pending)} report lines undelivered")
        return verdict or decide(proc.returncode, reporter, state.killed_after_final)

    def _lease_current(self, st: _WatchState) -> bool:
        return time.monotonic() - st.renewed <= self.s.lease_seconds

    def _watchdogs(self, st: _WatchState) -> Verdict | None:
        """The exit deadline after the final report, and the no-progress watchdog."""
        now = time.monotonic()
        if st.final_at is not None:
            if now - st.final_at > self.s.exit_deadline_seconds and self.proc.poll() is None:
                self._event(
                    "The training process did not exit within "
                    f"{self.s.exit_deadline_seconds:g} s of its final report (exit deadline); "
                    "stopped its process group",
                    level="warn",
                )
                st.killed_after_final = True
                self.stop()
            return None
        if now - st.last_report > self.s.stall_seconds:
            detail = (
                f"no progress: the training process reported nothing for "
                f"{self.s.stall_seconds:g} s (stall watchdog)"
            )
            self._event(f"Stopped the training process: {detail}", level="warn")
            self.stop()
            return Verdict("crashed", detail)
        return None

    def _event(self, message: str, level: str = "info") -> None:
        try:
            self.store.add_event(self.job_id, message, level=level)
        except redis.RedisError as exc:
            log.warning("job %s: event not recorded (%s): %s", self.job_id, exc, message)

    def _flush(self, pending: list[str]) -> list[str]:
        """The child has exited: hold its undelivered report lines until Redis takes them
        (renewing the lease meanwhile), for up to ``report_flush_seconds``. Returns what
        could not be delivered: empty, unless the job was taken over or the wait ran out."""
        job_id = self.job_id
        deadline = time.monotonic() + self.s.report_flush_seconds
        delay = 0.25
        while pending:
            try:
                if not self.store.renew(job_id, self.owner, self.s.lease_seconds, self.fence):
                    if self.fence is not None and self.store.get(job_id).get("fence") != str(
                        self.fence
                    ):
                        log.warning(
                            "job %s was taken over; dropping %d report lines",
                            job_id,
                            len(pending),
                        )
                        return pending
                pending = self._apply(self.reporter, pending)
            except redis.RedisError as exc:
                log.warning("job %s: Redis unavailable after the run ended: %s", job_id, exc)
            if not pending:
                break
            if time.monotonic() > deadline:
                log.error("job %s: gave up delivering %d report lines", job_id, len(pending))
                return pending
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        return []

    @staticmethod
    def _apply(reporter: ReportIngest, pending: list[str]) -> list[str]:
        """Write report lines to Redis in order; keep the rest for later if Redis is down."""
        while pending:
            try:
                reporter.handle_line(pending[0])
            except redis.RedisError as exc:
                log.warning(
                    "job %s: Redis unavailable, holding %d report lines: %s",
                    reporter.job_id,
                    len(pending),
                    exc,
                )
                return pending
            pending.pop(0)
        return pending

    def _control(self, st: _WatchState) -> Verdict | None:
        """Renew the lease, act on cancel and pause; survive Redis blips shorter than the lease."""
        job_id = self.job_id
        now = time.monotonic()
        try:
            if now >= st.next_beat:
                st.next_beat = now + self.s.heartbeat_seconds
                if not self.store.renew(job_id, self.owner, self.s.lease_seconds, self.fence):
                    return self._lost_or_cancelled()
                st.renewed = time.monotonic()
            if now >= st.next_poll:
                st.next_poll = now + 1.0
                status = self.store.status(job_id)
                if status == S.cancelled:
                    return Verdict("cancelled")
                # The trainer installs its SIGUSR1 handler before it reports anything, so
                # a pause is only signalled once a report line has arrived.
                if status == S.pausing and not st.pause_sent and self.reporter.outcome.lines:
                    self.pause()
                    st.pause_sent = True
        except redis.RedisError as exc:
            # The trainer keeps going and its reports are held: with Redis down nobody can
            # take the job over, and if someone did (a partition), the first renewal after
            # it heals is refused and stops the trainer; until then the fence keeps the
            # stale trainer from writing checkpoints.
            log.warning("job %s: Redis unavailable: %s", job_id, exc)
        return None

    def _lost_or_cancelled(self) -> Verdict:
        status = self.store.status(self.job_id)
        if status == S.cancelled:
            return Verdict("cancelled")
        return Verdict("lease_lost", f"status is {status}")
