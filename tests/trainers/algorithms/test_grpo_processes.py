"""A group split over two processes is normalised as one group, exactly as in one process.

TRL lays each prompt's G completions out consecutively over the gathered batch, so when a
process's share is not a multiple of G a group straddles two processes. posttrain's own
estimators (NGRPO, HAPO, XRPO's shaping) must see it whole: NGRPO's advantage of an
all-wrong group depends on the group's size (-1/3 for 4 members, -0.447 for 2).

The run: NGRPO, G = 4, a global batch of 12 completions (3 prompts) on 1 process and on 2
(6 each: the middle prompt's group is split 2 + 2). Rewards read only the row
(``{{item.answer}}`` is "yes"), so they do not depend on what each rank sampled, and the
advantages' statistics of the step (computed over the gathered batch) must be equal.
"""

from __future__ import annotations

import json

import pytest

from tests.launched import run_plan
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.tiny_model import build_tiny_model

GRADER = {
    "type": "string_check",
    "name": "says_yes",
    "input": "{{item.answer}}",
    "reference": "yes",
    "operation": "eq",
}
STATS = ("advantages/mean", "advantages/std", "advantages/abs_max", "reward", "reward_std")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("groups")
    model = build_tiny_model(root / "m", seed=0)
    rows = [{"prompt": f"Answer {i}:", "answer": "yes" if i % 3 == 0 else "no"} for i in range(12)]
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    hp = {
        "num_generations": 4,
        "batch_size": 12,
        "max_completion_length": 4,
        "max_steps": 1,
        "steps_per_generation": 1,
    }
    out = {}
    for processes in (1, 2):
        spec = JobSpec.model_validate(
            {
                "model": str(model),
                "training_file": "f",
                "method": {
                    "type": "grpo",
                    "grpo": {"variant": "ngrpo", "graders": [GRADER], "hyperparameters": hp},
                },
                "resources": {"gpus": 0, "processes": processes},
            }
        )
        plan = RunPlan(
            job_id="groups",
            spec=spec,
            training_path=data,
            output_dir=root / f"out-{processes}",
            data_dir=root,
            checkpoint_every_steps=100,
            threads=1,
            processes=processes,
        )
        lines = run_plan(plan, root)
        (log,) = [m for m in lines if m["type"] == "log"]
        out[processes] = log["metrics"]
    return out


def test_two_processes_give_the_advantages_of_one(runs):
    one, two = runs[1], runs[2]
    for key in STATS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_the_split_group_is_normalised_whole(runs):
    # every group is all "yes" (A = 0) or all "no"; with its one virtual reward of 1, an
    # all-no group of 4 has mu' = 1/5, sigma' = sqrt(1/5) and A = -1/sqrt(5) = -0.4472,
    # while a group split 2 + 2 would have mu' = 1/3, sigma' = sqrt(1/3), A = -0.5774
    assert runs[2]["advantages/abs_max"] == pytest.approx(5**-0.5, abs=1e-4)
