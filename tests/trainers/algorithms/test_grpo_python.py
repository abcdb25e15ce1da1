"""A GRPO job whose reward is a ``python`` grader, through the shared runner with the
sandbox settings the worker puts in the run plan: the rewards the trainer computes are
what the grader's source computes for those completions, from its bubblewrap sandbox.
Skipped where bwrap does not work."""

from __future__ import annotations

import json

import pytest
import torch

from trainers import registry
from trainers.contract.plan import RunPlan
from trainers.contract.sandbox import SandboxPolicy, probe
from trainers.contract.spec import JobSpec
from trainers.graders.reward import completion_text
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model

SANDBOX = SandboxPolicy(mode="bwrap")
WHY = probe(SANDBOX)
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"no working bubblewrap sandbox: {WHY}")
SOURCE = (
    "def grade(sample, item):\n"
    "    bonus = 0.5 if item['answer'] in sample['output_text'] else 0.0\n"
    "    return sum(sample['output_text'].encode()) % 97 / 97 + bonus\n"
)


def score_of(text: str, answer: str) -> float:
    """What SOURCE computes, worked out here."""
    return sum(text.encode()) % 97 / 97 + (0.5 if answer in text else 0.0)


def test_the_rewards_are_what_the_python_source_computes(tmp_path, rewards):
    torch.set_num_threads(1)
    rows = [
        {"prompt": [{"role": "user", "content": f"Say {i}."}], "answer": str(i)} for i in range(4)
    ]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    grader = {"type": "python", "name": "py", "source": SOURCE}
    hp = {"num_generations": 4, "batch_size": 8, "max_completion_length": 12, "max_steps": 2}
    spec = JobSpec.model_validate(
        {
            "model": str(build_tiny_model(tmp_path / "base", seed=0)),
            "training_file": "f",
            "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
        }
    )
    plan = RunPlan(
        job_id="p",
        spec=spec,
        training_path=tmp_path / "rl.jsonl",
        output_dir=tmp_path / "out",
        data_dir=tmp_path,
        checkpoint_every_steps=1000,
        python_graders=SANDBOX,
    )
    assert run_method(registry.resolve("grpo"), plan, Reporter()).step == 2
    assert rewards
    answers = {f"Say {r['answer']}.": r["answer"] for r in rows}
    for completions, per_grader, prompts in rewards:
        expected = [
            score_of(completion_text(c), answers[p[-1]["content"]])
            for c, p in zip(completions, prompts, strict=True)
        ]
        assert per_grader[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
