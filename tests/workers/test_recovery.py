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
    message = json.loads(redis_client.lindex("posttrain.test-recovery", 0))
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
