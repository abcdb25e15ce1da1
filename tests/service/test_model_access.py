"""Which models a job may name, through the real API (in-process, real Redis).

Allowed: a path or name under a model root, the caller's own fine-tuned model or
checkpoint, a Hub id only with hub access on. Everything else is one 400 with one
message, whatever the reason, so the API tells nobody which host files exist.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.modelaccess import MODEL_FIELDS, NOT_ALLOWED
from service.settings import ApiSettings
from trainers.contract.spec import JobSpec
from workers.store import JobStatus

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PROMPT = {"messages": [{"role": "user", "content": "Say hi."}]}


def settings_for(tmp_path, unit_redis_url, **extra) -> ApiSettings:
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-models",
        **extra,
    )


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    with TestClient(create_app(settings_for(tmp_path, unit_redis_url))) as c:
        yield c


def upload(client, rows=(CHAT,)) -> str:
    body = "\n".join(json.dumps(r) for r in rows).encode()
    resp = client.post(
        "/v1/files", files={"file": ("t.jsonl", io.BytesIO(body))}, data={"purpose": "fine-tune"}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def create(client, model, file_id, **extra):
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id, **extra}
    )


def model_dir(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def test_a_model_under_a_root_resolves_to_its_directory(client, tmp_path, tiny_model_entry):
    fid = upload(client)
    root = tmp_path / "models"
    model_dir(root / "org" / "name")
    for model, path in [
        ("tiny", tiny_model_entry),
        (str(tiny_model_entry), tiny_model_entry),
        ("org/name", root / "org" / "name"),
    ]:
        resp = create(client, model, fid)
        assert resp.status_code == 200, (model, resp.text)
        assert resp.json()["model"] == model  # the job shows the name the caller gave
        rec = client.app.state.jobs.get(resp.json()["id"])
        assert rec["model_path"] == str(path.resolve()) and rec["model_source"] == "local"


def test_every_refused_reference_gets_the_same_answer(client, tmp_path):
    fid = upload(client)
    root = tmp_path / "models"
    outside = model_dir(tmp_path / "elsewhere" / "model")  # loadable, but not under a root
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "empty").mkdir()
    model_dir(root / "no-type", {"architectures": ["LlamaForCausalLM"]})
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    job_dir = model_dir(tmp_path / "jobs" / "ftjob-other" / "output" / "checkpoint-5")
    refused = [
        "/etc",
        "/etc/passwd",
        "/nonexistent/model",
        str(outside),
        str(root / "escape"),  # a symlink in a root pointing out of it
        "escape",
        str(root / "empty"),
        "no-type",
        "broken",
        str(job_dir),  # another job's checkpoint, by path
        "elsewhere/model",  # relative to the data dir, not to a root
        "../elsewhere/model",
        "tiny/../../elsewhere/model",
        "~/model",
        "Qwen/Qwen2.5-0.5B",  # a hub id, with hub access off
        "ft:tiny:x:ftjob-missing",
        "ftckpt-missing",
    ]
    errors = []
    for model in refused:
        resp = create(client, model, fid)
        assert resp.status_code == 400, (model, resp.text)
        errors.append(resp.json()["error"])
    assert all(e == errors[0] for e in errors), errors
    assert errors[0] == {
        "message": NOT_ALLOWED,
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was written


def test_the_data_dir_as_a_root_still_hides_job_outputs_and_uploads(
    tmp_path, redis_client, unit_redis_url
):
    settings = settings_for(tmp_path, unit_redis_url, model_roots=str(tmp_path))
    job_dir = model_dir(tmp_path / "jobs" / "ftjob-other" / "output" / "checkpoint-5")
    with TestClient(create_app(settings)) as client:
        fid = upload(client)
        assert create(client, "models/tiny", fid).status_code == 200
        assert create(client, str(job_dir), fid).json()["error"]["message"] == NOT_ALLOWED
        assert create(client, "jobs/ftjob-other/output/checkpoint-5", fid).status_code == 400


def test_hub_ids_only_with_hub_access(tmp_path, redis_client, unit_redis_url):
    settings = settings_for(tmp_path, unit_redis_url, hub_access=True)
    with TestClient(create_app(settings)) as client:
        fid = upload(client)
        resp = create(client, "Qwen/Qwen2.5-0.5B", fid)
        assert resp.status_code == 200, resp.text
        rec = client.app.state.jobs.get(resp.json()["id"])
        assert rec["model_source"] == "hub" and "model_path" not in rec
        assert json.loads(rec["hub_models"]) == ["Qwen/Qwen2.5-0.5B"]
        for model in ("/etc", "../x/y", "a/b/c", "./tiny-model/.."):
            assert create(client, model, fid).status_code == 400, model


def _finished_job(client, tmp_path, fid) -> tuple[str, dict]:
    """A job of the caller's that succeeded with a final checkpoint on the data volume."""
    jobs = client.app.state.jobs
    job_id = create(client, "tiny", fid).json()["id"]
    ckpt = model_dir(tmp_path / "jobs" / job_id / "output" / "checkpoint-2")
    meta = {
        "id": "ftckpt-aaaaaaaaaaaaaaaaaaaaaaaa",
        "step": 2,
        "created_at": int(time.time()),
        "path": str(ckpt.relative_to(tmp_path)),
        "metrics": {"step": 2},
        "final": True,
        "fine_tuned_model_checkpoint": f"ft:tiny:{job_id}:ckpt-step-2",
    }
    jobs.add_checkpoint(job_id, meta)
    jobs.set_fields(
        job_id, status=str(JobStatus.succeeded), fine_tuned_model=f"ft:tiny:demo:{job_id}"
    )
    return job_id, meta


