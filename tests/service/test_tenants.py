"""Tenants through the real API: every route answers another tenant's ids with 404.

The route walk is generated from the app's router: a route added later fails
``test_every_route_is_walked`` until it is given a check here (or an exemption
with its reason). The API runs in-process against the suite's real Redis and
Celery broker; the bind refusal runs ``posttrain serve`` and uvicorn as processes.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.auth import KeyRing, Tenant, hash_key, read_key_file
from service.main import create_app
from service.settings import ApiSettings
from tests import redis_server
from workers.evaltasks import grade_run
from workers.fleet import advertise
from workers.store import JobStatus

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
KEYS = {"a": "key-of-a", "b": "key-of-b", "root": "key-of-admin", "q": "key-of-q"}
SECRET = "root:x:0:0:this line must never leave the host"


def key_file(path: Path, extra: dict | None = None) -> Path:
    tenants = {
        "team-a": {"keys": [hash_key(KEYS["a"])]},
        "team-b": {"keys": [hash_key(KEYS["b"])]},
        "ops": {"keys": [hash_key(KEYS["root"])], "admin": True},
        "small": {
            "keys": [hash_key(KEYS["q"])],
            "max_active_jobs": 1,
            "max_concurrent_eval_runs": 1,
        },
        **(extra or {}),
    }
    path.write_text(json.dumps({"tenants": tenants}))
    return path


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-tenants",
        api_keys_file=key_file(tmp_path / "keys.json"),
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def as_(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS.get(who, who)}"}


def upload(client, who, rows=(CHAT,)):
    body = "\n".join(json.dumps(r) for r in rows).encode()
    resp = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", io.BytesIO(body))},
        data={"purpose": "fine-tune"},
        headers=as_(who),
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def create_job(client, who, file_id, headers=None, **extra):
    body = {"model": "tiny", "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body, headers={**as_(who), **(headers or {})})


@dataclass
class World:
    """Tenant A's objects, each of the kinds a route can reach."""

    file_id: str
    job_id: str
    ckpt_id: str
    ckpt_dir: Path
    fine_tuned_model: str
    extra: dict = field(default_factory=dict)


def build_world(client, app, settings) -> World:
    jobs = app.state.jobs
    fid = upload(client, "a")
    resp = create_job(client, "a", fid, integrations=[{"type": "tensorboard"}])
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["id"]
    # what a worker would have written: a running job with metrics, its tracker's run and a
    # checkpoint
    tracker = Path(settings.data_dir) / "jobs" / job_id / "output" / "trackers" / "tensorboard"
    tracker.mkdir(parents=True)
    (tracker / "events.out.tfevents.1.host").write_bytes(b"\0")
    jobs.set_fields(job_id, status=str(JobStatus.running))
    jobs.add_metrics(job_id, 1, {"loss": 1.5})
    ckpt_dir = Path(settings.data_dir) / "jobs" / job_id / "output" / "checkpoint-1"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    secret = Path(settings.data_dir) / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    (ckpt_dir / "leak.txt").symlink_to(secret)
    (ckpt_dir / "leakdir").symlink_to(secret.parent, target_is_directory=True)
    ckpt_id = "ftckpt-0123456789abcdef01234567"
    name = f"ft:tiny:{job_id}:ckpt-step-1"
    jobs.add_checkpoint(
        job_id,
        {
            "id": ckpt_id,
            "step": 1,
            "created_at": int(time.time()),
            "path": str(ckpt_dir.relative_to(settings.data_dir)),
            "metrics": {"step": 1},
            "final": True,
            "fine_tuned_model_checkpoint": name,
        },
    )
    world = World(fid, job_id, ckpt_id, ckpt_dir, f"ft:tiny:posttrain:{job_id}")
    world.extra["eval_id"] = eid = create_eval(client, "a")
    content = [{"item": {"a": "x"}}, {"item": {"a": "y"}}]
    resp = client.post(
        f"/v1/evals/{eid}/runs",
        headers=as_("a"),
        json={
            "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": content}}
        },
    )
    assert resp.status_code == 201, resp.text
    world.extra["run_id"] = run_id = resp.json()["id"]
    assert grade_run(run_id, app.state.eval_runs, app.state.files, settings) == "completed"
    world.extra["output_item_id"] = app.state.eval_runs.item(run_id, 0)["id"]
    hook = app.state.webhooks.create("team-a", PUBLIC_HOOK, ["fine_tuning.job.failed"], "")
    world.extra["webhook_id"] = hook["id"]
    return world


