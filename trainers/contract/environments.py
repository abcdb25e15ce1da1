"""A stateful environment of an RL job: an HTTP service that keeps one session per episode.

A ``grpo`` or ``reinforcement`` job may give an ``environment`` in its method block (an
extension). Where a tool (``trainers.contract.tools``) is a stateless function, an
environment keeps state across the calls of one rollout (a game, a sandbox, a counter)
and may score the rollout from that state. posttrain speaks this protocol to it, every
request a JSON ``POST`` below ``url``:

- ``{url}/reset`` with ``{"episode": id, "row": {...}}`` when a rollout starts. ``row``
  holds the training row's fields (its ``prompt`` and every extra field). The reply
  ``{"observation": "text"}`` (or plain text; empty = nothing) is appended to the
  prompt's last user message before the model writes.
- ``{url}/step`` with ``{"episode": id, "tool": name, "arguments": {...}}`` when the model
  calls one of the environment's ``tools``. The reply's ``observation`` (or its plain
  text) is the tool message the model reads next.
- ``{url}/reward`` with ``{"episode": id}`` once the rollout is over, when ``reward`` is
  true. The reply ``{"reward": number}`` (or a bare number) is one more reward source
  beside the graders, with weight 1, named ``environment``.
- ``{url}/close`` with ``{"episode": id}`` when posttrain is done with the episode (its
  next reset or the end of training); best effort, the reply is ignored.

Episode ids are unique per rollout (the job id, the process rank, a token drawn when the
training process starts, and a counter), so concurrent rollouts never share a session
and a resumed job never reuses an id. ``tools`` are OpenAI function definitions
(``FunctionDef``); the model sees them beside the job's own ``tools``, and arguments are
checked against their schema before a step is sent.

``headers`` are secrets, kept out of the job record like a tool's (the job's secrets
key holds them under ``environment_headers``). The URL passes the server's outbound
policy at creation and before every request. Pure pydantic.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from trainers.contract.hparams import Strict
from trainers.contract.tools import MAX_TOOLS, REDACTED, FunctionDef, check_headers

# TRL calls these methods of an environment itself; the names cannot be tools.
RESERVED_NAMES = ("reset", "get_reward")
# The reward source's name (metrics ``rewards/environment/...``, samples' ``rewards``).
REWARD_NAME = "environment"


class EnvironmentSpec(Strict):
    """Where the environment runs, what it lets the model call, and whether it scores."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="Base http(s) URL; posttrain POSTs to {url}/reset, /step, /reward, /close.",
    )
    headers: dict[str, str] | None = Field(
        None, description="Sent with every request (e.g. authorization); values are kept secret."
    )
    tools: list[FunctionDef] = Field(
        min_length=1,
        max_length=MAX_TOOLS,
        description="OpenAI function definitions of the actions the environment answers.",
    )
    reward: bool = Field(
        True, description="Ask {url}/reward after each rollout and use it as a reward source."
    )
    timeout_seconds: float | None = Field(
        None,
        gt=0.0,
        le=300.0,
        description="How long one try of a request may take; None = tool_timeout_seconds.",
    )

    _headers = field_validator("headers")(classmethod(lambda cls, v: check_headers(v)))

    @field_validator("url")
    @classmethod
    def _base(cls, value: str) -> str:
        if "?" in value or "#" in value:
            raise ValueError("url is a base URL: no query or fragment (paths are added to it)")
        return value.rstrip("/")

    @field_validator("tools")
    @classmethod
    def _names(cls, value: list[FunctionDef]) -> list[FunctionDef]:
        names = [f.name for f in value]
        for name in names:
            if name in RESERVED_NAMES or name.startswith("_"):
                raise ValueError(
                    f"tool name '{name}' is reserved (reset, get_reward and names starting "
                    "with '_'); rename it"
                )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tool names must be unique; '{dup[0]}' is given more than once")
        return value

    def schemas(self) -> list[dict[str, Any]]:
        """The definitions the chat template renders (never the URL)."""
        return [
            {"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.tools
        ]


def check_names(env: EnvironmentSpec | None, tools: list | None) -> EnvironmentSpec | None:
    """The environment, unless one of its actions has the name of one of the job's tools."""
    mine = {t.function.name for t in tools or ()}
    for i, fn in enumerate(env.tools if env is not None else ()):
        if fn.name in mine:
            raise ValueError(
                f"tools[{i}].name: '{fn.name}' is also one of the job's tools; tool names "
                "must be unique across tools and the environment"
            )
    return env


def check_reward_sources(env: EnvironmentSpec | None, graders: list) -> None:
    """A job needs a reward: a grader, or an environment that scores; and no grader may
    take the environment's reward name."""
    scores = env is not None and env.reward
    if not graders and not scores:
        raise ValueError("graders: give at least one grader, or an environment with reward true")
    if scores and REWARD_NAME in {getattr(g, "name", None) for g in graders}:
        raise ValueError(
            f"graders: the name '{REWARD_NAME}' is the environment's reward source; "
            "rename the grader"
        )


def split_environment_secrets(
    env: EnvironmentSpec,
) -> tuple[EnvironmentSpec, dict[str, str] | None]:
    """(the environment with its header values replaced by ``[redacted]``, the values)."""
    if not env.headers:
        return env, None
    return env.model_copy(update={"headers": dict.fromkeys(env.headers, REDACTED)}), dict(
        env.headers
    )


def merge_environment_secrets(env: EnvironmentSpec, secrets: dict[str, str]) -> EnvironmentSpec:
    """The stored environment with its header values back; one the secrets lack is not sent."""
    headers = env.headers or {}
    return env.model_copy(update={"headers": {k: secrets[k] for k in headers if k in secrets}})
