"""Re-queueing jobs whose worker vanished, against a real Redis and Celery broker."""

from __future__ import annotations

import json
import time

from workers.celery_app import enqueue, make_celery
from workers.recovery import requeue_expired
from workers.settings import WorkerSettings
from workers.store import JobStatus


def test_expired_lease_is_requeued_once_and_enqueued(store, redis_client, unit_redis_url):
    celery = make_celery(WorkerSettings(redis_url=unit_redis_url, queue="posttrain.test-recovery"))
    store.create("ftjob-dead", "{}", JobStatus.queued)
    store.create("ftjob-alive", "{}", JobStatus.queued)
    store.claim("ftjob-dead", "w-dead", lease_seconds=0.05, max_attempts=3)
    store.claim("ftjob-alive", "w-alive", lease_seconds=60, max_attempts=3)
    time.sleep(0.1)

    sent: list[str] = []

    def send(job_id: str) -> None:
        sent.append(job_id)
        enqueue(celery, job_id, "posttrain.test-recovery")

    assert requeue_expired(store, send) == ["ftjob-dead"]
    assert requeue_expired(store, send) == []  # a second reaper pass finds nothing
    assert sent == ["ftjob-dead"]
    rec = store.get("ftjob-dead")
    assert rec["status"] == "queued" and rec["lease_owner"] == "" and rec["attempt"] == "1"
    assert store.get("ftjob-alive")["status"] == "running"
    message = json.loads(redis_client.lindex("posttrain:celery:posttrain.test-recovery", 0))
    assert message["headers"]["task"] == "posttrain.run_job"
    assert message["headers"]["argsrepr"] == "['ftjob-dead']"
    # the old owner can no longer renew or finish it; a new claim counts attempt 2
    assert not store.renew("ftjob-dead", "w-dead", 30)
    assert store.claim("ftjob-dead", "w-new", 30, 3).attempt == 2


def test_a_renewal_that_lands_first_prevents_the_requeue(store):
    store.create("ftjob-slow", "{}", JobStatus.queued)
    store.claim("ftjob-slow", "w1", lease_seconds=0.05, max_attempts=3)
    time.sleep(0.1)
    assert store.expired_leases() == ["ftjob-slow"]
    assert store.renew("ftjob-slow", "w1", 30)  # heartbeat arrives late but before the reaper
    assert requeue_expired(store, lambda _id: None) == []
    assert store.get("ftjob-slow")["status"] == "running"


def test_a_queued_job_with_no_broker_message_is_enqueued_again_once(
    store, redis_client, unit_redis_url
):
    """The API died between writing the record and enqueueing: the reconciler sends it."""
    from workers.recovery import broker_has_message, requeue_stranded

    queue = "posttrain.test-stranded"
    settings = WorkerSettings(redis_url=unit_redis_url, queue=queue)
    celery = make_celery(settings)
    prefix = settings.broker_key_prefix
    store.create("ftjob-stranded", "{}", JobStatus.queued)  # and no message
    store.create("ftjob-sent", "{}", JobStatus.queued)
    enqueue(celery, "ftjob-sent", queue)
    has_message = broker_has_message(redis_client, queue, prefix)
    assert not has_message("ftjob-stranded") and has_message("ftjob-sent")

    def send(job_id: str) -> None:
        enqueue(celery, job_id, queue)

    assert requeue_stranded(store, send, has_message, grace=60) == []  # inside the grace
    assert requeue_stranded(store, send, has_message, grace=0) == ["ftjob-stranded"]
    assert requeue_stranded(store, send, has_message, grace=0) == []  # now it has one
    assert not redis_client.exists(queue)  # Celery's keys live under their own prefix
    bodies = redis_client.lrange(prefix + queue, 0, -1)
    assert sum("ftjob-stranded" in b for b in bodies) == 1
    assert sum("ftjob-sent" in b for b in bodies) == 1
    events = [f["message"] for _, f in store.events("ftjob-stranded", None, 10)[0]]
    assert any("no message in the broker" in e for e in events)
