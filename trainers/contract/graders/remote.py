"""The ``endpoint`` grader (extension): the user's HTTP service scores each sample.

posttrain POSTs one JSON object per sample to ``url``::

    {"item": <the dataset row>,
     "sample": {"output_text": "...", "output_json": <the text parsed as JSON, or null>,
                "messages": [...], "tool_calls": [...]}}

``messages`` and ``tool_calls`` are the episode views ``sample.messages`` and
``sample.tool_calls`` of ``templates`` (a sample without tools is one assistant message
and no calls). The reply must be a 2xx whose body is a JSON object with a finite number
under ``score`` (``{"score": 0.75}``; other keys are ignored); that number is the reward.

How a call goes: the URL passes the server's outbound policy (``outbound.ToolPolicy``,
the tools' settings) when the job is created and again before every try, and the try
connects to an address that check approved (``outbound.pinned_client``); redirects are
not followed; a timeout, a refused connection or a 5xx is retried ``retries`` times, any
other status is not; at most the server's ``POSTTRAIN_TOOL_MAX_REPLY_BYTES`` are read; at
most ``max_concurrency`` calls of one grader run at once. A sample whose call fails
(after its retries), or whose reply is no such object, is an endpoint error: with
``on_error: "zero"`` it scores 0 and is counted (``graders/<name>/sample_errors``); with
``"error"`` (the default) grading stops with ``EndpointError``, which fails the training
job, since rewards the user's service did not give would be trained on otherwise.

Header values are secrets, kept out of the job record as tools' are
(``split_grader_secrets`` / ``merge_grader_secrets``, the job's secrets key); no error
text names the URL or a header. Torch-free: the API validates these graders, the
training process calls them.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainers.contract.graders.templates import GraderError, episode_messages, tool_calls
from trainers.contract.outbound import AddressRefused, ToolPolicy, pinned_client
from trainers.contract.tools import REDACTED, check_headers

__all__ = [
    "EndpointError",
    "EndpointGrader",
    "EndpointStats",
    "calls_out",
    "configure",
    "merge_grader_secrets",
    "post",
    "score_endpoint",
    "split_grader_secrets",
]


class EndpointGrader(BaseModel):
    """The score the user's HTTP service gives each sample (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The grader's name (shown in logs and metrics).")
    type: Literal["endpoint"]
    url: str = Field(min_length=1, max_length=2048, description="http(s) URL posttrain POSTs to.")
    headers: dict[str, str] | None = Field(
        None, description="Sent with every call (e.g. authorization); values are kept secret."
    )
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="Per try, reply included.")
    retries: int = Field(1, ge=0, le=5, description="Extra tries after a timeout or a 5xx.")
    max_concurrency: int = Field(8, ge=1, le=64, description="Calls of this grader at once.")
    on_error: Literal["error", "zero"] = Field(
        "error",
        description="A sample the endpoint could not score: 'error' fails the job; 'zero' "
        "scores it 0 and counts it in graders/<name>/sample_errors.",
    )

    _headers = field_validator("headers")(classmethod(lambda cls, v: check_headers(v)))

    def templates(self) -> list[str]:
        return []  # the whole item and sample are sent; nothing is rendered


class EndpointError(GraderError):
    """The endpoint could not score a sample; ``soft`` when the grader's ``on_error`` is
    'zero'."""

    flag = "other_error"

    def __init__(self, message: str, soft: bool = False):
        super().__init__(message)
        self.soft = soft


@dataclass
class EndpointStats:
    """Calls, failed calls (each try) and seconds since the last ``take``, per grader."""

    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float, failed: bool) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.errors[name] = self.errors.get(name, 0) + int(failed)
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self, name: str) -> tuple[int, int, float]:
        """(calls, errors, seconds) of ``name`` since the last take, and zero them."""
        with self.lock:
            return (
                self.calls.pop(name, 0),
                self.errors.pop(name, 0),
                self.seconds.pop(name, 0.0),
            )


@dataclass
class _Runtime:
    policy: ToolPolicy = field(default_factory=ToolPolicy)
    stats: EndpointStats = field(default_factory=EndpointStats)
    client: httpx.Client | None = None


