"""Worker queues a job may name (issue 19, item 1), through the in-process API against a
real Redis and Celery broker.

The probe that found the hole: a queue name was used as a Redis key as it was, so team B
naming team A's quota lock as its queue made every job creation of team A fail with a
500 after 10 s, and a queue named after an Idempotency-Key broke that key. Now a queue
name has no ':' (it can name no key of posttrain's), Celery's keys live under their own
prefix, and a job may only name a queue the server offers or a live worker serves (and
that its tenant may use). A job on an offered queue that no worker serves fails after
``unserved_queue_seconds`` and holds no quota while it waits.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.auth import hash_key
from service.main import create_app
from service.settings import ApiSettings
from tests.service.test_tenants import as_, create_job, key_file, upload
from workers.fleet import advertise
from workers.settings import WorkerSettings
from workers.store import JobStatus

QUEUE = "posttrain.test-queues"
SPARE = "posttrain.spare"  # offered by the server (POSTTRAIN_QUEUES), no worker yet
LIMITED = "key-of-limited"  # a tenant whose jobs may use SPARE only


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    extra = {"limited": {"keys": [hash_key(LIMITED)], "queues": [SPARE]}}
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue=QUEUE,
        queues=SPARE,
        api_keys_file=key_file(tmp_path / "keys.json", extra),
        unserved_queue_seconds=1.0,
        file_sweep_seconds=0.1,
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def serve(client, queue: str, name: str = "w1") -> None:
    """A live worker on ``queue`` (its fleet entry, as a worker's heartbeat writes it)."""
    jobs = client.app.state.jobs
    advertise(jobs.r, jobs.p, queue, name, [], ["ddp"], ttl=600)


def on(queue: str) -> dict:
    return {"resources": {"queue": queue}}


def error_of(resp) -> dict:
    return resp.json()["error"]


@pytest.mark.parametrize(
    "queue",
    ["test:tenant:small:quota-lock", "test:idem:team-a:k1", "unacked", "a b", "x" * 65, ""],
)
def test_a_queue_that_is_no_queue_name_is_a_400_and_touches_no_key(client, redis_client, queue):
    serve(client, QUEUE)
    before = set(redis_client.keys("*"))
    resp = create_job(client, "b", upload(client, "b"), **on(queue))
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == "resources.queue"
    created = set(redis_client.keys("*")) - before
    assert not any(k.startswith(("test:tenant", "test:idem")) for k in created), created
    assert queue not in created
    # the tenant whose lock the name pointed at is not affected
    assert create_job(client, "q", upload(client, "q")).status_code == 200


def test_a_queue_must_be_offered_or_served(client):
    fid = upload(client, "a")
    resp = create_job(client, "a", fid, **on("gpu-h100"))
    assert resp.status_code == 400
    err = error_of(resp)
    assert (
        err["param"] == "resources.queue"
        and "'gpu-h100' is not a queue you may use" in (err["message"])
    )
    assert f"use one of: {SPARE}, {QUEUE}" in err["message"]  # sorted
    serve(client, "gpu-h100")  # a live worker on it makes it usable
    assert create_job(client, "a", fid, **on("gpu-h100")).status_code == 200
    assert create_job(client, "a", fid, **on(SPARE)).status_code == 200  # offered


def test_a_tenant_limited_to_some_queues_may_use_only_those(client):
    serve(client, QUEUE)
    fid = upload(client, LIMITED)
    resp = create_job(client, LIMITED, fid)  # the server's default queue
    assert resp.status_code == 400
    assert error_of(resp)["message"] == (
        f"resources.queue: the default queue '{QUEUE}' is not a queue you may use; "
        f"use one of: {SPARE}"
    )
    job = create_job(client, LIMITED, fid, **on(SPARE))
    assert job.status_code == 200
    assert client.app.state.jobs.get(job.json()["id"])["queue"] == SPARE
    # admins may use every queue
    assert create_job(client, "root", upload(client, "root"), **on(SPARE)).status_code == 200


def test_a_job_on_an_unserved_queue_holds_no_quota_and_fails_in_time(client):
    """Tenant "small" has a quota of 1. Jobs waiting on a queue nobody serves do not
    count; each gets an event saying so, and fails with no_worker once the queue has
    been unserved for unserved_queue_seconds (the API's sweep, every 0.1 s here)."""
    serve(client, QUEUE)
    fid = upload(client, "q")
    waiting = [create_job(client, "q", fid, **on(SPARE)) for _ in range(2)]
    assert [r.status_code for r in waiting] == [200, 200]
    served = create_job(client, "q", fid)  # the quota's one slot, on the served queue
    assert served.status_code == 200
    assert create_job(client, "q", fid).status_code == 429
    ids = [r.json()["id"] for r in waiting]
    events = client.get(f"/v1/fine_tuning/jobs/{ids[0]}/events", headers=as_("q")).json()
    note = next(e["message"] for e in events["data"] if "No worker is live" in e["message"])
    assert f"queue '{SPARE}'" in note and "fails if none serves it within 1 s" in note

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        client.app.state.jobs.status(i) != JobStatus.failed for i in ids
    ):
        time.sleep(0.1)
    for job_id in ids:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=as_("q")).json()
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "no_worker" and SPARE in job["error"]["message"]
        assert job["error"]["param"] == "resources.queue"
    # the job on the served queue waits on: its queue has a worker
    served_id = served.json()["id"]
    assert client.app.state.jobs.status(served_id) == JobStatus.queued


def test_workers_refuse_a_queue_name_that_is_no_queue_name(unit_redis_url):
    with pytest.raises(ValueError, match="is not a queue name"):
        WorkerSettings(redis_url=unit_redis_url, queue="posttrain:tenant:a:quota-lock")
    with pytest.raises(ValueError, match="is not a queue name"):
        ApiSettings(redis_url=unit_redis_url, queues="ok,bad:name")
