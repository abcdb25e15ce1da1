"""Multi-process jobs under accelerate (gloo on CPU), and workers pinned to queues and devices.

Two real workers stand in for two nodes: worker A consumes queue A and owns the
fake devices ``3,5`` (this host has no GPU: the point is that every training
process sees exactly its worker's devices, read from ``/proc/<pid>/environ``);
worker B consumes queue B and is CPU-only. Jobs ask for ``processes: 2``, so
each runs as two ranks under ``accelerate launch`` with DDP over gloo. Both
workers run with ``POSTTRAIN_MAX_ATTEMPTS=2``.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from service import stack as stack_launch
from tests import redis_server
from tests.e2e.conftest import start_stack
from tests.e2e.test_sft_job import DEMO, wait_for
from tests.launched import run_plan
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from workers.fleet import live_workers
from workers.launch import descendants
from workers.processes import alive as _alive

pytestmark = pytest.mark.e2e
MP_DB = 11
QUEUE_A, QUEUE_B = "posttrain.e2e.mp.a", "posttrain.e2e.mp.b"
NOBODY = "posttrain.e2e.mp.nobody"  # offered by the API (POSTTRAIN_QUEUES), never served
TWO = {"gpus": 0, "processes": 2}


@pytest.fixture(scope="module")
def mstack(tmp_path_factory):
    st = start_stack(
        tmp_path_factory.mktemp("multiprocess"),
        redis_server.url(MP_DB),
        POSTTRAIN_QUEUE=QUEUE_A,
        POSTTRAIN_QUEUES=NOBODY,
        POSTTRAIN_WORKER_GPUS="3,5",
        POSTTRAIN_MAX_ATTEMPTS="2",
        POSTTRAIN_CHECKPOINT_EVERY_STEPS="5",
    )
    env_b = {**st.env, "POSTTRAIN_QUEUE": QUEUE_B, "POSTTRAIN_WORKER_GPUS": ""}
    st.worker_b = stack_launch.start_worker(env_b, st.logs / "worker-b.log", name="mp-b")
    try:
        yield st
    finally:
        stack_launch.stop(st.worker_b)
        st.stop()


@pytest.fixture(scope="module")
def api(mstack):
    c = httpx.Client(base_url=f"{mstack.base_url}/v1", timeout=30)
    with DEMO.open("rb") as fh:
        c.file_id = c.post(
            "/files", files={"file": ("demo.jsonl", fh)}, data={"purpose": "fine-tune"}
        ).json()["id"]
    wait_for(lambda: _live(mstack, QUEUE_A) and _live(mstack, QUEUE_B), 30, "both workers")
    return c


def _live(st, queue: str) -> bool:
    return bool(live_workers(st.redis, "posttrain:", queue))


def _create(c: httpx.Client, n_epochs: int, resources: dict) -> httpx.Response:
    hp = {"n_epochs": n_epochs, "batch_size": 8, "learning_rate": 5e-3}
    return c.post(
        "/fine_tuning/jobs",
        json={
            "model": str(c.model_dir),
            "training_file": c.file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "resources": resources,
        },
    )


def _submit(c: httpx.Client, n_epochs: int, resources: dict = TWO) -> str:
    r = _create(c, n_epochs, resources)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _events(c: httpx.Client, job_id: str) -> list[dict]:
    data = c.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return data[::-1]  # oldest first


def _messages(c, job_id) -> list[str]:
    return [e["message"] for e in _events(c, job_id)]


def _job(c, job_id) -> dict:
    return c.get(f"/fine_tuning/jobs/{job_id}").json()


def _wait_status(c, job_id, statuses, timeout=300) -> dict:
    return wait_for(
        lambda: (j := _job(c, job_id))["status"] in statuses and j, timeout, f"status {statuses}"
    )


def _checkpoints(c, job_id) -> list[dict]:
    return c.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]


def _ranks(st, job_id: str) -> dict[int, int]:
    """rank -> pid of the job's live training ranks (children of its launcher)."""
    pid = st.redis.hget(f"posttrain:job:{job_id}", "pid")
    out = {}
    for child in descendants(int(pid)) if pid else []:
        env = _environ(child)
        if env is not None and "RANK" in env and "trainers.run" in _cmdline(child):
            out[int(env["RANK"])] = child
    return out


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return None
    return dict(
        item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item
    )


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _both_ranks(st, job_id: str) -> dict[int, int]:
    return wait_for(lambda: len(r := _ranks(st, job_id)) == 2 and r, 120, "both ranks", poll=0.2)