_RUNTIME = _Runtime()


def configure(policy: ToolPolicy | None = None) -> EndpointStats:
    """Use the server's outbound policy (the run plan's) for this process's endpoint
    graders (None: keep the one in use; until one is given, only public addresses may be
    called). Returns the process's call counts."""
    if policy is not None:
        _RUNTIME.policy = policy
    return _RUNTIME.stats


def _check(url: str) -> list[str]:
    """The policy in use now (``configure`` may replace it) checks each request."""
    return _RUNTIME.policy.check(url)


def _client() -> httpx.Client:
    if _RUNTIME.client is None:
        _RUNTIME.client = pinned_client(_check)
    return _RUNTIME.client


def sample_view(sample: str) -> dict[str, Any]:
    """What a grader that sees the whole sample gets of it (this one, ``python``)."""
    try:
        parsed = json.loads(sample)
    except (ValueError, RecursionError):
        parsed = None
    messages = episode_messages(sample)
    return {
        "output_text": str(sample),
        "output_json": parsed,
        "messages": messages,
        "tool_calls": tool_calls(messages),
    }


def request_body(item: Any, sample: str) -> bytes:
    """What the endpoint is sent for one sample (module docstring)."""
    view = sample_view(sample)
    return json.dumps({"item": item, "sample": view}, ensure_ascii=False).encode()


def read_score(data: bytes) -> float:
    """The ``score`` of a reply; ``ValueError`` saying what is wrong with it."""
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        raise ValueError("the endpoint's reply is not JSON") from None
    score = reply.get("score") if isinstance(reply, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError('the endpoint\'s reply has no number under "score"')
    try:
        value = float(score)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"the endpoint's score is {str(score)[:32]}; a score must be finite")
    return value


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
    cap: int,
    who: str,
    client: httpx.Client | None = None,
) -> tuple[bytes | None, str, bool]:
    """One POST of ``body``: (the body of a 2xx reply or None, the error naming ``who``
    and never the URL, whether a retry may help). Redirects are not followed; at most
    ``cap`` bytes are read; ``timeout`` bounds the try, reply included. ``client``: this
    module's pinned client (a user's URL, under the outbound policy) unless the caller
    gives its own (the operator's judge endpoints)."""
    headers = {
        "content-type": "application/json",
        "user-agent": "posttrain-graders",
        "accept-encoding": "identity",  # the cap counts the bytes read
        **headers,
    }
    deadline = time.monotonic() + timeout
    try:
        client = client or _client()
        with client.stream("POST", url, content=body, headers=headers, timeout=timeout) as r:
            if r.status_code >= 500:
                return None, f"{who} answered {r.status_code}", True
            if not 200 <= r.status_code < 300:
                return None, f"{who} answered {r.status_code}", False
            data = bytearray()
            for chunk in r.iter_raw():
                data += chunk
                if len(data) > cap:
                    return None, f"{who}'s reply is longer than {cap} bytes", False
                if time.monotonic() > deadline:
                    return None, f"{who} took longer than {timeout:g} s", True
    except httpx.TimeoutException:
        return None, f"{who} took longer than {timeout:g} s", True
    except httpx.HTTPError as exc:
        return None, f"{who} could not be reached ({type(exc).__name__})", True
    return bytes(data), "", False


def _try(g: EndpointGrader, body: bytes, cap: int) -> tuple[float | None, str, bool]:
    """(the score or None, the error, whether a retry may help)."""
    data, error, retry = post(g.url, body, g.headers or {}, g.timeout_seconds, cap, "the endpoint")
    if data is None:
        return None, error, retry
    try:
        return read_score(data), "", False
    except ValueError as exc:
        return None, str(exc), False


