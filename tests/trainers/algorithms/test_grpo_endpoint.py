"""A GRPO job whose reward is an ``endpoint`` grader, through the shared runner, against a
real loopback scoring service: the rewards the trainer computes are the scores the
service answered for those completions, the header values come from the worker's
environment (not the plan), and the endpoint's calls are logged per step. An endpoint
that cannot score, with ``on_error`` 'error', fails the job (``grader_failed``)."""

from __future__ import annotations

import json
import os
from typing import ClassVar

import pytest
import torch

from tests.loopback import Handler, serving
from trainers import registry
from trainers.contract.errors import JobError
from trainers.contract.graders.remote import split_grader_secrets
from trainers.contract.outbound import ToolPolicy
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.contract.tools import SECRETS_ENV
from trainers.graders.reward import build_reward_function, completion_text
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model

SECRET = "Bearer reward-secret"
LOOPBACK = ToolPolicy(allowed_networks="127.0.0.0/8")


def score_of(text: str) -> float:
    """What the service answers: a number in [0, 1) that differs between completions."""
    return sum(text.encode()) % 97 / 97


class _Scorer(Handler):
    auth: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.auth.append(self.headers.get("authorization"))
        if self.path == "/down":
            reply, status = b"down", 503
        else:
            reply, status = json.dumps({"score": score_of(body["sample"]["output_text"])}), 200
            reply = reply.encode()
        self.reply(status, reply)


@pytest.fixture(scope="module")
def scorer():
    with serving(_Scorer) as url:
        yield url


def test_the_rewards_are_the_scores_the_endpoint_answered(tmp_path, scorer, rewards, monkeypatch):
    torch.set_num_threads(1)
    rows = [
        {"prompt": [{"role": "user", "content": f"Say {i}."}], "answer": str(i)} for i in range(4)
    ]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    grader = {
        "type": "endpoint",
        "name": "remote",
        "url": f"{scorer}/score",
        "headers": {"Authorization": SECRET},
        "max_concurrency": 4,
    }
    hp = {"num_generations": 4, "batch_size": 8, "max_completion_length": 12, "max_steps": 2}
    spec = JobSpec.model_validate(
        {
            "model": str(build_tiny_model(tmp_path / "base", seed=0)),
            "training_file": "f",
            "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
        }
    )
    # as the API stores it and the worker hands it over: redacted spec, values in the env
    stored, secrets = split_grader_secrets(spec.method.block.graders)
    spec.method.block.graders = stored
    monkeypatch.setenv(SECRETS_ENV, json.dumps({"grader_headers": secrets}))
    plan = RunPlan(
        job_id="g",
        spec=spec,
        training_path=tmp_path / "rl.jsonl",
        output_dir=tmp_path / "out",
        data_dir=tmp_path,
        checkpoint_every_steps=1000,
        tools=LOOPBACK,
    )
    _Scorer.auth.clear()
    reporter = Reporter()
    assert run_method(registry.resolve("grpo"), plan, reporter).step == 2
    assert rewards
    for completions, per_grader, _ in rewards:
        expected = [score_of(completion_text(c)) for c in completions]
        assert per_grader[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert _Scorer.auth and set(_Scorer.auth) == {SECRET}
    logs = [m.model_dump()["metrics"] for m in reporter.sent if m.type == "log"]
    calls = [
        float(m["graders/remote/endpoint_calls"])
        for m in logs
        if "graders/remote/endpoint_calls" in m
    ]
    assert calls and max(calls) > 0
    assert len(_Scorer.auth) == sum(len(c) for c, _, _ in rewards)  # one call per completion
    assert SECRETS_ENV not in os.environ


def test_an_endpoint_that_cannot_score_fails_the_job_under_on_error_error(scorer):
    grader = {"type": "endpoint", "name": "remote", "url": f"{scorer}/down", "retries": 0}
    reward = build_reward_function(grader, LOOPBACK)
    with pytest.raises(JobError) as caught:
        reward(prompts=["p"], completions=["c"], answer=["a"])
    assert caught.value.code == "grader_failed" and "answered 503" in caught.value.message
    zero = build_reward_function({**grader, "on_error": "zero"}, LOOPBACK)
    logged = {}
    assert zero(prompts=["p"], completions=["c"], log_metric=logged.__setitem__) == [0.0]
    assert logged["graders/remote/sample_errors"] == 1.0
    assert logged["graders/remote/endpoint_errors"] == 1.0
