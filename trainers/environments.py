"""A job's stateful HTTP environment as the ``environment_factory`` of TRL's ``GRPOTrainer``.

TRL 1.16 keeps a pool of environment instances, one per rollout of a batch (reused across
batches). Before generating it calls ``reset(**row)`` on each (a non-empty return is
appended to the prompt's last user message); the instance's public methods are the
rollout's tools; a ``get_reward()`` method becomes one more reward source, called once
per finished rollout. ``environment_class`` builds that class for one job: ``reset``
starts a session (``{url}/reset``), one method per declared tool sends a step
(``{url}/step``), and, when the job asks for the environment's reward, ``get_reward``
asks ``{url}/reward``. The protocol itself is in ``trainers.contract.environments``.

Every request goes through ``trainers.tools.send`` on a ``pinned_client`` of the job's
policy (outbound policy before each try, the connection made to an address that check
approved, retries, timeout, reply cap). Failures never stop the job:

- a step that fails is an ``error:`` tool message, counted in ``tools/errors`` like any
  tool's (steps are charged to the rollout's ``Episode``: ``max_tool_calls`` and
  ``episode_tool_seconds`` bound them with the job's other tools);
- a reset that fails leaves the prompt as it is; the episode's steps then answer
  ``error: the environment did not start this episode`` and its reward is not asked for;
- a reward that fails (or is not a finite number) is None, which TRL scores NaN: the
  rollout keeps its graders' rewards and the environment adds nothing to it.

``EnvStats`` counts the failed resets and rewards (``env/reset_errors``,
``env/reward_errors``, logged by ``trainers.algorithms.grpo.toolloop``). The previous
episode of an instance is closed (``{url}/close``, one try) when it is reset again, and
every open one when training ends.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

from trainers.contract.environments import REWARD_NAME, EnvironmentSpec
from trainers.contract.outbound import ToolPolicy
from trainers.contract.tools import FunctionDef
from trainers.tools import Episode, Target, ToolCall, ToolLimits, ToolStats, send


@dataclass
class EnvStats:
    """Failed resets and rewards since the last ``take`` (one rollout batch)."""

    reset_errors: int = 0
    reward_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def take(self) -> dict[str, float]:
        """These counts as metrics, and start again from zero."""
        with self.lock:
            out = {"env/reset_errors": float(self.reset_errors)}
            out["env/reward_errors"] = float(self.reward_errors)
            self.reset_errors = self.reward_errors = 0
        return out


class EnvironmentClient:
    """The protocol's four requests to one environment, under the server's policy
    (``client``: a ``pinned_client`` of ``policy``, whose check every request passes)."""

    def __init__(
        self,
        spec: EnvironmentSpec,
        policy: ToolPolicy,
        limits: ToolLimits,
        client: httpx.Client,
        stats: EnvStats,
    ):
        self.spec, self.policy, self.limits, self.client = spec, policy, limits, client
        self.stats = stats
        self.timeout = spec.timeout_seconds or limits.timeout
        self.reply_cap = min(limits.max_reply_bytes, policy.max_reply_bytes)

    def post(
        self,
        path: str,
        payload: dict[str, Any],
        budget: float = math.inf,
        retries: int | None = None,
    ) -> tuple[str | None, str]:
        """(the reply's text, "") or (None, why not)."""
        return send(
            self.client,
            Target(f"{self.spec.url}/{path}", "POST", self.spec.headers or {}),
            json.dumps(payload, default=str),
            timeout=self.timeout,
            retries=self.limits.retries if retries is None else retries,
            reply_cap=self.reply_cap,
            budget=budget,
            what="environment",
        )

    def reset(self, episode: str, row: dict[str, Any]) -> str | None:
        """The observation to append to the prompt ("" for none); None when it failed."""
        text, _ = self.post("reset", {"episode": episode, "row": row})
        observation = None if text is None else observation_of(text)
        if observation is None:
            self.stats.count("reset_errors")
        return observation

    def step(
        self, episode: str, tool: str, arguments: dict[str, Any], budget: float
    ) -> tuple[str | None, str]:
        text, error = self.post(
            "step", {"episode": episode, "tool": tool, "arguments": arguments}, budget
        )
        if text is None:
            return None, error
        observation = observation_of(text)
        if observation is None:
            return None, "the environment's reply is JSON without a text 'observation'"
        return observation, ""

    def reward(self, episode: str) -> float | None:
        text, _ = self.post("reward", {"episode": episode})
        value = None if text is None else reward_of(text)
        if value is None:
            self.stats.count("reward_errors")
        return value

    def close(self, episode: str) -> None:
        self.post("close", {"episode": episode}, retries=0)


def observation_of(text: str) -> str | None:
    """A reply's observation: ``{"observation": str}``, or the text when it is not a JSON
    object; None for an object without a text observation."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if not isinstance(value, dict):
        return text
    observation = value.get("observation", "")
    return observation if isinstance(observation, str) else None


def reward_of(text: str) -> float | None:
    """A reply's reward: ``{"reward": number}`` or a bare number; None otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = value.get("reward")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class EnvironmentTool(ToolCall):
    """One of the environment's actions: a step of the episode's session."""

    def __init__(
        self, function: FunctionDef, env: EnvironmentClient, limits: ToolLimits, stats: ToolStats
    ):
        super().__init__(function, limits, stats)
        self.env = env

    def _send(
        self, arguments: dict[str, Any], episode: Episode, budget: float
    ) -> tuple[str | None, str]:
        if episode.id is None:
            return None, "the environment did not start this episode"
        return self.env.step(episode.id, self.__name__, arguments, budget)


def environment_class(
    env: EnvironmentClient, limits: ToolLimits, stats: ToolStats, prefix: str
) -> type:
    """The class TRL instantiates per rollout: ``reset``, one method per declared tool and,
    when the job uses the environment's reward, ``get_reward``. Its episode ids are
    ``{prefix}-{n}``, n counting the resets of this process."""
    tools = {fn.name: EnvironmentTool(fn, env, limits, stats) for fn in env.spec.tools}
    counter = itertools.count(1)

    def __init__(self) -> None:
        self._pt_episode = Episode(limits)
        self._pt_open: str | None = None

    def reset(self, **row: Any) -> str | None:
        self._pt_close()
        episode = f"{prefix}-{next(counter)}"
        self._pt_open = episode
        observation = env.reset(episode, row)
        self._pt_episode = Episode(limits, None if observation is None else episode)
        return observation or None

    def _pt_close(self) -> None:
        if self._pt_open is not None:
            env.close(self._pt_open)
            self._pt_open = None

    members: dict[str, Any] = {"__init__": __init__, "reset": reset, "_pt_close": _pt_close}
    if env.spec.reward:

        def get_reward(self) -> float | None:
            if self._pt_episode.id is None:
                return None
            return env.reward(self._pt_episode.id)

        members["get_reward"] = get_reward
    for name in tools:
        members[name] = _action(name, tools[name])
    # TRL names the reward source after the class (metrics, samples' rewards)
    return type(REWARD_NAME, (), members)


def _action(name: str, tool: EnvironmentTool):
    def action(self, **arguments: Any) -> str:
        return tool.run(arguments, self._pt_episode)

    action.__name__ = action.__qualname__ = name
    action.__doc__ = tool["function"].get("description")
    return action
