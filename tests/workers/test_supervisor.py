"""The supervisor with a real training child process: unusable inputs end ``failed`` with why."""

from __future__ import annotations

import json

import pytest

from trainers.contract.spec import JobSpec
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
    # the loader's reason, with the server path cut to its last part (issue 19)
    assert err["code"] == "model_load_failed" and "'…/no-model'" in err["message"]
    assert str(tmp_path) not in err["message"]
    events = [f["message"] for _, f in store.events("ftjob-s", None, 10)[0]]
    assert events[0].startswith("Job failed: tokenizer for model")


def test_an_invalid_report_line_fails_the_job_and_stops_the_trainer(store, file_store, tmp_path):
    """A trainer that writes something that is not a report message (a stray print to the
    report fd, a version mismatch) ends the job failed with the reason; the supervisor
    survives and kills the process rather than waiting for it."""
    import os
    import subprocess
    import sys

    from workers.ingest import ReportIngest

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
    reporter = ReportIngest(store, "ftjob-s", "m")
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


def _child(script: str):
    """A stand-in training process (a real child on a real pipe) running ``script``."""
    import os
    import subprocess
    import sys

    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\nfd = int(sys.argv[1])\n" + script,
            str(write_fd),
        ],
        pass_fds=[write_fd],
        start_new_session=True,
    )
    os.close(write_fd)
    return proc, read_fd


def _claimed(store, file_store, tmp_path, **settings):
    sup, attempt, _ = _setup(store, file_store, tmp_path, "m", [json.dumps(CHAT)])
    sup.s = sup.s.model_copy(update=settings)
    return sup, attempt


def test_a_trainer_that_hangs_after_its_result_is_stopped_and_the_job_succeeds(
    store, file_store, tmp_path
):
    from workers.ingest import ReportIngest

    sup, _ = _claimed(store, file_store, tmp_path, exit_deadline_seconds=1.0)
    proc, read_fd = _child(
        'os.write(fd, b\'{"type": "result", "step": 3, "trained_tokens": 30, '
        '"checkpoint": "jobs/x/output/checkpoint-3"}\\n\')\n'
        "time.sleep(120)\n"  # a teardown that never returns (NCCL, vLLM)
    )
    reporter = ReportIngest(store, "ftjob-s", "m")
    verdict = sup.watch("ftjob-s", proc, read_fd, reporter)
    assert proc.poll() is not None  # killed, not waited on for two minutes
    assert verdict.kind == "succeeded"
    events = [f["message"] for _, f in store.events("ftjob-s", None, 10)[0]]
    assert any("exit deadline" in e for e in events)


def test_a_trainer_that_stops_reporting_is_stopped_by_the_watchdog(store, file_store, tmp_path):
    from workers.ingest import ReportIngest

    sup, attempt = _claimed(store, file_store, tmp_path, stall_seconds=1.5)
    proc, read_fd = _child(
        'os.write(fd, b\'{"type": "event", "message": "loaded"}\\n\')\ntime.sleep(120)\n'
    )
    verdict = sup.watch("ftjob-s", proc, read_fd, ReportIngest(store, "ftjob-s", "m"))
    assert proc.poll() is not None
    assert verdict.kind == "crashed" and "stall watchdog" in verdict.detail
    spec = JobSpec.model_validate({"model": "m", "training_file": "f"})
    out = sup.finish("ftjob-s", spec, verdict, ReportIngest(store, "ftjob-s", "m"), attempt)
    assert out == "requeued" and store.get("ftjob-s")["status"] == "queued"
    events = [f["message"] for _, f in store.events("ftjob-s", None, 10)[0]]
    assert any("no progress" in e and "stall watchdog" in e for e in events)


def test_a_worker_whose_job_was_taken_over_stops_its_trainer_and_writes_nothing(
    store, file_store, tmp_path
):
    """Its lease expired while it stalled; another worker claimed the job (a newer fence).
    Its next renewal is refused: it stops the trainer and applies none of its lines."""
    import time

    from workers.ingest import ReportIngest

    store.create("ftjob-t", "{}", JobStatus.queued)
    old = store.claim("ftjob-t", "w1", lease_seconds=0.05, max_attempts=3)
    time.sleep(0.1)
    new = store.claim("ftjob-t", "w2", lease_seconds=30, max_attempts=3)
    assert new.ok and new.fence > old.fence
    settings = WorkerSettings(data_dir=tmp_path, key_prefix="test:", lease_seconds=30)
    stale = Supervisor(settings, store, file_store, "w1", fence=old.fence)
    proc, read_fd = _child(
        "for i in range(1, 1000):\n"
        '    os.write(fd, (\'{"type": "log", "step": %d, "total_steps": 999, '
        '"metrics": {"loss": 1.0}}\\n\' % i).encode())\n'
        "    time.sleep(0.01)\n"
    )
    verdict = stale.watch("ftjob-t", proc, read_fd, ReportIngest(store, "ftjob-t", "m"))
    assert verdict.kind == "lease_lost" and proc.poll() is not None
    assert store.last_metric_step("ftjob-t") == 0  # none of the stale lines were applied
    spec = JobSpec.model_validate({"model": "m", "training_file": "f"})
    assert stale.finish("ftjob-t", spec, verdict, ReportIngest(store, "ftjob-t", "m"), 1) == (
        "lease_lost"
    )
    rec = store.get("ftjob-t")
    assert rec["status"] == "running" and rec["lease_owner"] == "w2"