PUBLIC_HOOK = "http://93.184.215.14/hook"  # an address literal: checked without DNS


def _create_webhook(client, app, w):
    resp = client.post("/v1/webhooks", json={"url": PUBLIC_HOOK}, headers=as_("b"))
    assert resp.status_code == 200, resp.text
    assert app.state.webhooks.owner(resp.json()["id"]) == "team-b"


def _list_webhooks(client, app, w):
    listed = client.get("/v1/webhooks", headers=as_("b")).json()["data"]
    assert w.extra["webhook_id"] not in [h["id"] for h in listed]
    listed = client.get("/v1/webhooks", headers=as_("a")).json()["data"]
    assert w.extra["webhook_id"] in [h["id"] for h in listed]


def _delete_webhook(client, app, w):
    hook_id = w.extra["webhook_id"]
    assert client.delete(f"/v1/webhooks/{hook_id}", headers=as_("b")).status_code == 404
    assert app.state.webhooks.owner(hook_id) == "team-a"


def create_eval(client, who, name="e") -> str:
    resp = client.post(
        "/v1/evals",
        headers=as_(who),
        json={
            "name": name,
            "data_source_config": {
                "type": "custom",
                "item_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
            "testing_criteria": [
                {
                    "type": "string_check",
                    "name": "c",
                    "input": "{{item.a}}",
                    "reference": "x",
                    "operation": "eq",
                }
            ],
        },
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _status(app, job_id):
    return app.state.jobs.get(job_id)["status"]


# Each walked route: (method, path) -> check(client, app, world). A check makes tenant
# B's request on tenant A's object, asserts the 404 (or, for lists, that nothing of A's
# shows), and that A's object is untouched.
def _get_404(path_of):
    def check(client, app, w):
        resp = client.get(path_of(w), headers=as_("b"))
        assert resp.status_code == 404, (path_of(w), resp.text)
        assert resp.json()["error"]["code"] == "not_found"
        assert client.get(path_of(w), headers=as_("a")).status_code == 200

    return check


def _job_action_404(action):
    def check(client, app, w):
        before = _status(app, w.job_id)
        resp = client.post(f"/v1/fine_tuning/jobs/{w.job_id}/{action}", headers=as_("b"))
        assert resp.status_code == 404, resp.text
        assert _status(app, w.job_id) == before

    return check


def _list_files(client, app, w):
    fid_b = upload(client, "b")
    ids = [f["id"] for f in client.get("/v1/files", headers=as_("b")).json()["data"]]
    assert ids == [fid_b]
    resp = client.get("/v1/files", params={"after": w.file_id}, headers=as_("b"))
    assert resp.status_code == 404  # A's id is no cursor for B
    assert w.file_id in [f["id"] for f in client.get("/v1/files", headers=as_("a")).json()["data"]]


def _list_jobs(client, app, w):
    ids = [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=as_("b")).json()["data"]]
    assert w.job_id not in ids
    resp = client.get("/v1/fine_tuning/jobs", params={"after": w.job_id}, headers=as_("b"))
    assert resp.status_code == 404
    mine = client.get("/v1/fine_tuning/jobs", headers=as_("a")).json()["data"]
    assert w.job_id in [j["id"] for j in mine]


def _upload(client, app, w):
    fid_b = upload(client, "b")
    assert client.get(f"/v1/files/{fid_b}", headers=as_("a")).status_code == 404
    assert app.state.files.get(fid_b)["tenant"] == "team-b"


def _create_job(client, app, w):
    # B cannot train on A's file, nor from A's fine-tuned model or checkpoint
    resp = create_job(client, "b", w.file_id)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "training_file"
    fid_b = upload(client, "b")
    for model in (w.fine_tuned_model, w.ckpt_id, f"ft:tiny:{w.job_id}:ckpt-step-1"):
        resp = create_job(client, "b", fid_b, model=model)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["message"] == "model not found or not allowed"
    # ...and the same Idempotency-Key as A's names B's own job, never A's
    key = {"Idempotency-Key": "same-key"}
    ja = create_job(client, "a", w.file_id, headers=key).json()["id"]
    jb = create_job(client, "b", fid_b, headers=key, suffix="b")
    assert jb.status_code == 200 and jb.headers["Idempotent-Replayed"] == "false"
    assert jb.json()["id"] != ja
    assert app.state.jobs.get(jb.json()["id"])["tenant"] == "team-b"


def _delete_file(client, app, w):
    assert client.delete(f"/v1/files/{w.file_id}", headers=as_("b")).status_code == 404
    assert client.get(f"/v1/files/{w.file_id}", headers=as_("a")).status_code == 200


def _delete_job(client, app, w):
    app.state.jobs.set_fields(w.job_id, status=str(JobStatus.succeeded))
    try:
        resp = client.delete(f"/v1/fine_tuning/jobs/{w.job_id}", headers=as_("b"))
        assert resp.status_code == 404, resp.text
        assert app.state.jobs.exists(w.job_id)
    finally:
        app.state.jobs.set_fields(w.job_id, status=str(JobStatus.running))


def _ckpt_content(client, app, w):
    path = f"/v1/fine_tuning/jobs/{w.job_id}/checkpoints/{w.ckpt_id}/content"
    assert client.get(path, headers=as_("b")).status_code == 404
    resp = client.get(path, headers=as_("a"))
    assert resp.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers()]
    assert names == ["config.json"]  # the symlinks to a file and a dir outside: not followed
    assert SECRET.encode() not in resp.content


