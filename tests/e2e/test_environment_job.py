"""A stateful-environment RL task whose reward rises, through the real API and worker.

The environment is a counter on a loopback HTTP server, one per episode: ``reset`` reads
the row's ``target`` (a digit) and sets the counter to 0, the model's ``increment(by)``
action adds to it, and ``reward`` scores the episode from its final state: 0.5 once the
counter moved, 0.5 more when it equals the target (a second increment overshoots). No
grader: the environment's reward is the job's only one.

As in ``test_tool_job``, the tiny random model never writes a tool call by chance, so an
SFT job first shows it the format on demonstrations (the tools turn, the call, the
environment's reply as the system turns the tiny template renders them); the GRPO job,
started from the SFT job's ``ft:`` model, raises the environment's reward (the means of
the first and the last 20 of its 60 steps went 0.50 -> 0.65, 0.49 -> 0.64 and 0.49 ->
0.59 for RL seeds 1, 2 and 3). The warm-up takes 60 steps and the RL job no KL term: after
30 warm-up steps the call format was fragile (learning rates of 1.5e-3 and above broke it
for a few steps; with the KL term at 2e-3, seed 1 collapsed to 0) and the rise so small
(0.31 -> 0.42) that a change in float rounding (the fused head's row skipping) moved it
under the assertion. The loopback environment is allowed by the stack's
``POSTTRAIN_TOOL_ALLOWED_NETWORKS``.
"""

from __future__ import annotations

import json
import statistics
import threading
from typing import ClassVar

import httpx
import pytest
from openai import OpenAI

from tests import redis_server
from tests.e2e.conftest import start_stack
from tests.e2e.test_grpo_job import all_samples, reward_curve
from tests.e2e.test_sft_job import wait_done
from tests.e2e.test_tool_job import upload
from tests.loopback import Handler, serving

pytestmark = pytest.mark.e2e
ENV_DB = 7
TARGETS = "123"
SFT_HP = {"learning_rate": 1e-2, "batch_size": 8, "n_epochs": 20, "max_steps": 60}
RL_HP = {
    "num_generations": 8,
    "batch_size": 16,
    "max_completion_length": 96,
    "learning_rate": 2e-3,
    "beta": 0.0,
    "max_steps": 60,
    "max_turns": 2,
}


class _Counter(Handler):
    """One counter per episode id; the protocol of ``trainers.contract.environments``."""

    sessions: ClassVar[dict[str, dict]] = {}
    log: ClassVar[list[str]] = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        op, episode = self.path.rsplit("/", 1)[1], body["episode"]
        with self.lock:
            self.log.append(op)
            if op == "reset":
                self.sessions[episode] = {"count": 0, "target": int(body["row"]["target"])}
                reply = {"observation": " (counter 0)"}
            elif op == "step":
                state = self.sessions[episode]
                state["count"] += int(body["arguments"].get("by", 0))
                reply = {"observation": f"counter {state['count']}"}
            elif op == "reward":
                state = self.sessions[episode]
                moved, hit = state["count"] != 0, state["count"] == state["target"]
                reply = {"reward": 0.5 * moved + 0.5 * hit}
            else:
                self.sessions.pop(episode, None)
                reply = {}
        self.reply(200, json.dumps(reply).encode())


@pytest.fixture(scope="module")
def env_url():
    with serving(_Counter) as url:
        yield url + "/counter"


@pytest.fixture(scope="module")
def estack(tmp_path_factory):
    root = tmp_path_factory.mktemp("environment")
    st = start_stack(root, redis_server.url(ENV_DB), POSTTRAIN_TOOL_ALLOWED_NETWORKS="127.0.0.0/8")
    try:
        yield st
    finally:
        st.stop()


def demonstrations() -> list[dict]:
    """Episodes as the tiny template renders them: the prompt with reset's observation,
    the call, the environment's reply, a closing answer."""
    rows = []
    for i in range(32):
        target = TARGETS[i % 3]
        call = json.dumps({"name": "increment", "arguments": {"by": int(target)}})
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "tools: increment(by)"},
                    {"role": "user", "content": f"target {target} (counter 0)"},
                    {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                    {"role": "system", "content": f"tool: counter {target}"},
                    {"role": "assistant", "content": "done"},
                ]
            }
        )
    return rows


def test_a_stateful_environment_task_learns_through_the_api(estack, env_url):
    sdk = OpenAI(base_url=f"{estack.base_url}/v1", api_key="unused", max_retries=0)
    sft = sdk.fine_tuning.jobs.create(
        model=str(estack.model_dir),
        training_file=upload(sdk, "demos.jsonl", demonstrations()),
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": SFT_HP}},
    )
    sft = wait_done(sdk, sft.id)
    assert sft.status == "succeeded", sft.error
    prompts = [
        {"messages": [{"role": "user", "content": f"target {t}"}], "target": t} for t in TARGETS * 3
    ]
    environment = {
        "url": env_url,
        "headers": {"Authorization": "Bearer env-key"},
        "tools": [
            {
                "name": "increment",
                "description": "Add to the episode's counter.",
                "parameters": {
                    "type": "object",
                    "properties": {"by": {"type": "integer"}},
                    "required": ["by"],
                },
            }
        ],
    }
    _Counter.log.clear()
    job = sdk.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=upload(sdk, "targets.jsonl", prompts),
        seed=1,
        method={
            "type": "grpo",
            "grpo": {"graders": [], "environment": environment, "hyperparameters": RL_HP},
        },
    )
    job = wait_done(sdk, job.id)
    assert job.status == "succeeded", job.error
    shown = httpx.get(f"{estack.base_url}/v1/fine_tuning/jobs/{job.id}", timeout=30).json()
    assert shown["method"]["grpo"]["environment"]["headers"] == {"Authorization": "[redacted]"}
    curve = reward_curve(estack, job.id)
    assert len(curve) == RL_HP["max_steps"]
    first, last = statistics.mean(curve[:20]), statistics.mean(curve[-20:])
    print(f"\nenvironment task reward per step: {' '.join(f'{r:.2f}' for r in curve)}")
    print(f"mean of the first 20 steps {first:.2f} -> last 20 {last:.2f} (max 1)")
    assert last >= first + 0.05, curve
    rows = httpx.get(f"{estack.base_url}/v1/fine_tuning/jobs/{job.id}/metrics", timeout=30)
    steps = [r for r in rows.json()["data"] if "reward" in r]
    assert all({"tools/calls_per_episode", "env/reset_errors"} <= set(r) for r in steps)
    assert sum(r["env/reset_errors"] + r["env/reward_errors"] for r in steps) == 0
    # every rollout was an episode: reset, scored, and closed by the end
    assert _Counter.log.count("reset") == 16 * RL_HP["max_steps"]
    assert _Counter.log.count("reward") == _Counter.log.count("reset")
    assert _Counter.log.count("step") > 0 and not _Counter.sessions
    samples = all_samples(estack, job.id)
    assert samples and all(set(s["rewards"]) == {"environment"} for s in samples)
    for s in samples:  # an episode with no call scores nothing; the reward is its state's
        if not s["tool_calls"]:
            assert s["rewards"]["environment"] == 0.0, s
