"""A GRPO job with a stateful environment, through the shared runner, against a real
loopback environment server.

No grader: the environment's reward is the only one. Each rollout gets its own episode
(reset with its row, the header value the worker passes in the process environment),
the observation reset returns is appended to the prompt, the declared action is rendered
in the prompt's tools turn, each finished rollout is scored by ``/reward`` (the
``environment`` reward source), and the episodes still open are closed when training
ends. The tiny random model writes no tool call, so no step is expected here (the
client's steps: ``tests/trainers/test_environments.py``; an episode that learns:
``tests/e2e/test_environment_job.py``).
"""

from __future__ import annotations

import json
import os
import threading
from typing import ClassVar

import pytest
import torch

from tests.loopback import Handler, serving
from trainers import registry
from trainers.contract.environments import split_environment_secrets
from trainers.contract.outbound import ToolPolicy
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.contract.tools import REDACTED, SECRETS_ENV
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model

SECRET = "Bearer env-runner-secret"


class _Env(Handler):
    calls: ClassVar[list[tuple[str, dict, str]]] = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            self.calls.append((self.path, body, self.headers["authorization"]))
        if self.path == "/env/reset":
            reply = {"observation": f" [goal {body['row']['target']}]"}
        elif self.path == "/env/reward":  # 0.25 per even episode number: varies in a group
            reply = {"reward": 0.25 * (int(body["episode"].rsplit("-", 1)[1]) % 2)}
        else:
            reply = {"observation": "ok"}
        self.reply(200, json.dumps(reply).encode())


@pytest.fixture(scope="module")
def env_url():
    with serving(_Env) as url:
        yield url + "/env"


def test_each_rollout_is_an_episode_reset_from_its_row_and_scored_by_the_environment(
    tmp_path, env_url, monkeypatch
):
    torch.set_num_threads(1)
    rows = [{"messages": [{"role": "user", "content": f"target {k}"}], "target": k} for k in "12"]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    environment = {
        "url": env_url,
        "headers": {"Authorization": SECRET},
        "tools": [
            {
                "name": "increment",
                "parameters": {"type": "object", "properties": {"by": {"type": "integer"}}},
            }
        ],
    }
    hp = {
        "num_generations": 4,
        "batch_size": 8,
        "max_completion_length": 16,
        "learning_rate": 1e-3,
        "max_steps": 2,
    }
    spec = JobSpec.model_validate(
        {
            "model": str(build_tiny_model(tmp_path / "base", seed=0)),
            "training_file": "f",
            "seed": 0,
            "method": {
                "type": "grpo",
                "grpo": {"graders": [], "environment": environment, "hyperparameters": hp},
            },
        }
    )
    # as the API stores it and the worker hands it over: redacted spec, values in the env
    stored, secrets = split_environment_secrets(spec.method.block.environment)
    assert stored.headers == {"Authorization": REDACTED}
    spec.method.block.environment = stored
    monkeypatch.setenv(SECRETS_ENV, json.dumps({"environment_headers": secrets}))
    plan = RunPlan(
        job_id="ftjob-env",
        spec=spec,
        training_path=tmp_path / "rl.jsonl",
        output_dir=tmp_path / "rl",
        data_dir=tmp_path,
        checkpoint_every_steps=1000,
        tools=ToolPolicy(allowed_networks="127.0.0.0/8"),
    )
    _Env.calls.clear()
    reporter = Reporter()
    assert run_method(registry.resolve("grpo"), plan, reporter).step == 2
    assert {auth for _, _, auth in _Env.calls} == {SECRET}
    resets = [body for path, body, _ in _Env.calls if path == "/env/reset"]
    assert len(resets) == 16  # 2 steps x 8 rollouts
    ids = [r["episode"] for r in resets]
    assert len(set(ids)) == 16 and all(i.startswith("ftjob-env-0-") for i in ids)
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 1  # one process: one run token
    assert {r["row"]["target"] for r in resets} == {"1", "2"}
    assert all(r["row"]["prompt"][-1]["role"] == "user" for r in resets)
    rewarded = [b["episode"] for p, b, _ in _Env.calls if p == "/env/reward"]
    closed = [b["episode"] for p, b, _ in _Env.calls if p == "/env/close"]
    assert sorted(rewarded) == sorted(ids) and sorted(closed) == sorted(ids)
    logs = [m.model_dump()["metrics"] for m in reporter.sent if m.type == "log"]
    steps = [m for m in logs if "rewards/environment/mean" in m]
    assert len(steps) == 2
    assert all(m["env/reset_errors"] == 0 and m["env/reward_errors"] == 0 for m in steps)
    # what each rollout scored: the environment's rewards (0 or 0.25), summed as TRL does
    assert all(0.0 < float(m["reward"]) < 0.25 for m in steps)
    samples = [r for m in reporter.sent if m.type == "samples" for r in m.model_dump()["rows"]]
    assert samples
    for row in samples:  # the declared action in the tools turn, the observation appended
        assert "tools: increment(by)" in row["prompt"]
        assert "[goal " in row["prompt"]
        assert set(row["rewards"]) == {"environment"}
    assert SECRETS_ENV not in os.environ