def _models_list(client, app, w):
    app.state.jobs.set_fields(
        w.job_id, status=str(JobStatus.succeeded), fine_tuned_model=w.fine_tuned_model
    )
    try:
        ids = [m["id"] for m in client.get("/v1/models", headers=as_("b")).json()["data"]]
        assert w.fine_tuned_model not in ids
        mine = [m["id"] for m in client.get("/v1/models", headers=as_("a")).json()["data"]]
        assert w.fine_tuned_model in mine
    finally:
        app.state.jobs.set_fields(w.job_id, status=str(JobStatus.running))


def _model_one(method):
    def check(client, app, w):
        app.state.jobs.set_fields(
            w.job_id, status=str(JobStatus.succeeded), fine_tuned_model=w.fine_tuned_model
        )
        try:
            resp = client.request(method, f"/v1/models/{w.fine_tuned_model}", headers=as_("b"))
            assert resp.status_code == 404, resp.text
            got = client.get(f"/v1/models/{w.fine_tuned_model}", headers=as_("a"))
            assert got.status_code == 200
        finally:
            app.state.jobs.set_fields(w.job_id, status=str(JobStatus.running))

    return check


def _create_eval(client, app, w):
    eid_b = create_eval(client, "b")
    assert client.get(f"/v1/evals/{eid_b}", headers=as_("a")).status_code == 404
    assert app.state.evals.get(eid_b)["tenant"] == "team-b"


def _list_evals(client, app, w):
    eid = w.extra["eval_id"]
    assert eid not in [e["id"] for e in client.get("/v1/evals", headers=as_("b")).json()["data"]]
    resp = client.get("/v1/evals", params={"after": eid}, headers=as_("b"))
    assert resp.status_code == 404  # A's id is no cursor for B
    assert eid in [e["id"] for e in client.get("/v1/evals", headers=as_("a")).json()["data"]]


def _update_eval(client, app, w):
    eid = w.extra["eval_id"]
    resp = client.post(f"/v1/evals/{eid}", json={"name": "stolen"}, headers=as_("b"))
    assert resp.status_code == 404, resp.text
    assert client.get(f"/v1/evals/{eid}", headers=as_("a")).json()["name"] == "e"


def _delete_eval(client, app, w):
    eid = w.extra["eval_id"]
    assert client.delete(f"/v1/evals/{eid}", headers=as_("b")).status_code == 404
    assert client.get(f"/v1/evals/{eid}", headers=as_("a")).status_code == 200


