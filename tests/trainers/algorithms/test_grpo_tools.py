"""A GRPO job with a tool, through the shared runner, against a real loopback endpoint.

The tiny random model never writes a tool call by chance, so it is first taught the
format with a short SFT run (the tools turn and the tool result written as the system
turns the tiny template renders them as, token for token). The GRPO run then calls
``lookup`` during its rollouts: the endpoint sees the arguments and the header values
the worker passes in the environment, TRL masks the tool results' tokens out of the loss
(``tool_mask``), and the tool metrics are logged per step.
"""

from __future__ import annotations

import json
import os
import random
from typing import ClassVar

import pytest
import torch

from tests.loopback import Handler, serving
from trainers import registry
from trainers.algorithms.grpo.trainer import PosttrainGRPOTrainer
from trainers.contract.outbound import ToolPolicy
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.contract.tools import REDACTED, SECRETS_ENV, split_secrets
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model

SECRET = "Bearer runner-secret"


def value(key: str) -> str:
    return str((int(key) * 7 + 3) % 10)


class _Lookup(Handler):
    auth: ClassVar[list[str]] = []

    def do_POST(self):
        args = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.auth.append(self.headers["authorization"])
        key = str(args.get("key", ""))
        reply = value(key).encode() if key.isdigit() else b""
        self.reply(200 if reply else 400, reply)


@pytest.fixture(scope="module")
def endpoint():
    with serving(_Lookup) as url:
        yield url + "/lookup"


def call_text(key: str) -> str:
    call = json.dumps({"name": "lookup", "arguments": {"key": key}})
    return f"<tool_call>{call}</tool_call>"


def sft_model(root):
    """The tiny model after 30 SFT steps on episodes of the lookup task."""
    rng = random.Random(0)
    rows = []
    for key in (str(rng.randrange(10)) for _ in range(48)):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "tools: lookup(key)"},
                    {"role": "user", "content": f"key {key}"},
                    {"role": "assistant", "content": call_text(key)},
                    {"role": "system", "content": f"tool: {value(key)}"},
                    {"role": "assistant", "content": value(key)},
                ]
            }
        )
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    hp = {"learning_rate": 1e-2, "batch_size": 8, "n_epochs": 10, "max_steps": 30}
    spec = JobSpec.model_validate(
        {
            "model": str(build_tiny_model(root / "base", seed=0)),
            "training_file": "f",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        }
    )
    plan = RunPlan(
        job_id="s",
        spec=spec,
        training_path=root / "sft.jsonl",
        output_dir=root / "sft",
        data_dir=root,
        checkpoint_every_steps=1000,
    )
    return root / run_method(registry.resolve("supervised"), plan, Reporter()).checkpoint


@pytest.fixture
def masks(monkeypatch):
    """The tool masks of every rollout batch the trainer scored."""
    seen = []
    original = PosttrainGRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        seen.append(out.get("tool_mask"))
        return out

    monkeypatch.setattr(PosttrainGRPOTrainer, "_generate_and_score_completions", spy)
    return seen


def test_rollouts_call_the_tool_and_its_results_are_not_trained_on(
    tmp_path, endpoint, masks, monkeypatch
):
    torch.set_num_threads(1)
    model = sft_model(tmp_path)
    rows = [
        {"messages": [{"role": "user", "content": f"key {k}"}], "answer": value(str(k))}
        for k in range(8)
    ]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tool = {
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"key": {"type": "string"}},
                "required": ["key"],
            },
        },
        "endpoint": {"url": endpoint, "headers": {"Authorization": SECRET}},
    }
    grader = {
        "type": "string_check",
        "name": "copied",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    hp = {
        "num_generations": 4,
        "batch_size": 8,
        "max_completion_length": 96,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "max_turns": 2,
    }
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "training_file": "f",
            "method": {
                "type": "grpo",
                "grpo": {"graders": [grader], "tools": [tool], "hyperparameters": hp},
            },
        }
    )
    # as the API stores it and the worker hands it over: redacted spec, values in the env
    stored, secrets = split_secrets(spec.method.block.tools)
    assert stored[0].endpoint.headers == {"Authorization": REDACTED}
    spec.method.block.tools = stored
    monkeypatch.setenv(SECRETS_ENV, json.dumps({"tool_headers": secrets}))
    plan = RunPlan(
        job_id="g",
        spec=spec,
        training_path=tmp_path / "rl.jsonl",
        output_dir=tmp_path / "rl",
        data_dir=tmp_path,
        checkpoint_every_steps=1000,
        tools=ToolPolicy(allowed_networks="127.0.0.0/8"),
    )
    _Lookup.auth.clear()
    reporter = Reporter()
    assert run_method(registry.resolve("grpo"), plan, reporter).step == 2
    logs = [m.model_dump()["metrics"] for m in reporter.sent if m.type == "log"]
    steps = [m for m in logs if "tools/calls_per_episode" in m]
    assert len(steps) == 2
    calls = sum(float(m["tools/calls_per_episode"]) for m in steps)
    assert calls > 0 and _Lookup.auth and set(_Lookup.auth) == {SECRET}
    assert all(float(m["tools/turns_per_episode"]) >= 1 for m in steps)
    # an episode is the model's tokens plus the results': TRL's mean_length is the former
    for m in steps:
        model_tokens = float(m["completions/mean_length"])
        assert float(m["tools/episode_tokens"]) == pytest.approx(
            model_tokens + float(m["tools/result_tokens"]), rel=1e-6
        )
    assert any(float(m["tools/result_tokens"]) > 0 for m in steps)
    # a rollout that called the tool has masked (0) tokens: the tool result's
    assert any(mask is not None and (mask == 0).any() for mask in masks)
    assert SECRETS_ENV not in os.environ  # read once, not left for children to inherit
