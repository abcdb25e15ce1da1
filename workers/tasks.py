"""Celery tasks. ``run_job`` takes only a job id and is idempotent.

A delivery of a job that is not claimable (already running under a live lease,
finished, cancelled) exits at once. The task itself never imports torch: the
training runs in a child process started by ``workers.supervisor``.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache

import redis
from celery.signals import worker_ready

from workers.celery_app import app, enqueue
from workers.filestore import FileStore
from workers.recovery import Reaper
from workers.settings import WorkerSettings
from workers.store import JobNotFound, JobStatus, JobStore

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _context() -> tuple[WorkerSettings, JobStore, FileStore]:
    s = WorkerSettings()
    client = redis.Redis.from_url(s.redis_url, decode_responses=True)
    return s, JobStore(client, s.key_prefix), FileStore(client, s.data_dir, s.key_prefix)


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
    if not claim.ok:
        log.info("run_job: job %s is %s; nothing to do", job_id, claim.previous)
        return f"skipped:{claim.previous}"
    outcome = Supervisor(settings, store, files, owner).run(job_id, claim.attempt)
    if outcome == "requeued":
        enqueue(app, job_id, settings.queue)
    return outcome


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    settings, store, _files = _context()
    Reaper(
        store,
        lambda job_id: enqueue(app, job_id, settings.queue),
        interval=max(1.0, settings.lease_seconds / 2),
    ).start()