def _inference(path: str):
    """B asking for A's fine-tuned model, checkpoint id or checkpoint name gets the 404 of
    an unknown model; A's own checkpoint resolves (and, with no inference worker running
    here, is the 503 that says so)."""

    def check(client, app, w):
        def body(model):
            if path.endswith("chat/completions"):
                return {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            return {"model": model, "prompt": "hi"}

        app.state.jobs.set_fields(
            w.job_id, status=str(JobStatus.succeeded), fine_tuned_model=w.fine_tuned_model
        )
        try:
            unknown = client.post(path, json=body("ft:tiny:x:ftjob-nope"), headers=as_("b"))
            assert unknown.status_code == 404
            for model in (w.fine_tuned_model, w.ckpt_id, f"ft:tiny:{w.job_id}:ckpt-step-1"):
                resp = client.post(path, json=body(model), headers=as_("b"))
                assert resp.status_code == 404, resp.text
                assert resp.json()["error"]["code"] == "model_not_found"
                assert resp.json()["error"]["message"].replace(model, "?") == unknown.json()[
                    "error"
                ]["message"].replace("ft:tiny:x:ftjob-nope", "?")
            own = client.post(path, json=body(w.ckpt_id), headers=as_("a"))
            assert own.status_code == 503, own.text
            assert own.json()["error"]["code"] == "no_inference_worker"
        finally:
            app.state.jobs.set_fields(w.job_id, status=str(JobStatus.running))

    return check


JOB = "/v1/fine_tuning/jobs/{job_id}"


def _run_path(w, tail=""):
    return f"/v1/evals/{w.extra['eval_id']}/runs/{w.extra['run_id']}{tail}"


def _create_run(client, app, w):
    eid = w.extra["eval_id"]
    body = {
        "data_source": {
            "type": "jsonl",
            "source": {"type": "file_content", "content": [{"item": {"a": "z"}}]},
        }
    }
    assert client.post(f"/v1/evals/{eid}/runs", json=body, headers=as_("b")).status_code == 404
    assert app.state.eval_runs.r.zcard(app.state.eval_runs.k_index(eid)) == 1
    # B's run under B's eval is not reachable through A's eval either
    eid_b = create_eval(client, "b")
    resp = client.post(f"/v1/evals/{eid_b}/runs", json=body, headers=as_("b"))
    assert resp.status_code == 201, resp.text
    assert (
        client.get(f"/v1/evals/{eid}/runs/{resp.json()['id']}", headers=as_("a")).status_code == 404
    )


def _list_runs(client, app, w):
    path = f"/v1/evals/{w.extra['eval_id']}/runs"
    assert client.get(path, headers=as_("b")).status_code == 404
    ids = [r["id"] for r in client.get(path, headers=as_("a")).json()["data"]]
    assert w.extra["run_id"] in ids


def _run_action_404(method, tail=""):
    def check(client, app, w):
        resp = client.request(method, _run_path(w, tail), headers=as_("b"))
        assert resp.status_code == 404, resp.text
        rec = app.state.eval_runs.get(w.extra["run_id"])
        assert rec["status"] == "completed" and rec["progress"] == 2

    return check


def _run_events(client, app, w):
    assert client.get(_run_path(w, "/events"), headers=as_("b")).status_code == 404
    own = client.get(_run_path(w, "/events"), headers=as_("a")).json()["data"]
    assert own[0]["type"] == "completed"  # A's own events, newest first


WALK = {
    ("POST", "/v1/files"): _upload,
    ("GET", "/v1/files"): _list_files,
    ("GET", "/v1/files/{file_id}"): _get_404(lambda w: f"/v1/files/{w.file_id}"),
    ("GET", "/v1/files/{file_id}/content"): _get_404(lambda w: f"/v1/files/{w.file_id}/content"),
    ("DELETE", "/v1/files/{file_id}"): _delete_file,
    ("POST", "/v1/fine_tuning/jobs"): _create_job,
    ("GET", "/v1/fine_tuning/jobs"): _list_jobs,
    ("GET", JOB): _get_404(lambda w: f"/v1/fine_tuning/jobs/{w.job_id}"),
    ("DELETE", JOB): _delete_job,
    ("POST", JOB + "/cancel"): _job_action_404("cancel"),
    ("POST", JOB + "/pause"): _job_action_404("pause"),
    ("POST", JOB + "/resume"): _job_action_404("resume"),
    ("GET", JOB + "/events"): _get_404(lambda w: f"/v1/fine_tuning/jobs/{w.job_id}/events"),
    ("GET", JOB + "/checkpoints"): _get_404(
        lambda w: f"/v1/fine_tuning/jobs/{w.job_id}/checkpoints"
    ),
    ("GET", JOB + "/checkpoints/{checkpoint_id}/content"): _ckpt_content,
    ("GET", JOB + "/metrics"): _get_404(lambda w: f"/v1/fine_tuning/jobs/{w.job_id}/metrics"),
    ("GET", JOB + "/samples"): _get_404(lambda w: f"/v1/fine_tuning/jobs/{w.job_id}/samples"),
    ("GET", JOB + "/integrations/{type}/content"): _get_404(
        lambda w: f"/v1/fine_tuning/jobs/{w.job_id}/integrations/tensorboard/content"
    ),
    ("GET", "/v1/models"): _models_list,
    ("GET", "/v1/models/{model_id:path}"): _model_one("GET"),
    ("DELETE", "/v1/models/{model_id:path}"): _model_one("DELETE"),
    ("POST", "/v1/chat/completions"): _inference("/v1/chat/completions"),
    ("POST", "/v1/completions"): _inference("/v1/completions"),
    ("POST", "/v1/evals"): _create_eval,
    ("GET", "/v1/evals"): _list_evals,
    ("GET", "/v1/evals/{eval_id}"): _get_404(lambda w: f"/v1/evals/{w.extra['eval_id']}"),
    ("POST", "/v1/evals/{eval_id}"): _update_eval,
    ("DELETE", "/v1/evals/{eval_id}"): _delete_eval,
    ("POST", "/v1/evals/{eval_id}/runs"): _create_run,
    ("GET", "/v1/evals/{eval_id}/runs"): _list_runs,
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}"): _get_404(_run_path),
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}"): _run_action_404("POST"),
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}/cancel"): _run_action_404("POST", "/cancel"),
    ("DELETE", "/v1/evals/{eval_id}/runs/{run_id}"): _run_action_404("DELETE"),
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items"): _get_404(
        lambda w: _run_path(w, "/output_items")
    ),
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"): _get_404(
        lambda w: _run_path(w, f"/output_items/{w.extra['output_item_id']}")
    ),
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/events"): _run_events,
    ("POST", "/v1/webhooks"): _create_webhook,
    ("GET", "/v1/webhooks"): _list_webhooks,
    ("GET", "/v1/webhooks/{webhook_id}"): _get_404(
        lambda w: f"/v1/webhooks/{w.extra['webhook_id']}"
    ),
    ("DELETE", "/v1/webhooks/{webhook_id}"): _delete_webhook,
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): _get_404(
        lambda w: f"/v1/webhooks/{w.extra['webhook_id']}/deliveries"
    ),
}


