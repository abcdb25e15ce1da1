"""Records written by other releases still GET, list and download (versioned, tolerant reads)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from trainers.contract.spec import SPEC_VERSION, StoredSpecError, read_stored_spec

RECORDS = json.loads((Path(__file__).parent / "fixtures" / "stored_job_records.json").read_text())


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url, store):
    settings = ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-old"
    )
    for name in ("v1", "dropped"):
        rec = RECORDS[name]
        redis_client.hset(store.k_job(rec["id"]), mapping=rec)
        redis_client.zadd(store.k_jobs(), {rec["id"]: float(rec["created_at"])})
    with TestClient(create_app(settings)) as c:
        yield c


def test_a_first_release_spec_upgrades_to_the_current_version():
    spec = read_stored_spec(RECORDS["v1"]["spec"])
    assert spec.spec_version == SPEC_VERSION and spec.method_type == "supervised"
    assert spec.method_hyperparameters().learning_rate == 0.005
    with pytest.raises(StoredSpecError, match="newer than this release"):
        read_stored_spec(RECORDS["dropped"]["spec"])


def test_old_and_unreadable_records_still_get_and_list(client):
    v1 = client.get(f"/v1/fine_tuning/jobs/{RECORDS['v1']['id']}").json()
    assert v1["status"] == "succeeded" and v1["trained_tokens"] == 22260
    assert v1["hyperparameters"]["n_epochs"] == 2 and v1["metadata"] == {"team": "a"}
    dropped = client.get(f"/v1/fine_tuning/jobs/{RECORDS['dropped']['id']}")
    assert dropped.status_code == 200
    body = dropped.json()
    assert body["method"]["type"] == "oreo_v9" and body["training_type"] == "lora"
    assert body["hyperparameters"] == {
        "n_epochs": 1,
        "batch_size": 4,
        "learning_rate_multiplier": 2.0,
    }
    assert body["error"]["message"] == "boom"
    listed = client.get("/v1/fine_tuning/jobs").json()
    assert [j["id"] for j in listed["data"]] == [RECORDS["dropped"]["id"], RECORDS["v1"]["id"]]


def test_a_checkpoint_of_an_old_record_downloads(client, store, tmp_path):
    job_id = RECORDS["v1"]["id"]
    ckpt = tmp_path / "jobs" / job_id / "output" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    store.add_checkpoint(
        job_id,
        {
            "id": "ftckpt-old",
            "step": 4,
            "created_at": 1764590100,
            "path": f"jobs/{job_id}/output/checkpoint-4",
            "metrics": {"step": 4, "train_loss": 1.5},
            "final": True,
            "fine_tuned_model_checkpoint": f"ft:tiny:{job_id}:ckpt-step-4",
        },
    )
    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["id"] for c in listed] == ["ftckpt-old"]
    resp = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/ftckpt-old/content")
    assert resp.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        assert any(n.endswith("config.json") for n in tar.getnames())
