"""The OpenAPI document tells the truth (issue 11, item 7).

The document declares the job spec as the job-creation body and the upload's form
fields, the error statuses the API really answers (never FastAPI's 422), and
schemathesis, run against the live API (real uvicorn, real Redis), finds no server
error and no response that breaks the document.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from tests.service.liveapi import KEY, start_live_api
from trainers.contract.methods import METHODS
from workers.store import JobStore

# 50 examples per operation (about 6,700 cases, half a minute on two cores); another
# seed or more: POSTTRAIN_SCHEMA_EXAMPLES=200 POSTTRAIN_SCHEMA_SEED=<n> pytest -k schemathesis
MAX_EXAMPLES = int(os.environ.get("POSTTRAIN_SCHEMA_EXAMPLES", "50"))
SEED = int(os.environ.get("POSTTRAIN_SCHEMA_SEED", "20251"))


@pytest.fixture
def document(tmp_path, redis_client, unit_redis_url) -> dict:
    s = ApiSettings(redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", api_keys="k")
    with TestClient(create_app(s)) as c:
        resp = c.get("/openapi.json", headers={"Authorization": "Bearer k"})
    assert resp.status_code == 200
    return resp.json()


def _operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_no_422_anywhere(document):
    """Validation errors are 400s; FastAPI's default 422 was declared on 17 operations."""
    assert '"422"' not in str(document).replace("'", '"')
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_the_job_body_is_the_job_spec(document):
    """Before: ``{"type": "object", "additionalProperties": true}``."""
    body = document["paths"]["/v1/fine_tuning/jobs"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    spec = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "training_file", "method", "seed"} <= spec["properties"].keys()
    assert "spec_version" not in spec["properties"] and spec["additionalProperties"] is False
    assert set(spec["required"]) == {"model", "training_file"}
    mapping = spec["properties"]["method"]["discriminator"]["mapping"]
    assert set(mapping) == set(METHODS)
    sft = document["components"]["schemas"]["spec.SupervisedHyperparameters"]["properties"]
    epochs = next(b for b in sft["n_epochs"]["anyOf"] if b.get("type") == "integer")
    assert (epochs["minimum"], epochs["maximum"]) == (1, 100)


def test_error_statuses_are_declared_with_the_error_object(document):
    ops = {(p, m): op for p, m, op in _operations(document)}
    create = ops[("/v1/fine_tuning/jobs", "post")]["responses"]
    assert {"200", "400", "401", "404", "409", "503"} <= create.keys()
    assert create["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    up = ops[("/v1/files", "post")]
    assert "413" in up["responses"]
    form = up["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "purpose"]
    assert "expires_after[seconds]" in form["properties"]
    assert ops[("/v1/files/{file_id}", "get")]["responses"].keys() >= {"404", "401"}
    content = ops[("/v1/files/{file_id}/content", "get")]["responses"]["200"]["content"]
    assert list(content) == ["application/jsonl"]
    for (path, _), op in ops.items():
        if path.startswith("/v1/"):
            assert op["security"] == [{"bearerAuth": []}]


def _seed_records(api, tmp_path: Path) -> Path:
    """Real files, jobs and a checkpoint, offered to schemathesis for half of the id
    parameters it fills (the other half stay generated), so the routes behind a real id
    are exercised too. The jobs stay queued: no worker runs here."""
    auth = {"Authorization": f"Bearer {KEY}"}
    row = json.dumps({"prompt": "2+2=", "completion": "4"}).encode()
    files, jobs = [], []
    with httpx.Client(base_url=api.base_url, headers=auth, timeout=30) as c:
        for _ in range(3):
            resp = c.post(
                "/v1/files", files={"file": ("t.jsonl", row)}, data={"purpose": "fine-tune"}
            )
            assert resp.status_code == 200, resp.text
            files.append(resp.json()["id"])
        for i in range(2):
            resp = c.post(
                "/v1/fine_tuning/jobs",
                json={"model": "tiny", "training_file": files[0], "metadata": {"n": str(i)}},
            )
            assert resp.status_code == 200, resp.text
            jobs.append(resp.json()["id"])
    store = JobStore(api.redis, "posttrain:")
    store.add_checkpoint(
        jobs[0],
        {
            "id": "ftckpt-000000000000000000000001",
            "step": 1,
            "created_at": 1_700_000_000,
            "path": "checkpoints/gone",
            "metrics": {"step": 1, "train_loss": 0.5},
            "final": False,
            "fine_tuned_model_checkpoint": f"ft:tiny:{jobs[0]}:ckpt-step-1",
        },
    )
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"[dictionaries.files]\nvalues = {json.dumps(files)}\n"
        f"[dictionaries.jobs]\nvalues = {json.dumps(jobs)}\n"
        '[dictionaries.checkpoints]\nvalues = ["ftckpt-000000000000000000000001"]\n'
        "[parameters]\n"
        '"path.file_id" = { dictionary = "files", probability = 0.5 }\n'
        '"path.job_id" = { dictionary = "jobs", probability = 0.5 }\n'
        '"path.checkpoint_id" = { dictionary = "checkpoints", probability = 0.5 }\n'
    )
    return config


def _summary(output: str) -> str:
    start = output.rfind("SUMMARY")
    return output[start:] if start >= 0 else output[-3000:]


@pytest.mark.e2e
def test_schemathesis_against_the_live_api(tmp_path):
    """Every phase (examples, coverage, fuzzing, stateful), every check but
    positive_data_acceptance: a schema-valid job body still names files and models
    that do not exist, and the API rightly refuses it."""
    api = start_live_api(tmp_path)
    try:
        config = _seed_records(api, tmp_path)
        cmd = [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{api.base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
        ]
        timeout = max(540, 30 * MAX_EXAMPLES)
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    finally:
        api.stop()
    output = run.stdout + run.stderr
    summary = _summary(output)
    print(summary)
    assert run.returncode == 0, output[-8000:] + "\n--- API log ---\n" + api.log.read_text()[-4000:]
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested and int(tested.group(1)) >= 15, summary
    assert "Server error" not in summary and "failures" not in summary.lower().split("warnings")[0]
