"""An RL job's tools as the callables TRL's ``GRPOTrainer`` runs in its tool loop.

``GRPOTrainer(tools=[...])`` renders each tool's definition into the prompt (through
``apply_chat_template``) and, when the model's reply parses into tool calls, calls the
tool by its ``__name__`` with the call's arguments; the reply becomes a ``tool`` message,
whose tokens TRL leaves out of the loss (``tool_mask``). ``HttpTool`` is both at once: a
dict holding the OpenAI definition (what the template renders; the endpoint and its
headers are never in it) that is also callable (what the loop runs). ``ToolCall`` is
the part shared with a stateful environment's actions (``trainers.environments``), and
``send`` the one request function both use.

A call is never an exception to TRL: every failure is a string starting ``error:`` that
the model reads as the tool's answer, and a count in ``ToolStats``:

- arguments that do not match the tool's JSON schema are not sent;
- the URL is checked against the server's outbound policy before every try, and the
  try connects to an address that check approved (``trainers.contract.outbound``: the
  client comes from ``pinned_client``; a name may resolve elsewhere by now, and a
  second lookup could answer a forbidden address);
- the arguments are sent as a JSON body; a timeout, a refused connection or a 5xx is
  retried ``tool_retries`` times; another non-2xx status is an error at once; redirects
  are not followed;
- at most ``tool_max_reply_bytes`` (and the server's cap) are read, within
  ``tool_timeout_seconds`` in all; a longer or non-UTF-8 reply is an error;
- ``Episode`` bounds one rollout's calls (``max_tool_calls``) and their total time
  (``episode_tool_seconds``).

Error texts name neither the URL (its query may hold a key) nor any header.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from trainers.contract.outbound import AddressRefused, ToolPolicy, pinned_client
from trainers.contract.tools import FunctionDef, Tool

ERROR = "error: "


@dataclass
class ToolLimits:
    """A job's tool hyperparameters (``trainers.contract.methods.grpo``)."""

    timeout: float = 10.0
    retries: int = 1
    max_reply_bytes: int = 8192
    max_calls: int = 8
    episode_seconds: float = 120.0


@dataclass
class ToolStats:
    """Counts over the calls since the last ``take`` (one rollout batch)."""

    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    by_tool: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float, failed: bool) -> None:
        with self.lock:
            self.calls += 1
            self.errors += int(failed)
            self.seconds += seconds
            self.by_tool.setdefault(name, []).append(seconds)

    def take(self) -> ToolStats:
        """These counts, and start again from zero."""
        with self.lock:
            out = ToolStats(self.calls, self.errors, self.seconds, self.by_tool)
            self.calls, self.errors, self.seconds, self.by_tool = 0, 0, 0.0, {}
        return out


class Episode:
    """One rollout's budget of calls and of time spent in them; ``id`` names the session
    of a stateful environment (``trainers.environments``), None without one."""

    def __init__(self, limits: ToolLimits, id: str | None = None):
        self.limits = limits
        self.id = id
        self.calls = 0
        self.spent = 0.0

    def refuse(self) -> str | None:
        """An error text when this episode may make no more calls, else None."""
        if self.calls >= self.limits.max_calls:
            return f"{ERROR}this episode made its {self.limits.max_calls} tool calls; answer now"
        if self.spent >= self.limits.episode_seconds:
            return f"{ERROR}this episode's tool time ({self.limits.episode_seconds:g} s) is spent"
        return None


@dataclass
class Target:
    """Where a request goes: its URL, HTTP method and headers (secrets; never in errors)."""

    url: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def send(
    client: httpx.Client,
    target: Target,
    body: str,
    *,
    timeout: float,
    retries: int,
    reply_cap: int,
    budget: float = float("inf"),
    what: str = "tool",
) -> tuple[str | None, str]:
    """One JSON request to a user's endpoint: (the reply's text, "") or (None, why not).

    ``client`` is a ``pinned_client`` of the outbound policy: it checks the URL before
    every try and connects to an address the check approved. A timeout, a refused
    connection or a 5xx is retried ``retries`` times while ``budget`` seconds last;
    another non-2xx status fails at once; redirects are not followed; at most
    ``reply_cap`` bytes are read within ``timeout``, and the reply must be UTF-8. ``what``
    names the endpoint in the error (never its URL, whose query may hold a key)."""
    error = "no try was made"
    start = time.monotonic()
    for attempt in range(retries + 1):
        left = budget - (time.monotonic() - start)
        if attempt and left <= 0:
            break
        text, error, retry = _try(
            client, target, body, min(timeout, max(left, 0.001)), reply_cap, what
        )
        if text is not None:
            return text, ""
        if not retry:
            break
    return None, error