def _after_checkpoint(c, job_id, beyond: int = 0) -> int:
    ckpts = wait_for(
        lambda: [k for k in _checkpoints(c, job_id) if k["step_number"] > beyond],
        240,
        "a checkpoint",
        poll=0.2,
    )
    return ckpts[0]["step_number"]


def _gone(pids) -> bool:
    return not any(_alive(p) for p in pids)


@pytest.fixture(autouse=True)
def _model(api, mstack):
    api.model_dir = mstack.model_dir


def test_two_ranks_learn_report_once_pause_and_resume(api, mstack):
    job_id = _submit(api, n_epochs=30)  # 210 steps of 8 rows, 4 per rank
    ranks = _both_ranks(mstack, job_id)
    launcher = int(mstack.redis.hget(f"posttrain:job:{job_id}", "pid"))
    assert launcher in descendants(mstack.worker.pid)  # queue A's job runs on worker A
    assert launcher not in descendants(mstack.worker_b.pid)
    for pid in ranks.values():  # exactly worker A's (fake) devices, in every rank
        assert _environ(pid)["CUDA_VISIBLE_DEVICES"] == "3,5"
    _after_checkpoint(api, job_id)
    assert api.post(f"/fine_tuning/jobs/{job_id}/pause").status_code == 200
    paused = _wait_status(api, job_id, ("paused", "failed", "succeeded"))
    assert paused["status"] == "paused", paused
    assert _gone([launcher, *ranks.values()])
    pause_step = _checkpoints(api, job_id)[0]["step_number"]
    assert 0 < pause_step < 210
    # both ranks stopped at the same step and the checkpoint was written once
    ckpt = mstack.data_dir / "jobs" / job_id / "output" / f"checkpoint-{pause_step}"
    rng_states = sorted(p.name for p in ckpt.glob("rng_state_*"))
    assert rng_states == ["rng_state_0.pth", "rng_state_1.pth"]
    assert len(list(ckpt.glob("*.safetensors"))) == 1

    assert api.post(f"/fine_tuning/jobs/{job_id}/resume").status_code == 200
    done = _wait_status(api, job_id, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    assert done["resources"]["gpus"] == 0 and done["resources"]["processes"] == 2

    events = _events(api, job_id)
    msgs = [e["message"] for e in events]
    launched = "Launched 2 process(es) on CPU, ddp under accelerate; CUDA_VISIBLE_DEVICES=3,5"
    assert msgs.count(launched) == 2  # the first run and the resumed one
    # one reporter: rank 1's lines never reach the job
    assert sum(m.startswith("Loaded 56 training rows") for m in msgs) == 2
    assert f"Resumed from checkpoint at step {pause_step}" in msgs
    assert sum(m.startswith("Training for 210 steps") for m in msgs) == 2
    steps = Counter(e["data"]["step"] for e in events if e["type"] == "metrics")
    assert steps and set(steps.values()) == {1}  # no step's metrics event twice
    metrics = api.get(f"/fine_tuning/jobs/{job_id}/metrics", params={"limit": 1000}).json()
    assert [row["step"] for row in metrics["data"]] == list(range(1, 211))
    losses = [row["loss"] for row in metrics["data"]]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10  # it learned


def test_cancel_stops_every_rank(api, mstack):
    job_id = _submit(api, n_epochs=100)
    ranks = _both_ranks(mstack, job_id)
    launcher = int(mstack.redis.hget(f"posttrain:job:{job_id}", "pid"))
    wait_for(lambda: _job(api, job_id)["status"] == "running", 60, "running")
    assert api.post(f"/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    wait_for(lambda: _gone([launcher, *ranks.values()]), 30, "every rank to exit", poll=0.2)
    assert _job(api, job_id)["status"] == "cancelled"


def test_a_killed_rank_retries_the_whole_job_from_its_checkpoint(api, mstack):
    job_id = _submit(api, n_epochs=30)
    ranks = _both_ranks(mstack, job_id)
    step = _after_checkpoint(api, job_id)
    os.kill(ranks[1], signal.SIGKILL)  # a non-main rank: the main one must not hang
    wait_for(lambda: _gone(ranks.values()), 60, "the other rank to be stopped", poll=0.2)
    done = _wait_status(api, job_id, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    msgs = _messages(api, job_id)
    assert any("ended unexpectedly" in m and "retrying (attempt 2 of 2)" in m for m in msgs)
    resumed = [int(m.split()[-1]) for m in msgs if m.startswith("Resumed from checkpoint")]
    assert len(resumed) == 1 and resumed[0] >= step


def test_a_rank_killed_past_the_attempt_cap_fails_the_job(api, mstack):
    job_id = _submit(api, n_epochs=30)
    for attempt in (1, 2):
        wait_for(lambda n=attempt: _job(api, job_id)["attempt"] == n, 120, f"attempt {attempt}")
        ranks = _both_ranks(mstack, job_id)
        os.kill(ranks[0], signal.SIGKILL)  # the main rank this time
        wait_for(lambda r=ranks: _gone(r.values()), 60, "the run to stop", poll=0.2)
    done = _wait_status(api, job_id, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "training_crashed"
    assert "ended unexpectedly" in done["error"]["message"]
    assert done["error"]["message"].endswith("gave up after 2 attempts")


def test_each_queue_runs_only_on_its_own_workers(api, mstack):
    # queue B has a live CPU-only worker: a GPU job cannot run there, and says why
    refused = _create(api, 1, {"gpus": 2, "queue": QUEUE_B})
    assert refused.status_code == 400
    err = refused.json()["error"]
    assert err["param"] == "resources.gpus" and "CPU-only" in err["message"]
    # no worker on this queue yet: accepted, waiting, and the events say for what
    waiting = _submit(api, 1, {"gpus": 1, "queue": NOBODY})
    assert any(
        m.startswith(
            f"No worker is live on queue '{NOBODY}' yet; the job waits for a worker "
            "(1 GPU(s), strategy ddp) to join the queue, and fails if none serves it within"
        )
        for m in _messages(api, waiting)
    )
    assert api.post(f"/fine_tuning/jobs/{waiting}/cancel").status_code == 200

    job_id = _submit(api, n_epochs=30, resources={**TWO, "queue": QUEUE_B})
    ranks = _both_ranks(mstack, job_id)
    launcher = int(mstack.redis.hget(f"posttrain:job:{job_id}", "pid"))
    assert launcher in descendants(mstack.worker_b.pid)
    assert launcher not in descendants(mstack.worker.pid)
    for pid in ranks.values():  # worker B is CPU-only: no device is visible
        assert _environ(pid)["CUDA_VISIBLE_DEVICES"] == ""
    assert api.post(f"/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    wait_for(lambda: _gone([launcher, *ranks.values()]), 30, "the run to stop", poll=0.2)
    # a default job on the CPU-only worker is shown as CPU, never as 1 GPU
    default = _submit(api, n_epochs=1, resources={"queue": QUEUE_B})
    done = _wait_status(api, default, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    assert done["resources"]["gpus"] == 0 and done["resources"]["processes"] == 1


def _run_plan(root, model_dir, processes: int, output) -> list[dict]:
    """One run of the trainer exactly as a worker launches it (no API, no Celery)."""
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate": 5e-3}
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir),
            "training_file": "file-x",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "resources": {"gpus": 0, "processes": processes},
        }
    )
    plan = RunPlan(
        job_id="resume",
        spec=spec,
        training_path=Path(str(DEMO)),
        output_dir=output,
        data_dir=root,
        checkpoint_every_steps=5,
        threads=1,
        processes=processes,
    )
    return run_plan(plan, root)


def test_a_two_rank_checkpoint_resumes_on_one_process(tmp_path, mstack):
    """The run's batch is global, so a checkpoint of 2 ranks resumes on 1 process and
    ends where the uninterrupted 2-rank run ended (same data order, same updates)."""
    two = tmp_path / "two"
    _run_plan(tmp_path, mstack.model_dir, 2, two)  # 14 steps; checkpoints 5, 10, 14
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoint-10", resumed / "checkpoint-10")
    lines = _run_plan(tmp_path, mstack.model_dir, 1, resumed)
    assert "Resumed from checkpoint at step 10" in [m.get("message") for m in lines]
    assert [m["step"] for m in lines if m["type"] == "log"] == [11, 12, 13, 14]
    a = load_file(two / "checkpoint-14" / "model.safetensors")
    b = load_file(resumed / "checkpoint-14" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4, diff  # summation order only (see bench/ddp_cpu.py's tolerance)
    start = load_file(two / "checkpoint-10" / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * diff
