"""Run a plan exactly as a worker launches it (no API, no Celery): one process, or several
ranks under ``accelerate launch``; returns the report lines rank 0 sent."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

from trainers.contract.plan import RunPlan
from workers import launch
from workers.placement import available_strategies, place

REPO = Path(__file__).resolve().parents[1]


def read_lines(proc, channel, until, timeout: float = 120) -> list[dict]:
    """Report lines until ``until(lines)`` holds or the run exits (bounded)."""
    buf, deadline = b"", time.monotonic() + timeout
    with os.fdopen(channel.read_fd, "rb", buffering=0, closefd=False) as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.2)
            chunk = pipe.read(65536) if ready else b""
            buf += chunk
            lines = [json.loads(x) for x in buf.decode().splitlines()]
            if until(lines) or (ready and not chunk) or (proc.poll() is not None and not ready):
                return lines
    raise AssertionError("no report in time")


def run_plan(plan: RunPlan, root: Path, timeout: float = 240) -> list[dict]:
    """Start ``plan`` as the worker would (placed on a CPU-only worker), wait for its end
    (it must exit 0) and return its report lines."""
    name = f"{plan.job_id}-{plan.processes}"
    plan_path = root / f"plan-{name}.json"
    plan_path.write_text(plan.model_dump_json())
    placement = place(plan.spec.resources, [], available_strategies())
    config = launch.write_accelerate_config(placement, root / f"acc-{name}.json")
    channel = launch.ReportChannel(placement.launched)
    log = root / f"train-{name}.log"
    proc = subprocess.Popen(
        launch.training_command(placement, plan_path, channel.args, config),
        pass_fds=channel.pass_fds,
        cwd=REPO,
        env=launch.training_env(dict(os.environ), placement, threads=1),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    channel.started()
    try:
        lines = read_lines(proc, channel, until=lambda lines: False, timeout=timeout)
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        os.close(channel.read_fd)
        channel.close()
    return lines