def _try(
    client: httpx.Client, target: Target, body: str, timeout: float, cap: int, what: str
) -> tuple[str | None, str, bool]:
    """(the reply's text or None, the error, whether a retry may help)."""
    headers = {
        "content-type": "application/json",
        "user-agent": "posttrain-tools",
        "accept-encoding": "identity",  # the cap counts the bytes the model would read
        **target.headers,
    }
    deadline = time.monotonic() + timeout
    try:
        with client.stream(
            target.method, target.url, content=body, headers=headers, timeout=timeout
        ) as resp:
            if resp.status_code >= 500:
                return None, f"the {what} answered {resp.status_code}", True
            if not 200 <= resp.status_code < 300:
                return None, f"the {what} answered {resp.status_code}", False
            data = bytearray()
            for chunk in resp.iter_raw():
                data += chunk
                if len(data) > cap:
                    return None, f"the {what}'s reply is longer than {cap} bytes", False
                if time.monotonic() > deadline:
                    return None, f"the {what} took longer than {timeout:g} s", True
    except AddressRefused as exc:  # the client's check: nothing was sent
        return None, f"the {what}'s endpoint is not allowed: {exc}", False
    except httpx.TimeoutException:
        return None, f"the {what} took longer than {timeout:g} s", True
    except httpx.HTTPError as exc:
        return None, f"the {what} could not be reached ({type(exc).__name__})", True
    try:
        return bytes(data).decode("utf-8"), "", False
    except UnicodeDecodeError:
        return None, f"the {what}'s reply is not UTF-8 text", False


class ToolCall(dict):
    """An OpenAI tool definition (the dict) whose call is checked against its schema,
    charged to an ``Episode`` and counted in ``ToolStats``; ``_send`` makes the call."""

    def __init__(self, function: FunctionDef, limits: ToolLimits, stats: ToolStats):
        super().__init__({"type": "function", "function": function.model_dump(exclude_none=True)})
        self.__name__ = function.name
        self.limits, self.stats = limits, stats
        self.validator = Draft202012Validator(function.parameters)

    def __call__(self, **arguments: Any) -> str:
        return self.run(arguments, Episode(self.limits))

    def bound(self, episode: Episode):
        """This tool as TRL calls it, charged to ``episode``."""

        def call(**arguments: Any) -> str:
            return self.run(arguments, episode)

        call.__name__ = self.__name__
        return call

    def run(self, arguments: dict[str, Any], episode: Episode) -> str:
        """The text the model reads back: the endpoint's reply, or an ``error:`` text."""
        refused = episode.refuse()
        if refused is not None:
            self.stats.add(self.__name__, 0.0, failed=True)
            return refused
        episode.calls += 1
        start = time.monotonic()
        result, failed = self._call(arguments, episode)
        spent = time.monotonic() - start
        episode.spent += spent
        self.stats.add(self.__name__, spent, failed)
        return result

    def _call(self, arguments: dict[str, Any], episode: Episode) -> tuple[str, bool]:
        problems = sorted(self.validator.iter_errors(arguments), key=lambda e: list(e.path))
        if problems:
            where = "/".join(str(p) for p in problems[0].path) or "arguments"
            return f"{ERROR}invalid arguments ({where}): {problems[0].message}"[:500], True
        text, error = self._send(arguments, episode, self.limits.episode_seconds - episode.spent)
        return (text, False) if text is not None else (f"{ERROR}{error}", True)

    def _send(
        self, arguments: dict[str, Any], episode: Episode, budget: float
    ) -> tuple[str | None, str]:
        raise NotImplementedError


class HttpTool(ToolCall):
    """A job's tool: its arguments are POSTed (or PUT) as JSON to the user's endpoint
    (``client``: a ``pinned_client`` of ``policy``, whose check every request passes)."""

    def __init__(
        self,
        tool: Tool,
        policy: ToolPolicy,
        limits: ToolLimits,
        stats: ToolStats,
        client: httpx.Client,
    ):
        super().__init__(tool.function, limits, stats)
        self.endpoint = tool.endpoint
        self.policy, self.client = policy, client
        self.reply_cap = min(limits.max_reply_bytes, policy.max_reply_bytes)

    def _send(
        self, arguments: dict[str, Any], episode: Episode, budget: float
    ) -> tuple[str | None, str]:
        target = Target(self.endpoint.url, self.endpoint.method, self.endpoint.headers or {})
        return send(
            self.client,
            target,
            json.dumps(arguments),
            timeout=self.limits.timeout,
            retries=self.limits.retries,
            reply_cap=self.reply_cap,
            budget=budget,
        )


def build_tools(
    tools: list[Tool], policy: ToolPolicy, limits: ToolLimits
) -> tuple[list[HttpTool], ToolStats]:
    """The job's tools as TRL callables sharing one HTTP client (pinned to what ``policy``
    approves) and one ``ToolStats``."""
    stats = ToolStats()
    client = pinned_client(policy.check)
    return [HttpTool(t, policy, limits, stats, client) for t in tools], stats