EXEMPT = {
    ("GET", "/healthz"): "liveness; reads no stored data",
    ("GET", "/readyz"): "readiness; reads no stored data",
    ("GET", "/openapi.json"): "the schema; reads no stored data",
    ("GET", "/docs"): "the schema's page; reads no stored data",
    ("GET", "/docs/assets/{name}"): "Swagger UI's own files; no data",
    ("GET", "/dashboard"): "a redirect to the dashboard's page",
    ("GET", "/dashboard/"): "the dashboard's static page; its data comes from keyed routes",
    ("GET", "/dashboard/{name}"): "the dashboard's static scripts and styles; no data",
    ("GET", "/metrics"): "admins only (tests/service/test_prometheus.py: 403 for a tenant)",
    ("POST", "/v1/fine_tuning/alpha/graders/run"): "grades the request's own text; no ids",
    ("POST", "/v1/fine_tuning/alpha/graders/validate"): "checks the request's grader; no ids",
}


def _routes(app) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
        if method != "HEAD"
    }


def test_every_route_is_walked(app):
    """A route nobody checked for tenant isolation fails here until it is added to WALK
    (or to EXEMPT with its reason)."""
    missing = sorted(_routes(app) - WALK.keys() - EXEMPT.keys())
    assert not missing, f"routes with no tenant check in tests/service/test_tenants.py: {missing}"


def test_another_tenant_gets_404_on_every_route(client, app, settings):
    world = build_world(client, app, settings)
    walked = sorted(_routes(app) & WALK.keys())
    assert len(walked) >= 16
    for key in walked:
        WALK[key](client, app, world)


def test_every_route_refuses_without_a_key(client, app):
    for method, path in sorted(_routes(app) - EXEMPT.keys()):
        url = path.replace("{model_id:path}", "ft:m:s:ftjob-x").format(
            file_id="file-x",
            job_id="ftjob-x",
            checkpoint_id="c",
            type="tensorboard",
            eval_id="eval_x",
            run_id="evalrun_x",
            output_item_id="outputitem_x",
            webhook_id="wh_x",
        )
        assert client.request(method, url).status_code == 401, (method, path)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("Bearer key-of-a", 200),
        ("bearer key-of-a", 200),  # RFC 7235: the scheme is case-insensitive
        ("BEARER   key-of-a  ", 200),
        ("key-of-a", 401),  # a raw key without its scheme is no credential
        ("Basic key-of-a", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
    ],
)
def test_the_bearer_scheme_is_required_and_case_insensitive(client, header, status):
    assert client.get("/v1/files", headers={"Authorization": header}).status_code == status


