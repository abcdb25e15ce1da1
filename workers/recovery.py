"""Recovery that does not rely on the broker: re-queue jobs whose worker vanished, and
re-enqueue queued jobs that have no broker message.

Every worker runs ``Reaper`` in a daemon thread of its main process. Each pass:

* a job whose lease expired (its worker was killed, its machine lost) goes back
  to ``queued`` in one atomic step and is enqueued again; the next claim counts
  an attempt, resumes from the last checkpoint, and fails the job for good once
  ``max_attempts`` is spent. A job that was ``pausing`` is parked as ``paused``
  instead (the user's pause is kept; resume continues from its last checkpoint);
* a job ``queued`` for longer than the grace period whose message is not in the
  broker (the API died between writing the record and enqueueing it, an enqueue
  failed on resume or requeue) is enqueued again. Re-enqueueing is safe because
  the claim is idempotent: a duplicate delivery exits at once.

The same pass recovers eval runs (``recover_eval_runs``): a run whose grading lease ran
out goes back to ``queued`` and is sent again (the next claim resumes after its stored
rows); a run waiting for one of its tenant's grading slots is sent again once one is
free and no message for it is on its way; a queued run with no broker message past the
grace period is sent again. A duplicate message is harmless: the claim lets one worker
grade a run at a time.

The API runs a third sweep, ``fail_unserved``: a job queued on a queue that no live
worker has served for ``POSTTRAIN_UNSERVED_QUEUE_SECONDS`` fails with ``no_worker``
instead of waiting forever.

Several reapers may run at once: the compare-and-set lets exactly one of them
requeue a given job. After a pass that could not reach Redis, a reaper waits a
whole lease period once Redis answers again before it requeues anything, so the
supervisors (which renew every heartbeat) get their leases back first instead of
losing jobs that ran fine through the outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

import redis

from workers.evalruns import EvalRunStore
from workers.fleet import job_queue
from workers.store import DEFAULT_TENANT, InvalidTransition, JobNotFound, JobStatus, JobStore

log = logging.getLogger(__name__)


def requeue_expired(store: JobStore, enqueue: Callable[[str], None]) -> list[str]:
    """Requeue every job with an expired lease; return the ids this call requeued or parked."""
    done = []
    for job_id in store.expired_leases():
        outcome = store.requeue_if_expired(job_id)
        if outcome is None:
            continue
        attempt = store.get(job_id).get("attempt", "?")
        if outcome == "paused":
            store.add_event(
                job_id,
                "Worker lost while the job was pausing; job paused at its last checkpoint",
                level="warn",
            )
        else:
            store.add_event(
                job_id,
                f"Worker lost after attempt {attempt}; job re-queued and will "
                "resume from its last checkpoint",
                level="warn",
            )
            enqueue(job_id)
            store.mark_enqueued(job_id)
        done.append(job_id)
    return done


def requeue_stranded(
    store: JobStore,
    enqueue: Callable[[str], None],
    has_message: Callable[[str], bool],
    grace: float,
) -> list[str]:
    """Enqueue every job queued for over ``grace`` s with no message in the broker."""
    done = []
    for job_id in store.queued_since(grace):
        if store.status(job_id) != "queued":
            store.r.zrem(store.k_queued(), job_id)  # a stale index entry (record gone)
            continue
        if not has_message(job_id):
            enqueue(job_id)
            store.add_event(
                job_id,
                f"Job was queued for over {grace:g} s with no message in the broker; "
                "enqueued it again",
                level="warn",
            )
            done.append(job_id)
        store.mark_enqueued(job_id)
    return done


def recover_eval_runs(
    runs: EvalRunStore,
    enqueue: Callable[[str], None],
    has_message: Callable[[str], bool],
    grace: float,
    slots: int,
) -> list[str]:
    """Send again the eval runs that would otherwise wait forever (module docstring);
    their ids. ``slots``: a tenant's grading slots where a run recorded none."""
    sent: list[str] = []
    for run_id in runs.expired_leases():
        worker = runs.requeue_if_expired(run_id)
        if worker is None:
            continue
        stored = runs.r.hget(runs.k_run(run_id), "progress") or "0"
        runs.add_event(
            run_id,
            f"Worker {worker or '?'} was lost (its lease ran out); the run is queued again "
            f"and resumes after its {stored} graded rows",
            type="requeued",
            level="warn",
            data={"worker": worker, "stored": int(stored)},
        )
        enqueue(run_id)
        runs.mark_enqueued(run_id)
        sent.append(run_id)
    queued = runs.queued_runs()
    if not queued:
        return sent
    pipe = runs.r.pipeline(transaction=False)
    for run_id, _ in queued:
        pipe.hmget(runs.k_run(run_id), "status", "tenant", "waiting", "limit")
    now = runs.server_time()
    waiting: dict[str, int] = {}
    for (run_id, since), (status, tenant, wait, limit) in zip(queued, pipe.execute(), strict=True):
        if status != "queued":
            runs.r.zrem(runs.k_queued(), run_id)  # stale (finished, claimed or deleted)
        elif wait:
            waiting.setdefault(tenant or DEFAULT_TENANT, int(limit) if limit else slots)
        elif since < now - grace and run_id not in sent:
            if not has_message(run_id):
                enqueue(run_id)
                sent.append(run_id)
                log.warning("re-enqueued eval run %s: it was queued with no message", run_id)
            runs.mark_enqueued(run_id)
    for tenant, limit in waiting.items():
        for run_id, woken_before in runs.wake(tenant, limit, grace):
            if woken_before and has_message(run_id):
                continue  # its message waits behind other tasks
            enqueue(run_id)
            sent.append(run_id)
    return sent


