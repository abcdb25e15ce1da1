"""The supervisor with a real training child process: unusable inputs end ``failed`` with why."""

from __future__ import annotations

import json

import pytest

from trainers.spec import JobSpec
from workers.settings import WorkerSettings
from workers.store import JobStatus
from workers.supervisor import Supervisor

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from trainers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _setup(store, file_store, tmp_path, model: str, rows: list[str]):
    staged = file_store.staging_path()
    staged.write_text("\n".join(rows) + "\n")
    rec = file_store.commit(staged, filename="t.jsonl", purpose="fine-tune", fmt="chat", rows=1)
    spec = JobSpec.model_validate({"model": model, "training_file": rec["id"]})
    store.create("ftjob-s", spec.model_dump_json(), JobStatus.queued)
    settings = WorkerSettings(data_dir=tmp_path, train_threads=1, key_prefix="test:")
    claim = store.claim("ftjob-s", "w1", 30, 3)
    return Supervisor(settings, store, file_store, "w1"), claim.attempt, rec["id"]


def _error(store) -> dict:
    rec = store.get("ftjob-s")
    assert rec["status"] == JobStatus.failed
    return json.loads(rec["error"])


def test_deleted_training_file_fails_before_spawning(store, file_store, tmp_path, tiny_model):
    sup, attempt, fid = _setup(store, file_store, tmp_path, str(tiny_model), [json.dumps(CHAT)])
    file_store.delete(fid)
    assert sup.run("ftjob-s", attempt) == "failed"
    err = _error(store)
    assert err["param"] == "training_file" and f"{fid} was deleted" in err["message"]


def test_file_corrupted_on_disk_fails_naming_the_line(store, file_store, tmp_path, tiny_model):
    sup, attempt, fid = _setup(store, file_store, tmp_path, str(tiny_model), [json.dumps(CHAT)])
    with open(file_store.path(fid), "a") as fh:
        fh.write('{"messages": "not a list"}\n')
    assert sup.run("ftjob-s", attempt) == "failed"
    err = _error(store)
    assert err["code"] == "invalid_training_file"
    assert "line 2" in err["message"] and "messages" in err["message"]


def test_unloadable_model_fails_with_the_loader_reason(store, file_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sup, attempt, _ = _setup(
        store, file_store, tmp_path, str(tmp_path / "no-model"), [json.dumps(CHAT)]
    )
    assert sup.run("ftjob-s", attempt) == "failed"
    err = _error(store)
    assert err["code"] == "model_load_failed" and str(tmp_path / "no-model") in err["message"]
    events = [f["message"] for _, f in store.events("ftjob-s", None, 10)[0]]
    assert events[0].startswith("Job failed: tokenizer for model")