def test_admin_sees_every_tenant(client, app, settings):
    world = build_world(client, app, settings)
    fid_b = upload(client, "b")
    jb = create_job(client, "b", fid_b).json()["id"]
    ids = [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=as_("root")).json()["data"]]
    assert {world.job_id, jb} <= set(ids)
    files = client.get("/v1/files", headers=as_("root")).json()["data"]
    assert {world.file_id, fid_b} <= {f["id"] for f in files}
    assert client.get(f"/v1/fine_tuning/jobs/{world.job_id}", headers=as_("root")).is_success
    assert client.get(f"/v1/files/{fid_b}/content", headers=as_("root")).is_success
    # ...and the admin's own jobs are the admin's
    mine = create_job(client, "root", fid_b).json()["id"]
    assert app.state.jobs.get(mine)["tenant"] == "ops"
    assert client.get(f"/v1/fine_tuning/jobs/{mine}", headers=as_("b")).status_code == 404


def test_legacy_key_list_makes_each_key_its_own_tenant(settings):
    settings.api_keys_file = None
    settings.api_keys = "k1, k2"
    with TestClient(create_app(settings)) as client:
        fid = upload(client, "k1")
        job = create_job(client, "k1", fid).json()["id"]
        assert client.get(f"/v1/files/{fid}", headers=as_("k2")).status_code == 404
        assert client.get(f"/v1/fine_tuning/jobs/{job}", headers=as_("k2")).status_code == 404
        assert client.get("/v1/fine_tuning/jobs", headers=as_("k2")).json()["data"] == []
        own = client.get("/v1/fine_tuning/jobs", headers=as_("k1")).json()["data"]
        assert [j["id"] for j in own] == [job]
        assert client.get("/v1/files", headers=as_("k3")).status_code == 401


def test_records_without_a_tenant_belong_to_the_default_tenant(settings, tmp_path):
    settings.api_keys_file = key_file(
        tmp_path / "keys2.json", {"default": {"keys": [hash_key("key-of-default")]}}
    )
    with TestClient(create_app(settings)) as client:
        app = client.app
        fid = upload(client, "a")
        spec = app.state.jobs.get(create_job(client, "a", fid).json()["id"])["spec"]
        app.state.jobs.create("ftjob-old", spec, JobStatus.succeeded)  # as the first release did
        assert "tenant" not in app.state.jobs.get("ftjob-old")
        assert client.get("/v1/fine_tuning/jobs/ftjob-old", headers=as_("a")).status_code == 404
        old = client.get("/v1/fine_tuning/jobs/ftjob-old", headers=as_("key-of-default"))
        assert old.status_code == 200
        listed = client.get("/v1/fine_tuning/jobs", headers=as_("key-of-default")).json()
        assert [j["id"] for j in listed["data"]] == ["ftjob-old"]


def test_auth_off_is_one_default_tenant(settings):
    settings.api_keys_file = None
    with TestClient(create_app(settings)) as client:
        fid = upload(client, "anyone")
        job = create_job(client, "anyone", fid).json()["id"]
        assert client.app.state.jobs.get(job)["tenant"] == "default"
        assert client.get(f"/v1/fine_tuning/jobs/{job}").status_code == 200


def test_quota_on_concurrent_jobs_is_a_429_until_one_ends(client, app, settings):
    # a live worker serves the queue (jobs waiting on an unserved queue hold no quota)
    advertise(app.state.jobs.r, settings.key_prefix, settings.queue, "w1", [], ["ddp"], 600)
    fid = upload(client, "q")
    first = create_job(client, "q", fid)
    assert first.status_code == 200
    refused = create_job(client, "q", fid, headers={"Idempotency-Key": "retry-me"})
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "quota_exceeded" and "quota of 1" in err["message"]
    assert len(client.get("/v1/fine_tuning/jobs", headers=as_("q")).json()["data"]) == 1
    # other tenants are not limited by it
    assert create_job(client, "a", upload(client, "a")).status_code == 200
    # paused still counts; a terminal job frees the slot
    app.state.jobs.set_fields(first.json()["id"], status=str(JobStatus.paused))
    assert create_job(client, "q", fid).status_code == 429
    cancel = client.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel", headers=as_("q"))
    assert cancel.status_code == 200
    again = create_job(client, "q", fid, headers={"Idempotency-Key": "retry-me"})
    assert again.status_code == 200, again.text  # the refused request did not keep the key
    assert again.headers["Idempotent-Replayed"] == "false"


