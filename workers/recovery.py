"""Recovery that does not rely on the broker: re-queue jobs whose worker vanished.

Every worker runs ``Reaper`` in a daemon thread of its main process. A job
whose lease expired (its worker was killed, its machine lost) goes back to
``queued`` in one atomic step and is enqueued again; the next claim counts an
attempt, resumes from the last checkpoint, and fails the job for good once
``max_attempts`` is spent. Several reapers may run at once: the compare-and-set
lets exactly one of them requeue a given job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from workers.store import JobStore

log = logging.getLogger(__name__)


def requeue_expired(store: JobStore, enqueue: Callable[[str], None]) -> list[str]:
    """Requeue every job with an expired lease; return the ids this call requeued."""
    done = []
    for job_id in store.expired_leases():
        if not store.requeue_if_expired(job_id):
            continue
        attempt = store.get(job_id).get("attempt", "?")
        store.add_event(
            job_id,
            f"Worker lost after attempt {attempt}; job re-queued and will "
            "resume from its last checkpoint",
            level="warn",
        )
        enqueue(job_id)
        done.append(job_id)
    return done


class Reaper(threading.Thread):
    def __init__(self, store: JobStore, enqueue: Callable[[str], None], interval: float):
        super().__init__(name="posttrain-reaper", daemon=True)
        self.store, self.enqueue, self.interval = store, enqueue, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                for job_id in requeue_expired(self.store, self.enqueue):
                    log.warning("re-queued job %s: its worker's lease expired", job_id)
            except Exception:
                log.exception("reaper pass failed")
            self.stopped.wait(self.interval)
