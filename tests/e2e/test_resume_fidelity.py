"""Resume fidelity: an interrupted job trains exactly like an uninterrupted one.

For each method (SFT, DPO, BCO) three jobs with the same seed, data and
hyperparameters run through the real API and worker:

  straight  uninterrupted;
  paused    paused (POST .../pause) a few steps in, then resumed (POST .../resume);
  killed    its training process SIGKILLed a step or two after its first checkpoint,
            so the worker retries it (attempt 2) from that checkpoint.

All three must end at the same step, with the same ``trained_tokens``, the same
per-step metrics from ``/metrics`` (loss, and every other value a step reports:
grad norm, learning rate, entropy, token accuracy, DPO rewards...) and the same
final weights, downloaded through the checkpoint content route. A step
the killed job ran twice (after its checkpoint, before the kill) has one row in
the metrics stream, the retry's value replacing the first run's (workers/jobstreams.py),
and it must equal the uninterrupted run's.

Tolerance (``TOL``): 1e-6 absolute, on losses and on every parameter. The stack
trains on CPU, one torch thread (``POSTTRAIN_TRAIN_THREADS=1``), in fp32, no
dropout; a resume restores the weights (safetensors, bit-exact), the AdamW
moments, the scheduler, the RNG states and the data order, so the replay runs
the same floating-point operations in the same order and is expected to be
bit-identical (observed: 0.0). 1e-6 only leaves room for a reduction-order
change (say a BLAS picking another kernel); any real divergence - a wrong batch,
a lost optimizer moment, a restarted schedule - moves the weights by about the
learning rate (5e-3, Adam steps are ~lr in size) after a single step, three
orders of magnitude above it.

Timing: a step of the tiny model takes a few tens of milliseconds, faster than
the supervisor's once-a-second pause poll, so the paused job's trainer is
SIGSTOPped while the pause request reaches it (the test waits until SIGUSR1 is
pending on the stopped process, then SIGCONTs it): the pause then lands on a
step boundary a few steps in, by the platform's own path (signal handler ->
save at the next step boundary -> exit -> ``paused``).
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import tarfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx
import pytest

from tests import redis_server
from tests.e2e.conftest import start_stack
from tests.e2e.test_sft_job import wait_for
from trainers.contract.checkpoints import MARKER

pytestmark = pytest.mark.e2e
FIDELITY_DB = 12
EVERY = 4  # POSTTRAIN_CHECKPOINT_EVERY_STEPS
SEED = 7
TOL = 1e-6  # see the module docstring
PAUSE_AFTER_STEP = 5  # it pauses at the step boundary after this one or the next
# Wall-clock metrics a row may carry: they differ between any two runs.
TIMING_METRICS = frozenset({"train_runtime", "train_tokens_per_second"})
ASSETS = resources.files("trainers") / "assets"
ENDS = ("succeeded", "failed", "cancelled")

# 2 epochs at batch 6: 56 SFT rows = 10 steps an epoch (its last batch has 2 rows), 20
# steps; 60 DPO pairs, 20 steps (16 when the file had 48). Checkpoints every 4 steps; the
# pause lands off that grid and in the first epoch, the kill 2 steps past checkpoint 4.
METHODS = {
    "sft": (
        "demo_sft.jsonl",
        {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 6, "learning_rate": 5e-3}
            },
        },
    ),
    "dpo": (
        "demo_dpo.jsonl",
        {
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 6,
                    "beta": 0.1,
                    "learning_rate": 5e-3,
                }
            },
        },
    ),
    # 120 unpaired rows at batch 12: 10 steps an epoch, 20 steps; UDM on, so the
    # running delta and the prompt classifier must both come back from the checkpoint.
    "bco": (
        "demo_bco.jsonl",
        {
            "type": "bco",
            "bco": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 12,
                    "learning_rate": 5e-3,
                    "udm": True,
                    "udm_prompt_sample_size": 32,
                }
            },
        },
    ),
    # 120 scored trajectories at batch 12: 20 steps; the value model, its optimizer and
    # scheduler must all come back from the checkpoint with the policy.
    "oreo": (
        "demo_oreo.jsonl",
        {
            "type": "oreo",
            "oreo": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 12,
                    "learning_rate": 3e-3,
                    "beta": 0.1,
                }
            },
        },
    ),
}


@pytest.fixture(scope="module")
def fstack(tmp_path_factory):
    st = start_stack(
        tmp_path_factory.mktemp("fidelity"),
        redis_server.url(FIDELITY_DB),
        POSTTRAIN_CHECKPOINT_EVERY_STEPS=str(EVERY),
        POSTTRAIN_TRAIN_THREADS="1",
    )
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def api(fstack):
    with httpx.Client(base_url=f"{fstack.base_url}/v1", timeout=60) as c:
        yield c


@dataclass
class Run:
    scenario: str
    job: dict
    rows: list[dict]  # the /metrics stream, oldest first (a replayed step appears twice)
    params: dict = field(repr=False)  # name -> tensor, the final checkpoint's weights
    final_step: int
    interrupted_at: int | None = None  # the step it paused at / the last it reported
    resume_expected: int | None = None  # the newest complete checkpoint when it stopped
    resumed_from: int | None = None  # from the "Resumed from checkpoint at step N" event

    def by_step(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for row in self.rows:
            out.setdefault(row["step"], []).append(row)
        return out

    def last_per_step(self) -> dict[int, dict]:
        return {step: rows[-1] for step, rows in self.by_step().items()}

    def replayed_steps(self) -> list[int]:
        return sorted(s for s, rows in self.by_step().items() if len(rows) > 1)


# ---- driving one job


def _key(job_id: str) -> str:
    return f"posttrain:job:{job_id}"


def _upload(api: httpx.Client, name: str) -> str:
    with (ASSETS / name).open("rb") as fh:
        r = api.post("/files", files={"file": (name, fh)}, data={"purpose": "fine-tune"})
    r.raise_for_status()
    return r.json()["id"]


def _submit(st, api: httpx.Client, file_id: str, method: dict, scenario: str) -> str:
    r = api.post(
        "/fine_tuning/jobs",
        json={
            "model": str(st.model_dir),
            "training_file": file_id,
            "seed": SEED,
            "suffix": scenario,
            "method": method,
        },
    )
    r.raise_for_status()
    return r.json()["id"]


def _pid(st, job_id: str) -> int:
    return int(wait_for(lambda: st.redis.hget(_key(job_id), "pid"), 120, "a training process"))


def _signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` is pending (queued, undelivered) on process ``pid``."""
    bit = 1 << (sig - 1)
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
                return True
    return False


