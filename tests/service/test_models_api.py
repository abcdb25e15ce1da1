"""Fine-tuned models through the official ``openai`` SDK (OpenAI's models API) and
``DELETE /v1/fine_tuning/jobs/{id}``, in-process against a real Redis.

Records of finished jobs are written with the store the API itself uses (these tests
do not train; tests/e2e/test_storage.py does, end to end)."""

from __future__ import annotations

import io
import json

import openai
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from workers.store import JobStatus

S = JobStatus
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-m"
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def sdk(client):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


def _finished_job(client, job_id: str, status: JobStatus, model: str | None = None) -> str:
    """A job record as the worker leaves it, with a checkpoint directory on disk."""
    jobs, data_dir = client.app.state.jobs, client.app.state.settings.data_dir
    jobs.create(job_id, json.dumps({"model": "tiny"}), S.running, tenant="default")
    ckpt = data_dir / "jobs" / job_id / "output" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (data_dir / "jobs" / job_id / "train.log").write_text("log\n")
    meta = {
        "id": f"ftckpt-{job_id}",
        "step": 4,
        "created_at": 1,
        "path": str(ckpt.relative_to(data_dir)),
        "metrics": {"step": 4},
        "final": True,
        "fine_tuned_model_checkpoint": f"{model}:ckpt-step-4",
    }
    jobs.add_checkpoint(job_id, meta)
    jobs.add_metrics(job_id, 1, {"loss": 1.0})
    jobs.add_event(job_id, "done")
    fields = {"fine_tuned_model": model} if model else {}
    jobs.transition(job_id, status, **fields)
    return job_id


def test_fine_tuned_models_list_retrieve_and_delete_with_the_sdk(client, sdk, settings):
    name = "ft:tiny:demo:ftjob-m1"
    _finished_job(client, "ftjob-m1", S.succeeded, name)
    _finished_job(client, "ftjob-m2", S.failed)
    _finished_job(client, "ftjob-m3", S.succeeded, "ft:org/base-7b:x:ftjob-m3")  # a Hub base

    listed = sdk.models.list()
    assert [m.id for m in listed.data] == ["ft:org/base-7b:x:ftjob-m3", name]  # newest first
    model = sdk.models.retrieve(name)
    assert (model.id, model.object, model.owned_by) == (name, "model", "org-posttrain")
    assert model.created > 0
    assert sdk.models.retrieve("ft:org/base-7b:x:ftjob-m3").id == "ft:org/base-7b:x:ftjob-m3"

    gone = sdk.models.delete(name)
    assert (gone.id, gone.object, gone.deleted) == (name, "model", True)
    assert not (settings.data_dir / "jobs" / "ftjob-m1" / "output").exists()
    assert [m.id for m in sdk.models.list().data] == ["ft:org/base-7b:x:ftjob-m3"]
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        sdk.models.delete(name)
    # the job and its history stay; the weights are gone
    assert sdk.fine_tuning.jobs.retrieve("ftjob-m1").status == "succeeded"
    (ckpt,) = sdk.fine_tuning.jobs.checkpoints.list("ftjob-m1").data
    resp = client.get(f"/v1/fine_tuning/jobs/ftjob-m1/checkpoints/{ckpt.id}/content")
    assert resp.status_code == 410


@pytest.mark.parametrize("name", ["ft:tiny:demo:ftjob-nope", "gpt-4o", "ft:tiny:demo:ftjob-m2"])
def test_unknown_or_unfinished_models_are_404_naming_the_model(client, name):
    _finished_job(client, "ftjob-m2", S.failed)
    resp = client.get(f"/v1/models/{name}")
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["param"] == "model" and name in err["message"]


def test_deleting_a_finished_job_removes_record_streams_checkpoints_and_files(client, settings):
    body = {"model": "tiny", "training_file": _upload(client), "suffix": "x"}
    key = {"Idempotency-Key": "delete-me"}
    job = client.post("/v1/fine_tuning/jobs", json=body, headers=key).json()
    job_id = job["id"]
    jobs = client.app.state.jobs
    job_dir = settings.data_dir / "jobs" / job_id
    (job_dir / "output" / "checkpoint-2").mkdir(parents=True)
    jobs.add_checkpoint(job_id, {"id": "ftckpt-x", "step": 2, "final": False, "path": "p"})
    jobs.add_metrics(job_id, 1, {"loss": 1.0})

    resp = client.delete(f"/v1/fine_tuning/jobs/{job_id}")  # still queued
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "invalid_state" and "queued" in err["message"]
    assert err["param"] == "fine_tuning_job_id" and job_dir.is_dir()

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    resp = client.delete(f"/v1/fine_tuning/jobs/{job_id}")
    assert resp.status_code == 200
    assert resp.json() == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").status_code == 404
    assert jobs.r.keys(f"test:job:{job_id}*") == [] and not job_dir.exists()
    assert job_id not in [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]]
    # the Idempotency-Key is free again: the same request makes a new job
    again = client.post("/v1/fine_tuning/jobs", json=body, headers=key)
    assert again.headers["Idempotent-Replayed"] == "false" and again.json()["id"] != job_id
    assert client.delete(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404


def _upload(client) -> str:
    body = (json.dumps(CHAT) + "\n").encode()
    resp = client.post(
        "/v1/files", files={"file": ("t.jsonl", io.BytesIO(body))}, data={"purpose": "fine-tune"}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _refused_deletion(resp, names: str) -> None:
    assert resp.status_code == 500, resp.text
    err = resp.json()["error"]
    assert err["code"] == "deletion_failed" and err["type"] == "server_error"
    assert names in err["message"] and "retry" in err["message"]


def test_a_job_whose_files_cannot_be_removed_is_not_reported_deleted(client, settings, frozen):
    job_id = _finished_job(client, "ftjob-d1", S.failed)
    log = settings.data_dir / "jobs" / job_id / "train.log"
    release = frozen(log)
    _refused_deletion(client.delete(f"/v1/fine_tuning/jobs/{job_id}"), f"jobs/{job_id}/train.log")
    # nothing was claimed: the record and its history stay, and the DELETE can be retried
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "failed"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    release()
    assert client.delete(f"/v1/fine_tuning/jobs/{job_id}").json()["deleted"] is True
    assert not log.parent.exists()
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404


def test_a_model_whose_weights_cannot_be_removed_stays_listed(client, sdk, settings, frozen):
    name = "ft:tiny:demo:ftjob-d2"
    _finished_job(client, "ftjob-d2", S.succeeded, name)
    weights = settings.data_dir / "jobs" / "ftjob-d2" / "output" / "checkpoint-4" / "config.json"
    release = frozen(weights)
    _refused_deletion(client.delete(f"/v1/models/{name}"), "checkpoint-4/config.json")
    assert [m.id for m in sdk.models.list().data] == [name]
    release()
    assert sdk.models.delete(name).deleted is True
    assert not weights.exists() and sdk.models.list().data == []


def test_a_file_whose_bytes_cannot_be_removed_keeps_its_record(client, settings, frozen):
    file_id = _upload(client)
    release = frozen(client.app.state.files.path(file_id))
    _refused_deletion(client.delete(f"/v1/files/{file_id}"), f"files/{file_id}")
    assert client.get(f"/v1/files/{file_id}").status_code == 200
    release()
    assert client.delete(f"/v1/files/{file_id}").json()["deleted"] is True
    assert client.get(f"/v1/files/{file_id}").status_code == 404