def test_a_tenant_s_own_eval_run_limit_overrides_the_setting(client, app, settings):
    """``max_concurrent_eval_runs`` in the key file: recorded on the tenant's runs (and on
    its jobs with an eval per checkpoint), and the claim holds the tenant to it."""
    runs = app.state.eval_runs
    content = [{"item": {"a": "x"}}]
    body = {
        "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": content}}
    }
    made = {}
    for who in ("q", "a"):
        eid = create_eval(client, who)
        ids = [
            client.post(f"/v1/evals/{eid}/runs", json=body, headers=as_(who)).json()["id"]
            for _ in range(2)
        ]
        made[who] = (eid, ids)
    assert [runs.get(r)["limit"] for r in made["q"][1]] == [1, 1]
    assert [runs.get(r)["limit"] for r in made["a"][1]] == [2, 2]  # the setting
    first, second = made["q"][1]
    assert runs.claim(first, "w", 30, 1, 3).outcome == "claimed"
    assert grade_run(second, runs, app.state.files, settings) == "waiting"
    assert [grade_run(r, runs, app.state.files, settings) for r in made["a"][1]] == [
        "completed",
        "completed",
    ]
    # an admin's run on the tenant's eval gets the tenant's limit, not the admin's
    eid = made["q"][0]
    by_admin = client.post(f"/v1/evals/{eid}/runs", json=body, headers=as_("root")).json()["id"]
    assert runs.get(by_admin)["limit"] == 1 and runs.get(by_admin)["tenant"] == "small"
    # a job with an eval per checkpoint records the limit for the runs its worker makes
    ds = {**body["data_source"], "type": "completions", "input_messages": {
        "type": "template", "template": [{"role": "user", "content": "{{item.a}}"}]}}  # fmt: skip
    fid = upload(client, "q")
    job = create_job(client, "q", fid, eval={"eval_id": eid, "data_source": ds})
    assert job.status_code == 200, job.text
    assert app.state.jobs.get(job.json()["id"])["eval_runs_limit"] == "1"