def test_own_fine_tuned_model_and_checkpoints_resolve(client, tmp_path):
    fid = upload(client)
    job_id, meta = _finished_job(client, tmp_path, fid)
    ckpt = str((tmp_path / meta["path"]).resolve())
    for model in (f"ft:tiny:demo:{job_id}", meta["id"], meta["fine_tuned_model_checkpoint"]):
        resp = create(client, model, fid)
        assert resp.status_code == 200, (model, resp.text)
        rec = client.app.state.jobs.get(resp.json()["id"])
        assert rec["model_path"] == ckpt and rec["model_source"] == "fine_tuned"
    # a name that merely looks right, a deleted model, a job that did not succeed: refused
    for model in (f"ft:other:demo:{job_id}", f"ft:tiny:{job_id}:ckpt-step-9"):
        assert create(client, model, fid).json()["error"]["message"] == NOT_ALLOWED
    client.app.state.jobs.set_fields(job_id, model_deleted_at=1)
    assert create(client, f"ft:tiny:demo:{job_id}", fid).status_code == 400
    client.app.state.jobs.set_fields(job_id, status=str(JobStatus.failed), model_deleted_at="")
    assert create(client, f"ft:tiny:demo:{job_id}", fid).status_code == 400


def _grpo(model: str) -> dict:
    grader = {
        "type": "score_model",
        "name": "rm",
        "model": model,
        "input": [{"role": "user", "content": "{{sample.output_text}}"}],
    }
    return {"type": "grpo", "grpo": {"graders": [grader]}}


def test_nested_models_follow_the_same_policy(client, tmp_path, reward_model_entry):
    fid = upload(client, [PROMPT])
    resp = create(client, "tiny", fid, method=_grpo("/etc"))
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "method.grpo.graders[0].model"
    assert err["message"] == f"method.grpo.graders[0].model: {NOT_ALLOWED}"
    bco = {"type": "bco", "bco": {"hyperparameters": {"udm": True, "udm_embedding_model": "/"}}}
    err = create(client, "tiny", fid, method=bco).json()["error"]
    assert err["param"].endswith("udm_embedding_model") and err["message"].endswith(NOT_ALLOWED)
    # an allowed one is stored as the directory the training process loads
    resp = create(client, "tiny", fid, method=_grpo("reward"))
    assert resp.status_code == 200, resp.text
    spec = json.loads(client.app.state.jobs.get(resp.json()["id"])["spec"])
    assert spec["method"]["grpo"]["graders"][0]["model"] == str(reward_model_entry.resolve())


def test_every_spec_field_naming_a_model_is_checked():
    """A new spec field that names a model must be added to MODEL_FIELDS (or this test)."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            names.update(k for k in node.get("properties", {}) if "model" in k)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(JobSpec.model_json_schema())
    assert names and names <= MODEL_FIELDS, names - MODEL_FIELDS
