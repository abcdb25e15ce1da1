"""The Celery application. ``celery -A workers.celery_app worker`` finds ``app`` here.

``app`` is configured lazily (Celery's ``on_configure`` signal) from
``WorkerSettings``, so importing this module reads no environment and opens no
connection. The API builds its own producer with ``make_celery(settings)`` from
the settings it was created with. One job per worker process: prefetch 1, late
acks (a job whose worker dies is redelivered), and an explicit queue. Its Redis
transport gets the timeouts of ``workers.redis_client``.
"""

from __future__ import annotations

from celery import Celery

from workers.redis_client import broker_transport_options
from workers.settings import WorkerSettings

TASK_NAME = "posttrain.run_job"
EVAL_TASK_NAME = "posttrain.run_eval"  # workers.evaltasks


def configure(celery: Celery, s: WorkerSettings) -> None:
    celery.conf.update(
        broker_url=s.effective_broker_url,
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=s.queue,
        task_routes={TASK_NAME: {"queue": s.queue}, EVAL_TASK_NAME: {"queue": s.queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=s.concurrency,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # Redelivery of an unacked job if its worker vanished; the task is
        # idempotent (lease in the record), so an early redelivery just exits. The
        # same socket timeouts and health checks as every other Redis client.
        broker_transport_options={"visibility_timeout": 3600, **broker_transport_options(s)},
        imports=["workers.tasks", "workers.evaltasks"],
    )


def make_celery(settings: WorkerSettings) -> Celery:
    celery = Celery("posttrain", set_as_current=False)
    configure(celery, settings)
    return celery


app = Celery("posttrain", set_as_current=False)


@app.on_configure.connect
def _configure(sender: Celery, **_: object) -> None:
    configure(sender, WorkerSettings())


def enqueue(celery: Celery, job_id: str, queue: str) -> None:
    """Send ``run_job(job_id)`` by name: callers need not import the task module."""
    celery.send_task(TASK_NAME, args=[job_id], queue=queue)


def enqueue_eval_run(celery: Celery, run_id: str, queue: str) -> None:
    """Send ``run_eval(run_id)`` (``workers.evaltasks``) by name."""
    celery.send_task(EVAL_TASK_NAME, args=[run_id], queue=queue)