def test_key_file_holds_hashes_not_keys(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text('[tenants.a]\nkeys = ["my-secret-key"]\n')
    with pytest.raises(ValueError, match="sha256"):
        read_key_file(plain)
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[tenants.a]\nkeys = ["{hash_key("k")}"]\nmax_active_jobs = 3\n')
    ring = KeyRing.load("", toml)
    assert ring.tenant_for("k").name == "a" and ring.tenant_for("k").max_active_jobs == 3
    assert ring.tenant_for("K") is None and ring.tenant_for("") is None


def test_a_key_file_without_a_suffix_is_read_as_json_or_toml(tmp_path):
    """A Docker secret is mounted without a suffix: its first character tells JSON from
    TOML, and a broken one is refused naming the format it was read as."""
    digest = hash_key("k")
    as_json = tmp_path / "json" / "posttrain_api_keys"
    as_toml = tmp_path / "toml" / "posttrain_api_keys"
    as_json.parent.mkdir()
    as_toml.parent.mkdir()
    as_json.write_text(json.dumps({"tenants": {"a": {"keys": [digest], "admin": True}}}))
    as_toml.write_text(f'[tenants.b]\nkeys = ["{digest}"]\n')
    assert KeyRing.load("", as_json).tenant_for("k") == Tenant("a", admin=True)
    assert KeyRing.load("", as_toml).tenant_for("k").name == "b"
    as_json.write_text('{"tenants": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_key_file(as_json)


CLI = [sys.executable, "-m", "service.cli"]


QUOTA_AND_QUEUES = [
    "--max-active-jobs",
    "2",
    "--queues",
    "gpu.a, gpu.b",
    "--max-concurrent-eval-runs",
    "0",
]


def test_keys_add_cli_writes_a_hash_the_api_accepts(tmp_path):
    path = tmp_path / "keys.json"
    out = subprocess.run(
        [*CLI, "keys", "add", "team-x", "--file", str(path), *QUOTA_AND_QUEUES],
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip()
    assert key and key not in path.read_text()
    tenant = KeyRing.load("", path).tenant_for(key)
    assert tenant.name == "team-x" and tenant.max_active_jobs == 2
    assert tenant.queues == {"gpu.a", "gpu.b"}
    assert tenant.max_concurrent_eval_runs == 0 and tenant.eval_run_slots(2) == 0
    bad = subprocess.run(
        [*CLI, "keys", "add", "team-y", "--file", str(path), "--queues", "a:b"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--queues: queue 'a:b' is not a queue name" in bad.stderr


def test_keys_add_cli_sets_the_outbound_rules_in_json_and_toml(tmp_path):
    import tomllib

    path = tmp_path / "keys.json"
    rules = ["--tool-allowed-networks", "10.8.0.0/16, 192.168.7.0/24",
             "--tool-url-prefixes", "http://10.8.0.5:8080/tools/"]  # fmt: skip
    out = subprocess.run([*CLI, "keys", "add", "lab", "--file", str(path), *rules],
                         capture_output=True, text=True, check=True)  # fmt: skip
    tenant = KeyRing.load("", path).tenant_for(out.stdout.strip())
    assert tenant.tool_allowed_networks == ("10.8.0.0/16", "192.168.7.0/24")
    assert tenant.tool_url_prefixes == ("http://10.8.0.5:8080/tools/",)
    # without --file: the printed TOML entry is one the API loads the same way
    out = subprocess.run([*CLI, "keys", "add", "lab", "--admin", *rules],
                         capture_output=True, text=True, check=True)  # fmt: skip
    toml = out.stderr.split("\n", 1)[1].split("the key (shown once")[0]
    entry = tomllib.loads(toml)["tenants"]["lab"]
    assert entry["admin"] is True and entry["keys"] == [hash_key(out.stdout.strip())]
    toml_path = tmp_path / "keys.toml"
    toml_path.write_text(toml)
    tenant = KeyRing.load("", toml_path).tenant_for(out.stdout.strip())
    assert tenant.admin and tenant.tool_allowed_networks == ("10.8.0.0/16", "192.168.7.0/24")
    # a value the API would refuse at start is refused here, naming the flag; nothing written
    before = path.read_text()
    for flags, message in (
        (["--tool-allowed-networks", "10.0.0.0/33"], "--tool-allowed-networks: '10.0.0.0/33'"),
        (["--max-active-jobs", "0"], "--max-active-jobs: Input should be greater than"),
        (["--max-concurrent-eval-runs", "-1"], "--max-concurrent-eval-runs: Input should be"),
    ):
        bad = subprocess.run([*CLI, "keys", "add", "lab", "--file", str(path), *flags],
                             capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert bad.stdout == "" and path.read_text() == before


# ---- the bind refusal, as processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_")}
    return {
        **env,
        "POSTTRAIN_REDIS_URL": redis_server.url(14),
        "POSTTRAIN_DATA_DIR": str(tmp_path / "data"),
        **extra,
    }


def _serves(cmd, env, port) -> tuple[bool, str]:
    """Start ``cmd``; True once /healthz answers, False if it exits first (with its output)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return True, ""
            except httpx.HTTPError:
                time.sleep(0.2)
        return False, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


@pytest.mark.e2e
def test_server_refuses_a_public_address_without_keys(tmp_path):
    port = _free_port()
    serve = [*CLI, "serve", "--port", str(port)]
    ok, out = _serves([*serve, "--host", "0.0.0.0"], _env(tmp_path), port)
    assert not ok and "refusing to serve the API on 0.0.0.0" in out
    # the image's uvicorn command is refused the same way (POSTTRAIN_HOST says the address)
    uvicorn = [sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
               "--host", "0.0.0.0", "--port", str(port)]  # fmt: skip
    ok, out = _serves(uvicorn, _env(tmp_path, POSTTRAIN_HOST="0.0.0.0"), port)
    assert not ok and "refusing to serve the API" in out
    # loopback without keys, a public address with keys or with the explicit flag: served
    assert _serves([*serve, "--host", "127.0.0.1"], _env(tmp_path), port)[0]
    keyed = _env(tmp_path, POSTTRAIN_API_KEYS="k")
    assert _serves([*serve, "--host", "0.0.0.0"], keyed, port)[0]
    flag = [*serve, "--host", "0.0.0.0", "--insecure-no-auth"]
    assert _serves(flag, _env(tmp_path), port)[0]
