"""A job's stateful environment (``trainers.environments``) against a real loopback server.

The server keeps a counter per episode: ``reset`` sets it to 0 and a target from the
row, ``increment`` adds to it, ``reward`` is 1 when it hit the target. Its base path picks
a failure mode (slow, 500, oversized, malformed JSON, no reward). Failures are results
the model reads or NaN rewards plus counts, never exceptions; two episodes never see each
other's state.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import ClassVar

import pytest

from tests.loopback import Handler, serving
from trainers.contract.environments import EnvironmentSpec
from trainers.contract.outbound import ToolPolicy, pinned_client
from trainers.environments import EnvironmentClient, EnvStats, environment_class, reward_of
from trainers.tools import ToolLimits, ToolStats

SECRET = "Bearer env-s3cret"
LOOPBACK = ToolPolicy(allowed_networks="127.0.0.0/8")
INCREMENT = {
    "name": "increment",
    "description": "Add to the counter.",
    "parameters": {
        "type": "object",
        "properties": {"by": {"type": "integer"}},
        "required": ["by"],
        "additionalProperties": False,
    },
}


class _Counter(Handler):
    sessions: ClassVar[dict[str, dict]] = {}
    seen: ClassVar[list[tuple[str, dict, str | None]]] = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        mode, op = self.path.strip("/").split("/")
        with self.lock:
            self.seen.append((self.path, body, self.headers["authorization"]))
        if mode == "slow":
            time.sleep(1.0)
        if mode == "fail" or (mode == "noreward" and op == "reward"):
            return self.reply(500, b"boom")
        if mode == "big":
            return self.reply(200, b"x" * 5000)
        if mode == "malformed":
            return self.reply(200, b'{"observation": 3, "reward": "high"}')
        answer = self._answer(op, body)
        self.reply(404 if answer is None else 200, json.dumps(answer).encode())

    def _answer(self, op: str, body: dict) -> dict | None:
        episode = body["episode"]
        with self.lock:
            if op == "reset":
                target = int(body["row"]["target"])
                self.sessions[episode] = {"count": 0, "target": target}
                return {"observation": f" (reach {target})"}
            state = self.sessions.get(episode)
            if state is None:  # no such session
                return None
            if op == "step":
                state["count"] += body["arguments"]["by"]
                return {"observation": f"count is {state['count']}"}
            if op == "reward":
                return {"reward": float(state["count"] == state["target"])}
            self.sessions.pop(episode)  # close
            return {}


@pytest.fixture(scope="module")
def server():
    with serving(_Counter) as url:
        yield url


def build(url: str, policy: ToolPolicy = LOOPBACK, reward: bool = True, **limits):
    spec = EnvironmentSpec.model_validate(
        {"url": url, "headers": {"Authorization": SECRET}, "tools": [INCREMENT], "reward": reward}
    )
    limits = ToolLimits(**{"timeout": 5.0, "retries": 1, "max_reply_bytes": 1024, **limits})
    tool_stats, env_stats = ToolStats(), EnvStats()
    client = EnvironmentClient(spec, policy, limits, pinned_client(policy.check), env_stats)
    cls = environment_class(client, limits, tool_stats, prefix="ftjob-x-0")
    return cls, tool_stats, env_stats


def test_an_episode_keeps_its_state_across_steps_and_is_scored_from_it(server):
    _Counter.seen.clear()
    cls, tools, envs = build(f"{server}/ok")
    env = cls()
    assert cls.__name__ == "environment"  # TRL names the reward source after the class
    assert env.reset(prompt=[{"role": "user", "content": "count"}], target=3) == " (reach 3)"
    assert env.increment(by=2) == "count is 2"
    assert env.get_reward() == 0.0
    assert env.increment(by=1) == "count is 3"
    assert env.get_reward() == 1.0
    path, body, auth = _Counter.seen[0]
    assert path == "/ok/reset" and auth == SECRET
    assert body == {
        "episode": "ftjob-x-0-1",
        "row": {"prompt": [{"role": "user", "content": "count"}], "target": 3},
    }
    assert _Counter.seen[1][1] == {
        "episode": "ftjob-x-0-1",
        "tool": "increment",
        "arguments": {"by": 2},
    }
    assert (tools.calls, tools.errors) == (2, 0)
    assert envs.take() == {"env/reset_errors": 0.0, "env/reward_errors": 0.0}
    env.reset(target=1)  # the previous episode is closed first, a new one started
    assert [p for p, _, _ in _Counter.seen[-2:]] == ["/ok/close", "/ok/reset"]
    assert "ftjob-x-0-1" not in _Counter.sessions and "ftjob-x-0-2" in _Counter.sessions


def test_two_concurrent_episodes_never_share_state(server):
    cls, _, _ = build(f"{server}/ok")
    a, b = cls(), cls()
    a.reset(target=2)
    b.reset(target=5)
    results: dict[str, list[str]] = {"a": [], "b": []}

    def play(name, env, by):
        for _ in range(5):
            results[name].append(env.increment(by=by))

    threads = [
        threading.Thread(target=play, args=("a", a, 1)),
        threading.Thread(target=play, args=("b", b, 10)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] == [f"count is {n}" for n in range(1, 6)]
    assert results["b"] == [f"count is {n}" for n in range(10, 60, 10)]
    assert a._pt_episode.id != b._pt_episode.id


def test_invalid_arguments_and_budgets_are_errors_the_model_reads(server):
    _Counter.seen.clear()
    cls, tools, _ = build(f"{server}/ok", max_calls=2)
    env = cls()
    env.reset(target=1)
    assert env.increment(by="one").startswith("error: invalid arguments (by)")
    assert env.increment(by=1) == "count is 1"
    assert env.increment(by=1).startswith("error: this episode made its 2 tool calls")
    assert [p for p, _, _ in _Counter.seen] == ["/ok/reset", "/ok/step"]
    assert (tools.calls, tools.errors) == (3, 2)


@pytest.mark.parametrize(
    ("mode", "limits", "error"),
    [
        ("fail", {"retries": 2}, "error: the environment answered 500"),
        ("slow", {"timeout": 0.2, "retries": 0}, "error: the environment took longer than 0.2 s"),
        ("big", {}, "error: the environment's reply is longer than 1024 bytes"),
        ("malformed", {}, "error: the environment's reply is JSON without a text 'observation'"),
    ],
)
def test_a_failed_step_is_an_error_result_and_a_count(server, mode, limits, error):
    cls, tools, _ = build(f"{server}/{mode}", **limits)
    env = cls()
    env.reset(target=1)
    env._pt_episode.id = "started"  # as if the reset had worked: the step itself fails
    _Counter.seen.clear()
    assert env.increment(by=1) == error
    assert (tools.calls, tools.errors) == (1, 1)
    tries = 1 + limits.get("retries", 1) if mode in ("fail", "slow") else 1
    assert len(_Counter.seen) == tries
    assert SECRET not in error and "127.0.0.1" not in error


@pytest.mark.parametrize("mode", ["fail", "big", "malformed"])
def test_a_failed_reset_leaves_the_prompt_and_makes_the_episode_unscored(server, mode):
    cls, tools, envs = build(f"{server}/{mode}", retries=0)
    env = cls()
    _Counter.seen.clear()
    assert env.reset(target=1) is None  # TRL appends nothing
    assert env.increment(by=1) == "error: the environment did not start this episode"
    assert env.get_reward() is None  # TRL scores it NaN: no reward from the environment
    assert [p for p, _, _ in _Counter.seen] == [f"/{mode}/reset"]  # no step, no reward asked
    assert envs.take() == {"env/reset_errors": 1.0, "env/reward_errors": 0.0}
    assert tools.errors == 1


def test_a_failed_or_malformed_reward_is_none_and_counted(server):
    cls, _, envs = build(f"{server}/noreward", retries=1)
    env = cls()
    env.reset(target=1)
    assert env.increment(by=1) == "count is 1"
    assert env.get_reward() is None
    assert envs.take()["env/reward_errors"] == 1.0
    assert [reward_of(t) for t in ("0.5", '{"reward": 2}', "true", '{"reward": "1"}')] == [
        0.5,
        2.0,
        None,
        None,
    ]
    assert reward_of('{"reward": NaN}') is None and reward_of("inf") is None
    assert not math.isnan(reward_of("-1"))


def test_without_reward_the_class_has_no_get_reward(server):
    cls, _, _ = build(f"{server}/ok", reward=False)
    assert not hasattr(cls, "get_reward")
    # TRL's tools are the class's public functions: exactly the declared actions
    public = sorted(n for n in vars(cls) if not n.startswith("_") and callable(vars(cls)[n]))
    assert public == ["increment", "reset"]


def test_the_outbound_policy_is_checked_before_every_request(server):
    _Counter.seen.clear()
    cls, _, envs = build(f"{server}/ok", ToolPolicy())
    env = cls()
    assert env.reset(target=1) is None
    assert envs.take()["env/reset_errors"] == 1.0
    assert _Counter.seen == []