def test_fence_file_refuses_a_superseded_run(tmp_path):
    from trainers.contract import fencing

    path = tmp_path / "job" / "fence"
    fencing.write_fence(path, 5)
    fencing.check(path, 5)
    fencing.write_fence(path, 7)  # a newer claim
    with pytest.raises(fencing.StaleFence, match="superseded by 7"):
        fencing.check(path, 5)
    with pytest.raises(fencing.StaleFence):
        fencing.write_fence(path, 6)  # an older claim can never move it back
    assert fencing.read_fence(path) == 7


def test_an_endpoint_graders_header_reaches_the_trainer_from_the_secrets_key(
    store, file_store, tmp_path, tiny_model
):
    """The stored spec holds ``[redacted]``; the run's trainer, started by ``spawn``, calls
    the loopback grader with the value the job's secrets key holds (passed in its
    environment, never in the plan file)."""
    from tests.loopback import Handler, serving

    seen: list[str] = []

    class Scorer(Handler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            seen.append(self.headers.get("authorization"))
            self.reply(200, b'{"score": 0.5}')

    with serving(Scorer) as base:
        staged = file_store.staging_path()
        staged.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
        rec = file_store.commit(
            staged, filename="p.jsonl", purpose="fine-tune", formats=["prompt_only"], rows=1
        )
        grader = {
            "type": "endpoint",
            "name": "remote",
            "url": f"{base}/score",
            "headers": {"Authorization": "[redacted]"},
        }
        hp = {"num_generations": 2, "batch_size": 2, "max_completion_length": 4, "max_steps": 1}
        spec = JobSpec.model_validate(
            {
                "model": str(tiny_model),
                "training_file": rec["id"],
                "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
            }
        )
        secrets = {"grader_headers": {"0": {"Authorization": "Bearer from-the-key"}}}
        store.create("ftjob-e", spec.model_dump_json(), JobStatus.queued, secrets=secrets)
        settings = WorkerSettings(
            data_dir=tmp_path,
            train_threads=1,
            key_prefix="test:",
            tool_allowed_networks="127.0.0.0/8",
        )
        attempt = store.claim("ftjob-e", "w1", 30, 3).attempt
        sup = Supervisor(settings, store, file_store, "w1")
        assert sup._pin_files("ftjob-e", spec) is None
        plan = sup.write_plan("ftjob-e", spec, attempt)
        assert "from-the-key" not in sup.dir("ftjob-e").plan(attempt).read_text()
        run = sup.spawn("ftjob-e", plan)
        try:
            assert run.proc.wait(timeout=240) == 0
        finally:
            run.channel.close()
        assert seen and set(seen) == {"Bearer from-the-key"}


def test_the_run_plan_carries_the_tenants_outbound_rules(store, file_store, tmp_path, tiny_model):
    """The API records a tenant's own rules on its job; the plan the training process
    reads holds them beside the server's, and the policy it builds applies both."""
    from trainers.contract.outbound import AddressRefused

    sup, attempt, _ = _setup(store, file_store, tmp_path, str(tiny_model), [json.dumps(CHAT)])
    spec = JobSpec.model_validate_json(store.get("ftjob-s")["spec"])
    assert sup.write_plan("ftjob-s", spec, attempt).tools.tenant is None
    rules = {"allowed_networks": ["127.0.0.0/8"], "url_prefixes": ["http://127.0.0.1:9/lab/"]}
    store.set_fields("ftjob-s", outbound=rules)
    sup.write_plan("ftjob-s", spec, attempt)
    from trainers.contract.plan import RunPlan

    plan = RunPlan.model_validate_json(sup.dir("ftjob-s").plan(attempt).read_text())
    assert plan.tools.tenant.model_dump() == rules
    plan.tools.check("http://127.0.0.1:9/lab/tool")  # the tenant's network, its prefix
    with pytest.raises(AddressRefused, match="tool_url_prefixes"):
        plan.tools.check("http://127.0.0.1:9/other")
    with pytest.raises(AddressRefused, match="non-public"):
        sup.s.tool_policy().check("http://127.0.0.1:9/lab/tool")  # the server alone refuses


def test_a_judge_model_this_worker_does_not_serve_fails_before_spawning(
    store, file_store, tmp_path, tiny_model
):
    """The API kept a grader's model as a remote judge (its POSTTRAIN_JUDGE_ENDPOINTS
    serves it) and recorded it; a worker whose own endpoints do not serve it fails the job
    naming the model and the setting, instead of loading the name as a local model."""
    sup, attempt, _ = _setup(store, file_store, tmp_path, str(tiny_model), [json.dumps(CHAT)])
    store.set_fields("ftjob-s", judge_models=json.dumps(["judge-chat"]))
    assert sup.run("ftjob-s", attempt) == "failed"
    err = _error(store)
    assert err["code"] == "judge_endpoint_unavailable"
    assert "'judge-chat'" in err["message"] and "POSTTRAIN_JUDGE_ENDPOINTS" in err["message"]
    # a worker that serves it passes the check (and goes on to start the run)
    endpoints = {"own": {"base_url": "http://127.0.0.1:9/v1", "models": ["judge-chat"]}}
    served = WorkerSettings(
        data_dir=tmp_path,
        train_threads=1,
        key_prefix="test:",
        judge_endpoints=json.dumps(endpoints),
    )
    assert Supervisor(served, store, file_store, "w1")._judge_problem("ftjob-s") is None
