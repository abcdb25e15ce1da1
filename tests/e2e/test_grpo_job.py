"""The GRPO family through the real API and worker: grpo, xrpo, hapo and OpenAI's reinforcement.

The toy task is verifiable and reachable for the tiny random model: every prompt's
``answer`` is "Heidi", a word the base model already emits in about one completion
in ten, and the grader scores 1 when the completion contains it. Each job's
per-step mean reward is read from its metrics; the last steps must be clearly
above the first ones. Each job's samples (GET .../samples) hold one sample per generated
batch, whose rewards are the grader's on the stored completion and whose advantages
follow the method's rule where that is cheap to check.
"""

from __future__ import annotations

import json
import statistics
import time
from importlib import resources

import httpx
import pytest
from openai import OpenAI

from tests.e2e.test_sft_job import wait_done

pytestmark = pytest.mark.e2e
ASSETS = resources.files("trainers") / "assets"
TRAIN_LINES = (ASSETS / "demo_grpo.jsonl").read_text().splitlines()
GRADER = {
    "type": "string_check",
    "name": "says_answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}
HP = {
    "num_generations": 8,
    "batch_size": 16,
    "max_completion_length": 8,
    "learning_rate": 5e-3,
    "max_steps": 60,
}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def files(sdk):
    out = {}
    for name in ("demo_grpo.jsonl", "demo_grpo_validation.jsonl"):
        with (ASSETS / name).open("rb") as fh:
            out[name] = sdk.files.create(file=(name, fh), purpose="fine-tune").id
    return out


def all_samples(stack, job_id: str) -> list[dict]:
    """Every sample row of the job, oldest first, page by page."""
    rows: list[dict] = []
    params: dict = {"limit": 100}
    while True:
        url = f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/samples"
        page = httpx.get(url, params=params, timeout=30).json()
        rows += page["data"]
        if not page["has_more"]:
            return rows
        params["after"] = page["last_id"]


def check_samples(name: str, samples: list[dict], updates: int, per_batch: int) -> None:
    """One sample per generated batch (the default: at most every step), ``per_batch`` rows
    each, scored as the grader defines and with the advantages of the method's rule."""
    by_step: dict[int, list[dict]] = {}
    for row in samples:
        by_step.setdefault(row["step"], []).append(row)
    assert sorted(by_step) == list(range(1, HP["max_steps"] + 1, updates)), sorted(by_step)
    assert {len(rows) for rows in by_step.values()} == {per_batch}
    prompts = {json.loads(line)["messages"][0]["content"] for line in TRAIN_LINES}
    for row in samples:
        said = float("Heidi" in row["completion"])  # 'like': the answer occurs, case and all
        assert row["rewards"] == {"says_answer": said} and row["reward"] == said, row
        assert row["advantage"] is not None and row["group"] is not None, row
        assert any(p in row["prompt"] for p in prompts), row["prompt"]
        assert 1 <= row["completion_tokens"] <= HP["max_completion_length"], row
        if row["completion_tokens"] < HP["max_completion_length"]:
            assert not row["truncated"], row  # it ended on its own
    if name not in ("grpo", "reinforcement"):
        return  # xrpo's novelty and hapo's estimator shape advantages beyond a cheap check
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in samples:
        groups.setdefault((row["step"], row["group"]), []).append(row)
    for rows in groups.values():
        for row in rows:  # z-scored within the group: the sign of reward - group mean
            assert (row["advantage"] >= -1e-6) if row["reward"] == 1.0 else row["advantage"] <= 1e-6
        if len(rows) == HP["num_generations"]:  # a whole group: TRL's rule exactly
            rewards = [r["reward"] for r in rows]
            mean, std = statistics.mean(rewards), statistics.stdev(rewards)
            for row in rows:
                assert row["advantage"] == pytest.approx(
                    (row["reward"] - mean) / (std + 1e-4), abs=1e-3
                )


def reward_curve(stack, job_id: str) -> list[float]:
    rows = httpx.get(f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/metrics", timeout=30).json()
    by_step = {r["step"]: r["reward"] for r in rows["data"] if "reward" in r}
    return [by_step[s] for s in sorted(by_step)]


METHODS = {
    "grpo": {
        "type": "grpo",
        "grpo": {"variant": "grpo", "graders": [GRADER], "hyperparameters": HP},
    },
    "xrpo": {
        "type": "grpo",
        "grpo": {"variant": "xrpo", "graders": [GRADER], "hyperparameters": HP},
    },
    "hapo": {
        "type": "grpo",
        "grpo": {"variant": "hapo", "graders": [GRADER], "hyperparameters": HP},
    },
    "reinforcement": {
        "type": "reinforcement",
        "reinforcement": {
            "grader": GRADER,
            "hyperparameters": {**HP, "n_epochs": "auto", "eval_interval": 20, "eval_samples": 2},
        },
    },
}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_variant_learns_the_toy_task_through_the_api(stack, sdk, files, name):
    t0 = time.monotonic()
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=files["demo_grpo.jsonl"],
        validation_file=files["demo_grpo_validation.jsonl"] if name == "reinforcement" else None,
        seed=5,
        method=METHODS[name],
        # the grpo job samples whole groups (its advantages are checked exactly), the
        # others the default 4 rows
        extra_body={"sample_rows": HP["num_generations"]} if name == "grpo" else None,
    )
    job = wait_done(sdk, job.id)
    assert job.status == "succeeded", job.error
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    # the preset's update schedule, fitted to the 16-prompt file (2 prompts per step):
    # one reward per generated batch, each feeding `updates` optimizer steps
    (schedule,) = [e.message for e in events if e.message.startswith("Update schedule: ")]
    updates = int(schedule.removeprefix("Update schedule: ").split()[0])
    assert updates == {"xrpo": 8, "hapo": 8}.get(name, 1), schedule
    curve = reward_curve(stack, job.id)
    assert len(curve) == -(-HP["max_steps"] // updates)
    k = max(2, len(curve) // 6)  # the first and last sixth of the run (10 of 60 batches)
    first, last = statistics.mean(curve[:k]), statistics.mean(curve[-k:])
    marks = " ".join(f"{r:.2f}" for r in curve[:: max(1, len(curve) // 7)])
    print(
        f"\n{name}: {schedule}; mean reward of the first {k} generated batches {first:.2f} -> "
        f"last {k} {last:.2f} ({marks}); {time.monotonic() - t0:.1f} s through the API"
    )
    assert last >= first + 0.2 and last >= 0.7
    per_batch = HP["num_generations"] if name == "grpo" else 4
    check_samples(name, all_samples(stack, job.id), updates, per_batch)
    # the newest step that generated carries the rollout metrics; every step the loss's
    newest = next(e for e in events if e.type == "metrics" and "reward" in e.data).data
    assert {"rewards/says_answer/mean", "entropy", "completions/mean_length"} <= set(newest)
    assert "loss" in next(e for e in events if e.type == "metrics").data
    if name == "reinforcement":  # validation reward on the held-out prompts, every 20 steps
        messages = [e.message for e in events]
        assert any(m.startswith("Validation at step 20: reward=") for m in messages), messages
        final = next(iter(sdk.fine_tuning.jobs.checkpoints.list(job.id)))
        extra = final.metrics.model_extra or {}
        assert extra.get("valid_mean_reward") is not None and extra.get("train_mean_reward")


BAD = [
    ({"type": "grpo", "grpo": {"variant": "nope", "graders": [GRADER]}}, "variant"),
    ({"type": "grpo", "grpo": {"graders": [{**GRADER, "type": "nope"}]}}, "nope"),
    (
        {"type": "grpo", "grpo": {"graders": [{**GRADER, "reference": "{{item.missing}}"}]}},
        "item.missing",
    ),
    (
        {"type": "grpo", "grpo": {"graders": [GRADER], "hyperparameters": {"num_generations": 1}}},
        "num_generations",
    ),
    (
        {
            "type": "grpo",
            "grpo": {
                "graders": [GRADER],
                "hyperparameters": {"num_generations": 4, "batch_size": 6},
            },
        },
        "multiple of num_generations",
    ),
    (
        {
            "type": "reinforcement",
            "reinforcement": {
                "grader": {"type": "python", "name": "p", "source": "def grade(s, i): return 1"}
            },
        },
        "POSTTRAIN_PYTHON_GRADER=off",
    ),
]


@pytest.mark.parametrize("method,fragment", BAD)
def test_bad_grpo_requests_are_400s_naming_the_problem(stack, files, method, fragment):
    body = {
        "model": str(stack.model_dir),
        "training_file": files["demo_grpo.jsonl"],
        "method": method,
    }
    resp = httpx.post(f"{stack.base_url}/v1/fine_tuning/jobs", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"]["message"], resp.json()
    assert json.dumps(resp.json()["error"])  # OpenAI's error shape, serialisable
