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
    rec = file_store.commit(
        staged, filename="t.jsonl", purpose="fine-tune", formats=["chat"], rows=1
    )
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


def test_an_invalid_report_line_fails_the_job_and_stops_the_trainer(store, file_store, tmp_path):
    """A trainer that writes something that is not a report message (a stray print to the
    report fd, a version mismatch) ends the job failed with the reason; the supervisor
    survives and kills the process rather than waiting for it."""
    import os
    import subprocess
    import sys

    from workers.reporter import RecordReporter

    sup, attempt, _ = _setup(store, file_store, tmp_path, "m", [json.dumps(CHAT)])
    read_fd, write_fd = os.pipe()
    script = (
        "import os, sys, time\n"
        "fd = int(sys.argv[1])\n"
        'os.write(fd, b\'{"type": "event", "message": "started"}\\n\')\n'
        'os.write(fd, b\'{"type": "log", "step": "three"}\\n\')\n'
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(write_fd)], pass_fds=[write_fd], start_new_session=True
    )
    os.close(write_fd)
    reporter = RecordReporter(store, "ftjob-s", "m")
    verdict = sup.watch("ftjob-s", proc, read_fd, reporter)
    assert verdict.kind == "failed" and proc.poll() is not None
    assert (
        sup.finish(
            "ftjob-s",
            JobSpec.model_validate({"model": "m", "training_file": "f"}),
            verdict,
            reporter,
            attempt,
        )
        == "failed"
    )
    err = _error(store)
    assert err["code"] == "invalid_report" and "step" in err["message"]
    messages = [f["message"] for _, f in store.events("ftjob-s", None, 10)[0]]
    assert "started" in messages  # valid lines before the bad one were applied
