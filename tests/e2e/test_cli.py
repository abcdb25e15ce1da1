"""The CLI through a whole job on the real API and worker: ``jobs create --follow``
prints the job's events and per-step metrics until it succeeds, ``logs`` replays them,
and ``download`` fetches the final model by job id, checkpoint id and model name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"


def cli(stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTTRAIN_", "OPENAI_"))}
    env.update(POSTTRAIN_BASE_URL=stack.base_url, XDG_CONFIG_HOME=str(stack.logs / "cli-config"))
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_create_follow_logs_and_download(stack, tmp_path):
    data = tmp_path / "demo.jsonl"
    data.write_bytes(DEMO.read_bytes())
    proc = cli(
        stack,
        "jobs",
        "create",
        "--model",
        str(stack.model_dir),
        "--training-file",
        str(data),
        *("-p", "n_epochs=2", "-p", "batch_size=8", "-p", "learning_rate=5e-3"),
        "--suffix",
        "cli",
        "--follow",
        "--poll",
        "0.5",
        "--no-progress",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    job_id = lines[0]
    assert job_id.startswith("ftjob-") and proc.stderr.strip().endswith(f"{job_id}: succeeded")
    steps = [
        (int(m[1]), float(m[2]))
        for m in map(re.compile(r"^step (\d+)(?:/\d+)?  .*\bloss=(\S+)").match, lines)
        if m
    ]
    assert [s for s, _ in steps] == sorted({s for s, _ in steps}), "each step once, in order"
    assert len(steps) >= 5 and steps[-1][1] < steps[0][1], steps  # the loss fell
    messages = [line for line in lines[1:] if not line.startswith("step ")]
    assert messages[-1].endswith("The job has successfully completed"), messages

    # a replay reads everything at once, and still puts each row among the events in the
    # order they were written: the run's plan before step 1, a checkpoint after its step
    full = cli(stack, "logs", job_id).stdout.splitlines()

    def row_of(step) -> int:
        return next(i for i, line in enumerate(full) if re.match(rf"step {step}[ /]", line))

    first_step = row_of(1)
    plan = next(i for i, line in enumerate(full) if re.search(r"  Training for \d+ steps", line))
    assert plan < first_step, full
    for i, line in enumerate(full):
        if m := re.search(r"  Checkpoint created at step (\d+)", line):
            assert row_of(m[1]) < i, full

    replay = cli(stack, "logs", job_id, "--no-metrics")
    assert replay.returncode == 0, replay.stderr
    # without the metrics rows, the metrics events are printed in their place
    replayed = replay.stdout.splitlines()
    step_events = [line for line in replayed if re.search(r"  Step \d+/\d+: ", line)]
    assert len(step_events) >= 5 and [x for x in replayed if x not in step_events] == messages

    out = tmp_path / "models"
    proc = cli(stack, "download", job_id, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    unpacked = Path(proc.stdout.strip())
    assert unpacked.parent == out and unpacked.name.startswith(f"{job_id}-step-")
    assert (unpacked / "config.json").is_file() or (unpacked / "adapter_config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in unpacked.iterdir())

    job = json.loads(cli(stack, "jobs", "get", job_id).stdout)
    ckpts = httpx.get(f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    newest = ckpts[0]
    for ref in (job["fine_tuned_model"], newest["id"], newest["fine_tuned_model_checkpoint"]):
        proc = cli(stack, "download", ref, "-o", str(tmp_path / "tars"), "--tar", "--no-progress")
        assert proc.returncode == 0, (ref, proc.stderr)
        assert Path(proc.stdout.strip()).name == f"{job_id}-step-{newest['step_number']}.tar"