def _events(api: httpx.Client, job_id: str) -> list[str]:
    data = api.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e["message"] for e in reversed(data)]  # oldest first


def _resumed_from(api: httpx.Client, job_id: str) -> int | None:
    prefix = "Resumed from checkpoint at step "
    steps = [int(m[len(prefix) :]) for m in _events(api, job_id) if m.startswith(prefix)]
    return steps[-1] if steps else None


def _pause_and_resume(st, api: httpx.Client, job_id: str) -> int:
    """Pause a few steps in, wait for ``paused``, resume; return the step it paused at."""
    pid = _pid(st, job_id)
    wait_for(
        lambda: int(st.redis.hget(_key(job_id), "step") or 0) >= PAUSE_AFTER_STEP,
        120,
        f"step {PAUSE_AFTER_STEP} to be reported (record field 'step', set from each metrics "
        "report)",
        poll=0.005,
    )
    os.kill(pid, signal.SIGSTOP)  # hold it here until the pause request has reached it
    try:
        step, total = st.redis.hmget(_key(job_id), "step", "total_steps")
        assert int(step) < int(total) - 1, f"the job reached step {step}/{total} before pausing"
        r = api.post(f"/fine_tuning/jobs/{job_id}/pause")
        assert r.status_code == 200 and r.json()["status"] == "pausing", r.text
        wait_for(lambda: _signal_pending(pid, signal.SIGUSR1), 30, "the supervisor's SIGUSR1", 0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(
        lambda: api.get(f"/fine_tuning/jobs/{job_id}").json()["status"] == "paused",
        60,
        "the job to be paused",
    )
    assert not os.path.exists(f"/proc/{pid}")
    newest = api.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"][0]
    paused_at = newest["step_number"]
    assert f"Job paused at step {paused_at} with a resumable checkpoint" in _events(api, job_id)
    r = api.post(f"/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    return paused_at


def _newest_complete_checkpoint(st, job_id: str) -> int:
    out = st.data_dir / "jobs" / job_id / "output"
    done = [int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/" + MARKER)]
    return max(done, default=0)


def _kill_after_first_checkpoint(st, job_id: str) -> tuple[int, int]:
    """SIGKILL the training process a step or more past its first checkpoint, so the retry
    replays steps; return (the last step it reported, its newest complete checkpoint).

    The trainer is stopped before it is killed, and the supervisor given time to apply
    every report line, so both numbers are exact: the retry must resume from that
    checkpoint and replay every reported step after it."""
    pid = _pid(st, job_id)
    ckpts = f"{_key(job_id)}:checkpoints"
    wait_for(lambda: st.redis.llen(ckpts) > 0, 120, "a first checkpoint", poll=0.005)
    newest = json.loads(st.redis.lindex(ckpts, 0))["step"]
    for _ in range(5):
        wait_for(
            lambda after=newest: int(st.redis.hget(_key(job_id), "step") or 0) > after + 1,
            60,
            f"step {newest + 2} to be reported",
            poll=0.005,
        )
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.5)  # the supervisor applies the lines already in the pipe
        step = int(st.redis.hget(_key(job_id), "step"))
        newest = _newest_complete_checkpoint(st, job_id)
        if step > newest:
            os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
            return step, newest
        os.kill(pid, signal.SIGCONT)  # it had just saved: let it run past that checkpoint
    raise AssertionError("could not stop the trainer between two checkpoints")


def _final_params(st, api: httpx.Client, job_id: str, dest: Path) -> tuple[int, dict]:
    from safetensors.torch import load_file

    ckpts = api.get(f"/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()
    final = ckpts["data"][0]  # newest first
    url = f"/fine_tuning/jobs/{job_id}/checkpoints/{final['id']}/content"
    r = api.get(url)
    r.raise_for_status()
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(dest, filter="data")
    weights = dest / f"{job_id}-step-{final['step_number']}" / "model.safetensors"
    return final["step_number"], load_file(str(weights))


def run_scenario(st, api, file_id: str, method: dict, scenario: str, tmp: Path) -> Run:
    job_id = _submit(st, api, file_id, method, scenario)
    interrupted = expected = None
    if scenario == "paused":
        interrupted = expected = _pause_and_resume(st, api, job_id)
    elif scenario == "killed":
        interrupted, expected = _kill_after_first_checkpoint(st, job_id)
    job = wait_for(
        lambda: (j := api.get(f"/fine_tuning/jobs/{job_id}").json())["status"] in ENDS and j,
        300,
        f"{scenario} job {job_id} to end",
    )
    assert job["status"] == "succeeded", (scenario, job.get("error"))
    if scenario == "killed":
        assert job["attempt"] == 2, job
        assert any("ended unexpectedly (signal 9); retrying" in m for m in _events(api, job_id))
    rows = api.get(f"/fine_tuning/jobs/{job_id}/metrics", params={"limit": 10000}).json()["data"]
    step, params = _final_params(st, api, job_id, tmp / scenario)
    resumed = _resumed_from(api, job_id)
    return Run(scenario, job, rows, params, step, interrupted, expected, resumed)


# ---- comparing


def _metric_keys(a: dict, b: dict) -> set[str]:
    return (a.keys() | b.keys()) - {"step"} - TIMING_METRICS


def _delta(x, y) -> float:
    if x is None or y is None:  # a metric one row has and the other lacks
        return math.inf
    d = abs(x - y)
    return math.inf if math.isnan(d) else d


def _step_deltas(a: dict[int, dict], b: dict[int, dict]) -> dict[str, tuple[float, int]]:
    """Per metric: the largest |a - b| over the steps both have, and the first step > TOL."""
    out: dict[str, tuple[float, int]] = {}
    for step in sorted(a.keys() & b.keys()):
        for key in _metric_keys(a[step], b[step]):
            d = _delta(a[step].get(key), b[step].get(key))
            worst, first = out.get(key, (0.0, -1))
            out[key] = (max(worst, d), first if first >= 0 or d <= TOL else step)
    return out


def _replay_deltas(run: Run) -> dict[str, tuple[float, int]]:
    """Per metric: the largest difference between a replayed step's first-run and retry rows."""
    out: dict[str, tuple[float, int]] = {}
    for step, rows in sorted(run.by_step().items()):
        for row in rows[1:]:
            for key in _metric_keys(rows[0], row):
                d = _delta(rows[0].get(key), row.get(key))
                worst, first = out.get(key, (0.0, -1))
                out[key] = (max(worst, d), first if first >= 0 or d <= TOL else step)
    return out


def _param_delta(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in sorted(a.keys() & b.keys()):
        d = (a[name].double() - b[name].double()).abs().max().item()
        if d > worst or not where:
            worst, where = d, name
    return worst, where


def _worst(deltas: dict[str, tuple[float, int]], skip: str | None = None) -> float:
    return max((d for k, (d, _) in deltas.items() if k != skip), default=0.0)


def compare(method: str, runs: list[Run]) -> list[str]:
    """Print the table; return every difference from the uninterrupted run beyond TOL."""
    base = runs[0]
    base_steps = base.last_per_step()
    problems: list[str] = []
    print(
        f"\nresume fidelity, {method} (TOL {TOL:g}; rows = /metrics rows, replayed = steps "
        "with two rows; dother = every other metric):"
    )
    print(
        f"  {'scenario':9} {'steps':>5} {'trained_tokens':>14} {'rows':>4} {'interrupt':>9} "
        f"{'resumed':>7} {'replayed':>8} {'max|dloss|':>10} {'max|dother|':>11} "
        f"{'max|dreplay|':>12} {'max|dparam|':>11}"
    )
    for run in runs:
        steps = run.last_per_step()
        deltas = _step_deltas(base_steps, steps)
        replays = _replay_deltas(run)
        dparam, pname = _param_delta(base.params, run.params)
        replayed = run.replayed_steps()
        print(
            f"  {run.scenario:9} {run.final_step:>5} {run.job['trained_tokens']!s:>14} "
            f"{len(run.rows):>4} {run.interrupted_at!s:>9} {run.resumed_from!s:>7} "
            f"{(f'{replayed[0]}-{replayed[-1]}' if replayed else '-'):>8} "
            f"{deltas.get('loss', (math.inf, 0))[0]:>10.3g} {_worst(deltas, 'loss'):>11.3g} "
            f"{_worst(replays):>12.3g} {dparam:>11.3g}"
        )
        if run is base:
            continue
        name = f"{method}/{run.scenario}"
        if run.final_step != base.final_step:
            problems.append(f"{name}: final step {run.final_step} != {base.final_step}")
        if run.job["trained_tokens"] != base.job["trained_tokens"]:
            problems.append(
                f"{name}: trained_tokens {run.job['trained_tokens']} != "
                f"{base.job['trained_tokens']}"
            )
        if sorted(steps) != sorted(base_steps):
            missing = sorted(base_steps.keys() - steps.keys())
            extra = sorted(steps.keys() - base_steps.keys())
            problems.append(f"{name}: metric steps differ (missing {missing}, extra {extra})")
        for key, (d, first) in sorted(deltas.items()):
            if d > TOL:
                problems.append(
                    f"{name}: {key} differs from the uninterrupted run from step {first} "
                    f"({base_steps[first].get(key)!r} vs {steps[first].get(key)!r}); "
                    f"max |d| {d:.3g}"
                )
        for key, (d, first) in sorted(replays.items()):
            if d > TOL:
                rows = run.by_step()[first]
                problems.append(
                    f"{name}: replayed step {first} reports {key} {rows[-1].get(key)!r}, "
                    f"its first run {rows[0].get(key)!r}; max |d| {d:.3g}"
                )
        if set(run.params) != set(base.params):
            problems.append(
                f"{name}: checkpoint tensors differ: {sorted(set(run.params) ^ set(base.params))}"
            )
        if dparam > TOL:
            problems.append(f"{name}: final weights differ, max |d| {dparam:.3g} in {pname}")
    return problems


@pytest.mark.parametrize("method", sorted(METHODS))
def test_interrupted_jobs_train_exactly_like_an_uninterrupted_one(fstack, api, method, tmp_path):
    asset, spec = METHODS[method]
    if not (ASSETS / asset).is_file():
        pytest.fail(f"trainers/assets/{asset} is missing")
    t0 = time.monotonic()
    file_id = _upload(api, asset)
    straight = run_scenario(fstack, api, file_id, spec, "straight", tmp_path)
    if not straight.rows:
        pytest.fail(
            f"{method}: the uninterrupted job's /metrics is empty: no per-step report reached "
            "the record, so there is no loss sequence to compare (and no step to pause after)"
        )
    paused = run_scenario(fstack, api, file_id, spec, "paused", tmp_path)
    killed = run_scenario(fstack, api, file_id, spec, "killed", tmp_path)
    problems = compare(method, [straight, paused, killed])
    print(f"  ({time.monotonic() - t0:.0f} s)")

    # Each resumed from the newest complete checkpoint when it stopped: the paused one from
    # its pause checkpoint, replaying nothing; the killed one from an earlier checkpoint,
    # re-running every step it had reported after it. /metrics holds each step once.
    for run in (paused, killed):
        assert run.resumed_from == run.resume_expected, (run.scenario, run.resumed_from)
    assert killed.resumed_from < killed.interrupted_at
    for run in (straight, paused, killed):
        assert [r["step"] for r in run.rows] == list(range(1, run.final_step + 1)), run.scenario
    assert not problems, "\n".join(problems)
