"""``GET /metrics``: Prometheus' text format, parsed with prometheus_client's own parser,
from the in-process API on a real Redis and Celery broker (tests/e2e/test_prometheus.py
scrapes a running job's rates from the real worker)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from service.settings import ApiSettings
from tests.service.test_tenants import as_, create_job, key_file, upload
from workers.fleet import advertise, withdraw
from workers.inference.registry import registry_key

QUEUE = "posttrain.test-prom"


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue=QUEUE,
        queues="posttrain.spare",
        api_keys_file=key_file(tmp_path / "keys.json"),
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def scrape(client, who: str = "root") -> dict[str, list]:
    """Every sample of a scrape by metric name: [(labels, value), ...]."""
    resp = client.get("/metrics", headers=as_(who))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    hits = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else None


def test_requests_are_counted_by_route_template_and_status(client):
    client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=as_("a"))
    client.get("/v1/fine_tuning/jobs/ftjob-other", headers=as_("a"))
    client.get("/v1/fine_tuning/jobs", headers=as_("a"))
    client.get("/v1/no/such/route", headers=as_("a"))
    m = scrape(client)
    route = "/v1/fine_tuning/jobs/{job_id}"
    assert value(m, "posttrain_http_requests_total", route=route, status="404") == 2
    assert value(m, "posttrain_http_requests_total", route="/v1/fine_tuning/jobs", status="200")
    assert value(m, "posttrain_http_requests_total", route="unmatched", status="404") == 1
    assert not any("ftjob-nope" in str(lab) for lab, _ in m["posttrain_http_requests_total"])
    count = value(m, "posttrain_http_request_duration_seconds_count", method="GET", route=route)
    assert count == 2
    assert value(m, "posttrain_http_request_duration_seconds_bucket", route=route, le="+Inf") == 2


def test_jobs_by_status_tenant_and_queue_and_the_broker_depth(client):
    fid = upload(client, "a")
    for _ in range(2):
        assert create_job(client, "a", fid).status_code == 200
    fid_b = upload(client, "b")
    job_b = create_job(client, "b", fid_b).json()["id"]
    client.post(f"/v1/fine_tuning/jobs/{job_b}/cancel", headers=as_("b"))
    m = scrape(client)
    assert value(m, "posttrain_jobs", status="queued", tenant="team-a", queue=QUEUE) == 2
    assert value(m, "posttrain_jobs", status="cancelled", tenant="team-b", queue=QUEUE) == 1
    # three messages were sent to the broker (a cancel does not take one back)
    assert value(m, "posttrain_queue_messages", queue=QUEUE) == 3
    assert value(m, "posttrain_queue_messages", queue="posttrain.spare") == 0
    assert value(m, "posttrain_redis_up") == 1


def test_live_workers_and_their_devices(client):
    jobs = client.app.state.jobs
    advertise(jobs.r, jobs.p, QUEUE, "w-gpu", [0, 1], ["ddp"], ttl=600)
    advertise(jobs.r, jobs.p, QUEUE, "w-cpu", [], ["ddp"], ttl=600)
    advertise(jobs.r, jobs.p, "gpu.big", "w-big", [0], ["ddp"], ttl=600)
    m = scrape(client)
    assert value(m, "posttrain_workers", queue=QUEUE) == 2
    assert value(m, "posttrain_workers", queue="gpu.big") == 1
    assert value(m, "posttrain_worker_devices", worker="w-gpu", gpus="0,1") == 2
    assert value(m, "posttrain_worker_devices", worker="w-cpu", gpus="") == 0
    assert value(m, "posttrain_queue_messages", queue="gpu.big") == 0  # a served queue
    withdraw(jobs.r, jobs.p, QUEUE, "w-gpu")
    assert value(scrape(client), "posttrain_workers", queue=QUEUE) == 1
    jobs.r.hset(registry_key(jobs.p, "infer.cpu"), "i1", '{"name": "i1", "expires_at": 0}')
    assert value(scrape(client), "posttrain_inference_workers", queue="infer.cpu") == 0


def test_grader_runs_are_counted_by_type_and_outcome(client):
    grader = {
        "type": "string_check",
        "name": "s",
        "input": "{{sample.output_text}}",
        "reference": "x",
        "operation": "eq",
    }
    ok = {"grader": grader, "item": {}, "model_sample": "x"}
    assert client.post("/v1/fine_tuning/alpha/graders/run", json=ok, headers=as_("a")).is_success
    bad = {"grader": {**grader, "operation": "nope"}, "item": {}, "model_sample": "x"}
    resp = client.post("/v1/fine_tuning/alpha/graders/run", json=bad, headers=as_("a"))
    assert resp.status_code == 400
    made_up = {"grader": {"type": "x" * 40}, "item": {}, "model_sample": "x"}
    client.post("/v1/fine_tuning/alpha/graders/run", json=made_up, headers=as_("a"))
    m = scrape(client)
    assert value(m, "posttrain_grader_runs_total", type="string_check", outcome="ok") == 1
    assert value(m, "posttrain_grader_runs_total", type="string_check", outcome="refused") == 1
    assert value(m, "posttrain_grader_runs_total", type="other", outcome="refused") == 1


def test_only_an_admin_key_may_scrape(client):
    assert client.get("/metrics").status_code == 401
    resp = client.get("/metrics", headers=as_("a"))
    assert resp.status_code == 403 and "admin" in resp.json()["error"]["message"]
    assert client.get("/metrics", headers=as_("root")).status_code == 200


@pytest.mark.parametrize("access,status", [("public", 200), ("off", 404)])
def test_public_and_off(settings, access, status):
    with TestClient(create_app(settings.model_copy(update={"metrics_access": access}))) as c:
        assert c.get("/metrics").status_code == status


def test_a_redis_outage_is_reported_not_a_500(settings, tmp_path):
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(dead.model_copy(update={"metrics_access": "public"}))) as c:
        resp = c.get("/metrics")
        assert resp.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(resp.text)}
        assert families["posttrain_redis_up"].samples[0].value == 0