def fail_unserved(
    store: JobStore,
    live: Collection[str],
    max_wait: float,
    default_queue: str,
    now: float | None = None,
) -> list[str]:
    """Fail every queued job whose queue no live worker (``live``) has served for
    ``max_wait`` s, counted from the later of when its queue was first seen unserved
    (``fleet:unserved``, kept here) and when the job was queued; return their ids. A
    queue seen served again clears its mark. Times are this process's clock."""
    now = time.time() if now is None else now
    ids = store.r.zrange(store.k_queued(), 0, -1)
    pipe = store.r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(store.k_job(job_id), "status", "queue", "updated_at", "created_at")
    waiting: dict[str, list[tuple[str, float]]] = {}
    for job_id, (status, queue, updated, created) in zip(ids, pipe.execute(), strict=True):
        if status != JobStatus.queued:
            continue
        queue = queue or job_queue(store, job_id, default_queue)
        if queue not in live:
            waiting.setdefault(queue, []).append((job_id, float(updated or created or now)))
    marks = store.r.hgetall(store.k_unserved())
    stale = [q for q in marks if q not in waiting]
    if stale:
        store.r.hdel(store.k_unserved(), *stale)
    failed = []
    for queue, jobs in waiting.items():
        if queue not in marks:
            store.r.hsetnx(store.k_unserved(), queue, now)
        unserved_since = float(marks.get(queue, now))
        for job_id, queued_at in jobs:
            waited = now - max(unserved_since, queued_at)
            if waited < max_wait:
                continue
            message = (
                f"no worker served queue '{queue}' for {max_wait:g} s while the job waited; "
                f"start a worker on it (POSTTRAIN_QUEUE={queue}) or create the job on a "
                "queue that has workers"
            )
            try:
                store.transition(
                    job_id,
                    JobStatus.failed,
                    expect={JobStatus.queued},
                    error={"code": "no_worker", "message": message, "param": "resources.queue"},
                )
            except (InvalidTransition, JobNotFound):
                continue  # claimed, cancelled or deleted meanwhile
            store.add_event(job_id, f"Job failed: {message}", level="error")
            failed.append(job_id)
    return failed


def broker_has_message(broker: redis.Redis, queue: str, prefix: str) -> Callable[[str], bool]:
    """``has_message(job_id)`` for Celery's Redis transport, whose keys start with
    ``prefix``: the job's id appears in a message waiting in ``queue`` (any priority list)
    or in one delivered and not yet acknowledged (kombu's ``unacked`` hash). Job ids are
    random, so a substring match on the raw message is exact enough."""
    key = f"{prefix}{queue}"

    def has_message(job_id: str) -> bool:
        lists = [key] + [k for k in broker.scan_iter(match=f"{key}\x06\x16*", count=100)]
        for name in lists:
            if any(job_id in m for m in broker.lrange(name, 0, -1)):
                return True
        return any(job_id in v for v in broker.hvals(f"{prefix}unacked"))

    return has_message


class Reaper(threading.Thread):
    def __init__(
        self,
        store: JobStore,
        enqueue: Callable[[str], None],
        interval: float,
        *,
        lease_seconds: float = 0.0,
        stranded_grace: float | None = None,
        has_message: Callable[[str], bool] | None = None,
        eval_runs: Callable[[], list[str]] | None = None,
    ):
        super().__init__(name="posttrain-reaper", daemon=True)
        self.store, self.enqueue, self.interval = store, enqueue, interval
        self.lease_seconds = lease_seconds
        self.stranded_grace, self.has_message = stranded_grace, has_message
        self.eval_runs = eval_runs  # the eval-run pass (recover_eval_runs, bound)
        self.stopped = threading.Event()

    def run(self) -> None:
        outage = False
        while not self.stopped.is_set():
            try:
                if outage:  # let live supervisors renew their leases first
                    self.store.r.ping()
                    outage = False
                    log.warning("Redis is back; reaper waits %.1f s", self.lease_seconds)
                    self.stopped.wait(self.lease_seconds)
                self.run_once()
            except redis.RedisError as exc:
                outage = True
                log.warning("reaper pass could not reach Redis: %s", exc)
            except Exception:
                log.exception("reaper pass failed")
            self.stopped.wait(self.interval)

    def run_once(self) -> None:
        for job_id in requeue_expired(self.store, self.enqueue):
            log.warning("re-queued job %s: its worker's lease expired", job_id)
        if self.stranded_grace is not None and self.has_message is not None:
            for job_id in requeue_stranded(
                self.store, self.enqueue, self.has_message, self.stranded_grace
            ):
                log.warning("re-enqueued job %s: it was queued with no broker message", job_id)
        if self.eval_runs is not None:
            for run_id in self.eval_runs():
                log.info("sent eval run %s to the workers again", run_id)
