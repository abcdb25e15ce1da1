"""Celery tasks. ``run_job`` takes only a job id and is idempotent.

A delivery of a job that is not claimable (already running under a live lease,
finished, cancelled) exits at once. The task itself never imports torch: the
training runs in a child process started by ``workers.supervisor``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from functools import lru_cache

from celery.signals import worker_ready, worker_shutdown

from workers import placement
from workers.celery_app import app, enqueue, enqueue_eval_run
from workers.evalruns import EvalRunStore
from workers.filestore import FileStore
from workers.fleet import Advertiser, job_queue
from workers.recovery import Reaper, broker_has_message, recover_eval_runs
from workers.redis_client import make_redis
from workers.settings import WorkerSettings
from workers.store import JobNotFound, JobStatus, JobStore
from workers.vllm_server import rollout_engines

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _context() -> tuple[WorkerSettings, JobStore, FileStore]:
    s = WorkerSettings()
    client = make_redis(s)
    store = JobStore(
        client,
        s.key_prefix,
        events_maxlen=s.events_maxlen,
        metrics_maxlen=s.metrics_maxlen,
        samples_maxlen=s.samples_maxlen,
    )
    return s, store, FileStore(client, s.data_dir, s.key_prefix)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name="posttrain.run_job", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from workers.supervisor import Supervisor

    settings, store, files = _context()
    owner = worker_identity()
    try:
        claim = store.claim(job_id, owner, settings.lease_seconds, settings.max_attempts)
    except JobNotFound:
        log.warning("run_job: job %s does not exist; dropping the message", job_id)
        return "missing"
    if claim.exhausted:
        error = {
            "code": "training_crashed",
            "param": None,
            "message": f"the job's worker was lost {claim.attempt} times; giving up",
        }
        store.transition(job_id, JobStatus.failed, error=error)
        store.add_event(job_id, f"Job failed: {error['message']}", level="error")
        return "failed"
    if claim.paused:
        store.add_event(
            job_id,
            "Worker lost while the job was pausing; job paused at its last checkpoint",
            level="warn",
        )
        return "paused"
    if not claim.ok:
        log.info("run_job: job %s is %s; nothing to do", job_id, claim.previous)
        return f"skipped:{claim.previous}"
    outcome = Supervisor(settings, store, files, owner, fence=claim.fence).run(
        job_id, claim.attempt
    )
    if outcome == "requeued":
        enqueue(app, job_id, job_queue(store, job_id, settings.queue))
        store.mark_enqueued(job_id)
    return outcome


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    settings, store, _files = _context()
    broker = store.r
    if settings.effective_broker_url != settings.redis_url:
        broker = make_redis(settings, settings.effective_broker_url)

    def queue_of(job_id: str) -> str:  # a reaper requeues jobs of every queue, each on its own
        return job_queue(store, job_id, settings.queue)

    def has_message(job_id: str) -> bool:
        return broker_has_message(broker, queue_of(job_id), settings.broker_key_prefix)(job_id)

    runs = EvalRunStore(store.r, settings.key_prefix)

    def run_queue(run_id: str) -> str:  # the queue its task was sent to
        return store.r.hget(runs.k_run(run_id), "queue") or settings.queue

    def run_has_message(run_id: str) -> bool:
        return broker_has_message(broker, run_queue(run_id), settings.broker_key_prefix)(run_id)

    eval_runs = functools.partial(
        recover_eval_runs,
        runs,
        lambda run_id: enqueue_eval_run(app, run_id, run_queue(run_id)),
        run_has_message,
        settings.requeue_grace_seconds,
        settings.eval_runs_per_tenant,
    )
    Reaper(
        store,
        lambda job_id: enqueue(app, job_id, queue_of(job_id)),
        interval=max(1.0, settings.lease_seconds / 2),
        lease_seconds=settings.lease_seconds,
        stranded_grace=settings.requeue_grace_seconds,
        has_message=has_message,
        eval_runs=eval_runs,
    ).start()


_advertiser: Advertiser | None = None


@worker_ready.connect
def _advertise(sender=None, **_: object) -> None:
    """Keep this worker's devices, queue and strategies visible to the API (workers.fleet)."""
    global _advertiser
    settings, store, _files = _context()
    _advertiser = Advertiser(
        store.r,
        settings.key_prefix,
        settings.queue,
        getattr(sender, "hostname", None) or worker_identity(),
        placement.worker_devices(settings.worker_gpus),
        placement.available_strategies(),
        interval=settings.heartbeat_seconds,
        ttl=max(3 * settings.heartbeat_seconds, 10.0),
        engines=rollout_engines(settings),
    )
    _advertiser.start()


@worker_shutdown.connect
def _withdraw(**_: object) -> None:
    if _advertiser is not None:
        _advertiser.stop()
