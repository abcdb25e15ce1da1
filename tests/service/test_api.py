"""The HTTP API in-process (FastAPI TestClient) against a real Redis and Celery broker."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
BROKER = "test:celery:"  # Celery's keys, under the settings' key_prefix


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-api"
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def upload(client, rows, name="train.jsonl", purpose="fine-tune"):
    body = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()
    return client.post(
        "/v1/files", files={"file": (name, io.BytesIO(body))}, data={"purpose": purpose}
    )


def error_of(resp):
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_upload_returns_a_file_object_and_content_round_trips(client):
    resp = upload(client, [CHAT, CHAT])
    assert resp.status_code == 200
    f = resp.json()
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["status"] == "processed"
    assert f["format"] == "chat" and f["rows"] == 2 and f["id"].startswith("file-")
    assert client.get(f"/v1/files/{f['id']}").json()["bytes"] == f["bytes"]
    content = client.get(f"/v1/files/{f['id']}/content").content
    assert [json.loads(x) for x in content.splitlines()] == [CHAT, CHAT]


def test_bad_row_is_a_400_naming_line_and_field_and_stores_nothing(client, settings):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    resp = upload(client, [CHAT, CHAT, bad])
    assert resp.status_code == 400
    err = error_of(resp)
    assert "line 3" in err["message"] and "messages[1].role" in err["message"]
    assert err["param"] == "file" and err["code"] == "invalid_file_format"
    assert client.get("/v1/files").json()["data"] == []
    assert list((settings.data_dir / "files").iterdir()) == []


def test_unknown_purpose_is_rejected(client):
    err = error_of(upload(client, [CHAT], purpose="vision"))
    assert err["param"] == "purpose"


def test_files_list_paginates_and_delete_removes(client):
    ids = [upload(client, [CHAT]).json()["id"] for _ in range(3)]
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/files", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert client.delete(f"/v1/files/{ids[0]}").json() == {
        "id": ids[0],
        "object": "file",
        "deleted": True,
    }
    assert client.get(f"/v1/files/{ids[0]}").status_code == 404


def create_job(client, file_id, headers=None, **extra):
    body = {"model": "tiny", "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers or {})


def test_create_job_returns_every_sdk_field_and_enqueues(client, redis_client):
    fid = upload(client, [CHAT]).json()["id"]
    resp = create_job(client, fid, method={"type": "sft"}, suffix="demo", seed=3)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    sdk_fields = {
        "id",
        "created_at",
        "error",
        "fine_tuned_model",
        "finished_at",
        "hyperparameters",
        "model",
        "object",
        "organization_id",
        "result_files",
        "seed",
        "status",
        "trained_tokens",
        "training_file",
        "validation_file",
        "estimated_finish",
        "integrations",
        "metadata",
        "method",
    }
    assert sdk_fields <= job.keys()
    assert job["status"] == "queued" and job["method"]["type"] == "supervised" and job["seed"] == 3
    # the task message really is on the broker's queue
    assert redis_client.llen(BROKER + "posttrain.test-api") == 1
    listed = client.get("/v1/fine_tuning/jobs").json()
    assert [j["id"] for j in listed["data"]] == [job["id"]] and listed["has_more"] is False


def test_idempotency_key_replays_the_same_job(client, redis_client):
    fid = upload(client, [CHAT]).json()["id"]
    first = create_job(client, fid, headers={"Idempotency-Key": "abc"})
    again = create_job(client, fid, headers={"Idempotency-Key": "abc"})
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert redis_client.llen(BROKER + "posttrain.test-api") == 1
    other = create_job(client, fid, headers={"Idempotency-Key": "abc"}, seed=9)
    assert other.status_code == 409 and error_of(other)["param"] == "Idempotency-Key"


@pytest.mark.parametrize(
    "patch,status,param,fragment",
    [
        ({"method": {"type": "egpo"}}, 400, "method.egpo", "Field required"),
        ({"method": {"type": "nonsense"}}, 400, "method.type", "unknown method"),
        (
            {"training_type": "lora", "lora": {"target_modules": ["q_proj", "lm_head"]}},
            400,
            "lora",
            "LoRA on the LM head",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
            400,
            "method.supervised.hyperparameters.n_epochs",
            "n_epochs",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"batch_size": "x"}},
                }
            },
            400,
            "method.supervised.hyperparameters.batch_size",
            "",
        ),
        ({"training_file": "file-missing"}, 404, "training_file", "No such file"),
        ({"training_type": "qlora"}, 400, "training_type", ""),
        ({"integrations": [{"type": "wandb"}]}, 400, "integrations[0].wandb", "Field required"),
        (  # the deprecated top-level field beside method was silently dropped
            {"hyperparameters": {"n_epochs": 1000}, "method": {"type": "supervised"}},
            400,
            "hyperparameters",
            "and method are both set",
        ),
    ],
)
def test_bad_job_requests_name_the_problem_and_create_nothing(
    client, patch, status, param, fragment
):
    fid = upload(client, [CHAT]).json()["id"]
    resp = create_job(client, fid, **patch)
    assert resp.status_code == status, resp.text
    err = error_of(resp)
    assert err["param"] == param and fragment in err["message"]
    assert err["code"]  # every refusal names a code (integrations' was null)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_file_format_must_fit_the_method(client):
    fid = upload(client, [{"prompt": "q", "chosen": "a", "rejected": "b"}]).json()["id"]
    err = error_of(create_job(client, fid))
    assert err["param"] == "training_file" and "'preference'" in err["message"]


def test_cancel_queued_job_then_cancel_again_is_400(client):
    fid = upload(client, [CHAT]).json()["id"]
    job = create_job(client, fid).json()
    done = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 400 and "cancelled" in error_of(again)["message"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"].startswith("Job cancelled before it started")
    assert all(e["object"] == "fine_tuning.job.event" for e in events)


def test_unknown_job_is_404_in_openai_shape(client):
    resp = client.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


def test_checkpoint_content_streams_a_tar_without_trainer_state(client, settings):
    fid = upload(client, [CHAT]).json()["id"]
    job = create_job(client, fid).json()
    ckdir = settings.data_dir / "jobs" / job["id"] / "output" / "checkpoint-4"
    ckdir.mkdir(parents=True)
    (ckdir / "model.safetensors").write_bytes(b"w" * 1000)
    (ckdir / "config.json").write_text("{}")
    (ckdir / "optimizer.pt").write_bytes(b"o" * 10)
    (ckdir / "rng_state.pth").write_bytes(b"r")
    store = client.app.state.jobs
    store.add_checkpoint(
        job["id"],
        {
            "id": "ftckpt-1",
            "step": 4,
            "created_at": 1,
            "path": str(ckdir.relative_to(settings.data_dir)),
            "metrics": {"step": 4},
            "fine_tuned_model_checkpoint": "ft:x",
        },
    )
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
    assert listed["data"][0]["step_number"] == 4
    resp = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt-1/content")
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        names = sorted(m.name.split("/", 1)[1] for m in tar.getmembers())
        weights = tar.extractfile(f"{job['id']}-step-4/model.safetensors").read()
    assert names == ["config.json", "model.safetensors"] and weights == b"w" * 1000


def test_api_keys_are_enforced_when_configured(settings):
    settings.api_keys = "s3cret"
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/files").status_code == 401
        assert c.get("/v1/files", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_readyz_reports_redis(client, settings):
    assert client.get("/readyz").json()["redis"] == "ok"
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        assert c.get("/readyz").status_code == 503


def test_upload_over_the_size_limit_is_413_and_leaves_nothing(settings):
    settings.max_upload_bytes = 100
    with TestClient(create_app(settings)) as c:
        resp = upload(c, [CHAT, CHAT, CHAT])
        assert resp.status_code == 413 and error_of(resp)["code"] == "file_too_large"
        assert c.get("/v1/files").json()["data"] == []
    assert list((settings.data_dir / "files").iterdir()) == []


def test_pause_and_resume_refuse_jobs_in_the_wrong_state(client, redis_client):
    fid = upload(client, [CHAT]).json()["id"]
    job = create_job(client, fid).json()
    resp = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")  # queued: nothing to resume
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_state"
    store = client.app.state.jobs
    store.transition(job["id"], "running")
    store.transition(job["id"], "succeeded")
    for verb in ("pause", "resume"):
        resp = client.post(f"/v1/fine_tuning/jobs/{job['id']}/{verb}")
        assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_state"
    # a paused job resumes into the queue and is enqueued again
    job = create_job(client, fid).json()
    store.transition(job["id"], "running")
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "pausing"
    store.transition(job["id"], "paused")
    before = redis_client.llen(BROKER + "posttrain.test-api")
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
    assert redis_client.llen(BROKER + "posttrain.test-api") == before + 1


def test_a_queued_job_pauses_without_starting_and_resumes_into_the_queue(client, redis_client):
    """Before, pausing a queued job let a worker start it, train a step and park it."""
    fid = upload(client, [CHAT]).json()["id"]
    job_id = create_job(client, fid).json()["id"]
    resp = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert resp.status_code == 200 and resp.json()["status"] == "paused"
    store = client.app.state.jobs
    claim = store.claim(job_id, "a-worker", lease_seconds=60, max_attempts=3)
    assert not claim.ok and claim.previous == "paused"  # its queued message is dropped
    assert store.get(job_id)["status"] == "paused" and store.get(job_id).get("attempt", "0") == "0"
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert events[0]["message"] == "Job paused before it started; resume queues it again"
    before = redis_client.llen(BROKER + "posttrain.test-api")
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    assert redis_client.llen(BROKER + "posttrain.test-api") == before + 1
    assert store.claim(job_id, "a-worker", lease_seconds=60, max_attempts=3).ok


def test_resume_answers_the_state_it_wrote_even_if_a_worker_claims_at_once(client, monkeypatch):
    """A worker may claim a resumed job between the enqueue and the answer; the answer is
    still the move this request made (``queued``), not whatever a re-read would see."""
    fid = upload(client, [CHAT]).json()["id"]
    job = create_job(client, fid).json()
    store = client.app.state.jobs
    for status in ("running", "pausing", "paused"):
        store.transition(job["id"], status)
    celery = client.app.state.celery
    send = celery.send_task

    def send_and_claim(name, args=None, **kwargs):
        result = send(name, args=args, **kwargs)
        store.claim(args[0], "an-eager-worker", lease_seconds=60, max_attempts=3)
        return result

    monkeypatch.setattr(celery, "send_task", send_and_claim)
    resp = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text
    assert store.status(job["id"]) == "running"  # the worker did claim it meanwhile