def call(g: EndpointGrader, item: Any, sample: str) -> float | str:
    """The endpoint's score of one sample, or the error text (after the retries)."""
    body = request_body(item, sample)
    policy, error = _RUNTIME.policy, "no try was made"
    for _ in range(g.retries + 1):
        start = time.monotonic()
        try:
            score, error, retry = _try(g, body, policy.max_reply_bytes)
        except AddressRefused as exc:  # the client's check refused the URL: nothing sent
            return f"the endpoint is not allowed: {exc}"
        _RUNTIME.stats.add(g.name, time.monotonic() - start, failed=score is None)
        if score is not None:
            return score
        if not retry:
            break
    return error


def score_endpoint(
    g: EndpointGrader, items: list[Any], samples: list[str], notes: list[GraderError]
) -> list[float]:
    """The scoring function of ``endpoint`` graders (``scoring.SCORERS``)."""
    if not samples:
        return []
    workers = min(g.max_concurrency, len(samples))
    with ThreadPoolExecutor(workers, thread_name_prefix="endpoint-grader") as pool:
        results = list(pool.map(lambda pair: call(g, *pair), zip(items, samples, strict=True)))
    failed = [r for r in results if isinstance(r, str)]
    if failed and g.on_error == "error":
        raise EndpointError(
            f"endpoint grader '{g.name}' could not score {len(failed)} of {len(results)} "
            f"samples ({failed[0]}); set on_error 'zero' to score such samples 0 instead"
        )
    notes.extend(EndpointError(f"endpoint grader '{g.name}': {r}", soft=True) for r in failed)
    return [0.0 if isinstance(r, str) else r for r in results]


def _walk_endpoints(graders: list[Any]):
    """(position, grader) of each endpoint grader: '<i>' or '<i>.<key>' in a multi."""
    for i, g in enumerate(graders):
        subs = getattr(g, "graders", None)
        pairs = [(f"{i}.{k}", s) for k, s in subs.items()] if isinstance(subs, dict) else []
        for pos, sub in [(str(i), g), *pairs]:
            if isinstance(sub, EndpointGrader):
                yield pos, sub


def endpoint_names(grader: Any) -> list[str]:
    """The names of the endpoint graders in ``grader`` (itself, or a multi's subs)."""
    return [g.name for _, g in _walk_endpoints([grader])]


def calls_out(grader: Any) -> bool:
    """True if the grader (or a sub-grader) calls the user's endpoint."""
    return any(True for _ in _walk_endpoints([grader]))


def _replace(graders: list[Any], new: dict[str, EndpointGrader]) -> list[Any]:
    out = []
    for i, g in enumerate(graders):
        if str(i) in new:
            g = new[str(i)]
        elif isinstance(getattr(g, "graders", None), dict):
            subs = {k: new.get(f"{i}.{k}", s) for k, s in g.graders.items()}
            g = g.model_copy(update={"graders": subs})
        out.append(g)
    return out


def split_grader_secrets(graders: list[Any]) -> tuple[list[Any], dict[str, dict[str, str]]]:
    """(the graders with every endpoint header value replaced by ``[redacted]``, the
    values by grader position): what the API stores, and what it keeps apart."""
    secrets, new = {}, {}
    for pos, g in _walk_endpoints(graders):
        if g.headers:
            secrets[pos] = dict(g.headers)
            new[pos] = g.model_copy(update={"headers": dict.fromkeys(g.headers, REDACTED)})
    return _replace(graders, new), secrets


def merge_grader_secrets(graders: list[Any], secrets: dict[str, dict[str, str]]) -> list[Any]:
    """The stored (redacted) graders with their header values back; a value the secrets
    do not hold is not sent."""
    new = {}
    for pos, g in _walk_endpoints(graders):
        given = secrets.get(pos, {})
        real = {k: given[k] for k in g.headers or {} if k in given}
        new[pos] = g.model_copy(update={"headers": real or None})
    return _replace(graders, new)


def endpoint_urls(graders: list[Any], base: list[str]) -> list[tuple[str, str]]:
    """(url, its request path) of each endpoint grader; ``base[i]`` is grader i's path."""
    out = []
    for pos, g in _walk_endpoints(graders):
        i, _, key = pos.partition(".")
        out.append((g.url, base[int(i)] + (f".graders.{key}" if key else "") + ".url"))
    return out
