"""Webhooks (extension): endpoints per tenant, and events delivered to a receiver on
loopback that verifies each Standard Webhooks signature with the ``standardwebhooks``
library, answering 500 before it accepts. The API is in-process (its lifespan runs the
deliverer) on a real Redis; a job ends through the API (a cancel) or through the job
store as a worker ends it."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.main import create_app
from service.settings import ApiSettings
from tests.loopback import Handler, serving
from tests.service.test_tenants import as_, create_job, key_file, upload
from workers.store import JobStatus


class Receiver:
    """An HTTP endpoint on loopback: answers the statuses in ``plan`` in turn (then 200)
    and keeps every request it got."""

    def __init__(self, plan=()):
        self.plan, self.got = list(plan), []
        outer = self

        class Hook(Handler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append((dict(self.headers), body))
                self.reply(outer.plan.pop(0) if outer.plan else 200, b"")

        self._serving = serving(Hook)
        self.url = self._serving.__enter__() + "/hook"

    def close(self):
        self._serving.__exit__(None, None, None)


@pytest.fixture
def receiver():
    r = Receiver([500, 500])
    yield r
    r.close()


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-hooks",
        api_keys_file=key_file(tmp_path / "keys.json"),
        webhook_allowed_networks="127.0.0.0/8",
        webhook_retry_seconds=0.2,
        webhook_poll_seconds=0.05,
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def register(client, who, url, **extra):
    resp = client.post("/v1/webhooks", json={"url": url, **extra}, headers=as_(who))
    assert resp.status_code == 200, resp.text
    return resp.json()


def log_of(client, who, hook_id):
    resp = client.get(f"/v1/webhooks/{hook_id}/deliveries", headers=as_(who))
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def wait_until(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def new_job(client, who="a") -> str:
    resp = create_job(client, who, upload(client, who))
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def test_a_cancel_is_delivered_signed_and_retried_after_500s(client, receiver):
    hook = register(client, "a", receiver.url, description="ci")
    assert hook["secret"].startswith("whsec_") and hook["events"][0] == "fine_tuning.job.succeeded"
    job_id = new_job(client)
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=as_("a")).is_success
    entries = wait_until(
        lambda: (e := log_of(client, "a", hook["id"])) and e[0]["outcome"] == "delivered" and e,
        "the third try to be accepted",
    )
    assert [(e["attempt"], e["status_code"], e["outcome"]) for e in reversed(entries)] == [
        (1, 500, "retrying"),
        (2, 500, "retrying"),
        (3, 200, "delivered"),
    ]
    assert entries[1]["next_attempt_at"] >= entries[2]["at"]
    assert len(receiver.got) == 3
    verifier = Webhook(hook["secret"])
    ids = set()
    for headers, body in receiver.got:
        lowered = {k.lower(): v for k, v in headers.items()}
        event = verifier.verify(body, lowered)  # raises on a bad signature or timestamp
        assert event["type"] == "fine_tuning.job.cancelled" and event["data"] == {"id": job_id}
        assert event["object"] == "event" and lowered["webhook-id"] == event["id"]
        ids.add(event["id"])
    assert len(ids) == 1  # one event, the same id on every try
    with pytest.raises(WebhookVerificationError):  # another secret: refused
        Webhook("whsec_" + "A" * 43 + "=").verify(receiver.got[0][1], lowered)


def test_a_worker_ending_a_job_reaches_its_tenants_endpoints_only(client, settings):
    a, b = Receiver(), Receiver()
    try:
        hook_a = register(client, "a", a.url, events=["fine_tuning.job.succeeded"])
        register(client, "b", b.url)
        job_id = new_job(client)
        jobs = client.app.state.jobs
        jobs.transition(job_id, JobStatus.running)
        jobs.transition(job_id, JobStatus.succeeded)  # as the worker's supervisor does
        wait_until(lambda: a.got, "tenant A's delivery")
        event = json.loads(a.got[0][1])
        assert event["type"] == "fine_tuning.job.succeeded" and event["data"]["id"] == job_id
        assert log_of(client, "a", hook_a["id"])[0]["outcome"] == "delivered"
        time.sleep(0.5)  # several delivery passes: nothing may reach tenant B
        assert b.got == []
    finally:
        a.close()
        b.close()


def test_events_wait_for_an_api_and_survive_its_restart(settings, receiver):
    with TestClient(create_app(settings)) as c:
        hook = register(c, "a", receiver.url, events=["fine_tuning.job.failed"])
        job_id = new_job(c)
        wait_until(lambda: True, "")
    # no API runs: a worker fails the job meanwhile
    app = create_app(settings)
    app.state.jobs.transition(job_id, JobStatus.failed)
    receiver.plan = [500]
    with TestClient(app) as c:
        wait_until(lambda: receiver.got, "the first try")
    assert len(receiver.got) == 1  # the API stopped after one refused try
    with TestClient(create_app(settings)) as c:
        entries = wait_until(
            lambda: (e := log_of(c, "a", hook["id"])) and e[0]["outcome"] == "delivered" and e,
            "the retry by the restarted API",
        )
    assert [e["attempt"] for e in reversed(entries)] == [1, 2]
    assert json.loads(receiver.got[1][1])["data"]["id"] == job_id


def test_a_delivery_fails_for_good_after_its_max_age(settings, receiver):
    receiver.plan = [503] * 100
    short = settings.model_copy(update={"webhook_max_age_seconds": 0.5})
    with TestClient(create_app(short)) as c:
        hook = register(c, "a", receiver.url)
        job_id = new_job(c)
        c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=as_("a"))
        entries = wait_until(
            lambda: (e := log_of(c, "a", hook["id"])) and e[0]["outcome"] == "failed" and e,
            "the delivery to be given up",
        )
        assert all(e["status_code"] == 503 for e in entries)
        tries = len(receiver.got)
        time.sleep(0.5)
        assert len(receiver.got) == tries  # no more tries


def test_registration_checks_the_url_and_the_address_policy(client, settings, receiver):
    for url, words in [
        ("ftp://example.org/x", "http:// or https://"),
        ("http://user:pw@example.org/x", "credentials"),
        ("not a url", "http:// or https://"),
    ]:
        resp = client.post("/v1/webhooks", json={"url": url}, headers=as_("a"))
        assert resp.status_code == 400 and words in resp.json()["error"]["message"], url
        assert resp.json()["error"]["param"] == "url"
    strict = settings.model_copy(update={"webhook_allowed_networks": ""})
    with TestClient(create_app(strict)) as c:
        for url in (
            receiver.url,
            "http://10.1.2.3/x",
            "http://[::1]:9/x",
            "http://169.254.169.254/",
        ):
            resp = c.post("/v1/webhooks", json={"url": url}, headers=as_("a"))
            assert resp.status_code == 400, url
            assert "non-public address" in resp.json()["error"]["message"]
    resp = client.post(
        "/v1/webhooks", json={"url": receiver.url, "events": ["job.done"]}, headers=as_("a")
    )
    assert resp.status_code == 400 and "events" in resp.json()["error"]["param"]


def test_endpoints_are_per_tenant_and_the_secret_is_shown_once(client, receiver):
    hook = register(client, "a", receiver.url)
    listed = client.get("/v1/webhooks", headers=as_("a")).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]]
    shown = client.get(f"/v1/webhooks/{hook['id']}", headers=as_("a")).json()
    assert shown["secret"] == "whsec_..." + hook["secret"][-4:]
    assert client.get("/v1/webhooks", headers=as_("b")).json()["data"] == []
    for method in ("GET", "DELETE"):
        resp = client.request(method, f"/v1/webhooks/{hook['id']}", headers=as_("b"))
        assert resp.status_code == 404
        unknown = client.request(method, "/v1/webhooks/wh_unknown", headers=as_("b"))
        assert resp.json()["error"]["message"].replace(hook["id"], "X") == unknown.json()["error"][
            "message"
        ].replace("wh_unknown", "X")
    assert client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=as_("b")).status_code == 404
    resp = client.delete(f"/v1/webhooks/{hook['id']}", headers=as_("a"))
    assert resp.json() == {"id": hook["id"], "object": "webhook_endpoint", "deleted": True}
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=as_("a")).status_code == 404


def test_an_eval_run_that_completes_is_announced(client, settings, receiver):
    from tests.service.test_tenants import create_eval
    from workers.evaltasks import grade_run

    receiver.plan = []
    hook = register(client, "a", receiver.url, events=["eval.run.succeeded"])
    eval_id = create_eval(client, "a")
    content = [{"item": {"a": "x"}}]
    source = {"type": "jsonl", "source": {"type": "file_content", "content": content}}
    resp = client.post(f"/v1/evals/{eval_id}/runs", json={"data_source": source}, headers=as_("a"))
    run_id = resp.json()["id"]
    app = client.app
    assert grade_run(run_id, app.state.eval_runs, app.state.files, settings) == "completed"
    wait_until(lambda: receiver.got, "the eval run's event")
    event = json.loads(receiver.got[0][1])
    assert event["type"] == "eval.run.succeeded" and event["data"] == {"id": run_id}
    assert log_of(client, "a", hook["id"])[0]["outcome"] == "delivered"
