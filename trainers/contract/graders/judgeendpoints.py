"""Judges in training jobs: ``score_model`` and ``label_model`` asked through an
OpenAI-compatible chat completions endpoint the server names.

The operator lists the endpoints in ``POSTTRAIN_JUDGE_ENDPOINTS`` (``parse_endpoints``), a
JSON object ``{name: endpoint}``; each endpoint has a ``base_url`` (``.../v1``), the
``models`` it serves and optionally ``api_key_env``, the name of an environment variable
on the workers holding its key (sent as ``Authorization: Bearer <key>``; the key itself
is never in the setting, a record, an event or an error). posttrain's own inference is
one such endpoint: the API's ``/v1`` with a key of a tenant that may use the models.

A grader whose ``model`` one endpoint serves is a *remote judge*: the API accepts it in
grpo and reinforcement jobs (``validate.check_grader_models``), in a multi grader too,
and the training process scores it here. For each sample the rendered ``input``
(``judging.judge_messages``) is POSTed to ``{base_url}/chat/completions`` with the
grader's ``model`` and ``judging.judge_params`` (temperature 0 unless the grader's
``sampling_params`` say otherwise); ``choices[0].message.content`` is read as
``judging.parse_score`` (clamped to ``range``, default [0, 1]) or, for a label_model,
``judging.parse_label`` (1 if the label is one of ``passing_labels``, else 0).

How a call goes (``remote.post``, the endpoint grader's HTTP path): redirects are not
followed; a timeout, a refused connection or a 5xx is retried ``retries`` times, any
other status is not; at most ``MAX_REPLY_BYTES`` are read; at most ``max_concurrency``
calls of one grader run at once. The operator's own endpoints are not held to the
outbound policy for users' URLs (they may be on loopback or a private network).

An answer that is no number (no label) is ``model_grader_parse_error``, soft as in evals:
the sample scores 0 and is counted. A sample the endpoint could not answer (after its
retries) follows the endpoint's ``on_error``: 'error' (the default) fails the job with
``JudgeEndpointError``, 'zero' scores it 0 and counts it. Per grader the training process
logs the calls (each try), the failed ones, their mean latency and the parse errors
(``judge_metrics``). Torch-free: the API validates with this, the training process calls.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from trainers.contract.graders.judging import (
    JudgeParseError,
    judge_params,
    label_score,
    parse_label,
    parse_score,
)
from trainers.contract.graders.remote import EndpointStats, post
from trainers.contract.graders.spec import LabelModelGrader, ScoreModelGrader
from trainers.contract.graders.templates import GraderError
from trainers.contract.outbound import AddressRefused, check_url

__all__ = [
    "SETTING",
    "JudgeEndpoint",
    "JudgeEndpointError",
    "JudgeEndpoints",
    "ask",
    "configure_judges",
    "is_remote_judge",
    "judge_metrics",
    "parse_endpoints",
    "read_answer",
    "score_judge",
]

SETTING = "POSTTRAIN_JUDGE_ENDPOINTS"
MAX_REPLY_BYTES = 1 << 20  # a chat completion with a long answer fits
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JudgeEndpoint(BaseModel):
    """One OpenAI-compatible endpoint the server may ask as a judge (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        min_length=1,
        description="The API's base URL, e.g. http://host:8000/v1; posttrain "
        "POSTs to <base_url>/chat/completions.",
    )
    api_key_env: str | None = Field(
        None,
        description="An environment variable on the workers holding the endpoint's key "
        "(sent as a bearer token); unset: no key is sent.",
    )
    models: list[str] = Field(min_length=1, description="The model names it serves.")
    timeout_seconds: float = Field(60.0, gt=0, le=600, description="Per try, reply included.")
    retries: int = Field(1, ge=0, le=5, description="Extra tries after a timeout or a 5xx.")
    max_concurrency: int = Field(8, ge=1, le=64, description="Calls of one grader at once.")
    on_error: Literal["error", "zero"] = Field(
        "error",
        description="A sample it could not answer: 'error' fails the job; 'zero' scores 0.",
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            check_url(value, "name the key's environment variable in api_key_env")
        except AddressRefused as exc:
            raise ValueError(str(exc)) from None
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("must be the name of an environment variable (letters, digits, _)")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        if any(not m.strip() for m in value):
            raise ValueError("a model name must have text")
        return value


class JudgeEndpoints(RootModel[dict[str, JudgeEndpoint]]):
    """``{name: endpoint}``; a model is served by at most one of them."""

    @field_validator("root")
    @classmethod
    def _one_each(cls, value: dict[str, JudgeEndpoint]) -> dict[str, JudgeEndpoint]:
        seen: dict[str, str] = {}
        for name, endpoint in value.items():
            for model in endpoint.models:
                other = seen.setdefault(model, name)
                if other != name:
                    raise ValueError(
                        f"model {model!r} is listed by two endpoints ({other!r} and "
                        f"{name!r}); each model names one endpoint"
                    )
        return value

    def endpoint_for(self, model: str) -> tuple[str, JudgeEndpoint] | None:
        """(name, endpoint) serving ``model``, or None."""
        for name, endpoint in self.root.items():
            if model in endpoint.models:
                return name, endpoint
        return None

    def models(self) -> frozenset[str]:
        return frozenset(m for e in self.root.values() for m in e.models)


def parse_endpoints(text: str) -> JudgeEndpoints:
    """The setting's value (empty: none); ``ValueError`` naming the setting and the field."""
    if not text.strip():
        return JudgeEndpoints({})
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{SETTING} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{SETTING} must be a JSON object {{name: endpoint}}")
    try:
        return JudgeEndpoints.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"] if p != "root")
        message = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{SETTING}{'.' + where if where else ''}: {message}") from None


class JudgeEndpointError(GraderError):
    """A judge endpoint could not answer a sample; ``soft`` when its ``on_error`` is 'zero'."""

    flag = "other_error"

    def __init__(self, message: str, soft: bool = False):
        super().__init__(message)
        self.soft = soft


@dataclass
class _Runtime:
    endpoints: JudgeEndpoints = field(default_factory=lambda: JudgeEndpoints({}))
    stats: EndpointStats = field(default_factory=EndpointStats)
    parse_errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: httpx.Client | None = None


_RUNTIME = _Runtime()


def configure_judges(endpoints: JudgeEndpoints | None) -> None:
    """Use the server's judge endpoints (the run plan's) in this process; None keeps the
    ones in use (none until given)."""
    if endpoints is not None:
        _RUNTIME.endpoints = endpoints


def is_remote_judge(grader: Any) -> bool:
    """True if ``grader`` is a score_model or label_model this process's endpoints serve."""
    return isinstance(grader, ScoreModelGrader | LabelModelGrader) and (
        _RUNTIME.endpoints.endpoint_for(grader.model) is not None
    )


def judge_metrics(name: str) -> dict[str, float]:
    """The grader's judge calls since the last take (each try), the failed ones, their
    mean latency and the parse errors; zeroes them."""
    calls, errors, seconds = _RUNTIME.stats.take(name)
    with _RUNTIME.lock:
        parse = _RUNTIME.parse_errors.pop(name, 0)
    return {
        "judge_calls": float(calls),
        "judge_errors": float(errors),
        "judge_latency_s": seconds / calls if calls else 0.0,
        "judge_parse_errors": float(parse),
    }


def _headers(name: str, endpoint: JudgeEndpoint) -> dict[str, str]:
    if endpoint.api_key_env is None:
        return {}
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise JudgeEndpointError(
            f"judge endpoint '{name}' names api_key_env {endpoint.api_key_env}, which is not "
            "set on this worker"
        )
    return {"authorization": f"Bearer {key}"}


def read_answer(data: bytes) -> str:
    """``choices[0].message.content`` of a chat completion; ``ValueError`` saying what is
    wrong with the reply."""
    try:
        reply = json.loads(data)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        raise ValueError(
            "the judge endpoint's reply is no chat completion with choices[0].message.content"
        ) from None
    if not isinstance(content, str):
        raise ValueError("the judge endpoint's answer (choices[0].message.content) is no text")
    return content


def _judge_client() -> httpx.Client:
    """One client for the operator's judge endpoints: they are the server's own (often
    posttrain's API on loopback), so the users' outbound policy and its pinning do not
    apply; redirects are not followed and proxy variables are ignored, as for users' URLs."""
    if _RUNTIME.client is None:
        _RUNTIME.client = httpx.Client(follow_redirects=False, trust_env=False)
    return _RUNTIME.client


def ask(
    grader: ScoreModelGrader | LabelModelGrader,
    endpoint: JudgeEndpoint,
    headers: dict[str, str],
    messages: list[dict[str, str]],
) -> tuple[str | None, str]:
    """(the judge's answer or None, the error after the retries)."""
    body = {"model": grader.model, "messages": messages, **judge_params(grader)}
    data = json.dumps(body, ensure_ascii=False).encode()
    url, error = endpoint.base_url + "/chat/completions", "no try was made"
    for _ in range(endpoint.retries + 1):
        start = time.monotonic()
        reply, error, retry = post(
            url,
            data,
            headers,
            endpoint.timeout_seconds,
            MAX_REPLY_BYTES,
            "the judge endpoint",
            client=_judge_client(),
        )
        answer = None
        if reply is not None:
            try:
                answer = read_answer(reply)
            except ValueError as exc:
                error, retry = str(exc), False
        _RUNTIME.stats.add(grader.name, time.monotonic() - start, failed=answer is None)
        if answer is not None:
            return answer, ""
        if not retry:
            break
    return None, error


def _score(grader: ScoreModelGrader | LabelModelGrader, answer: str) -> float:
    if isinstance(grader, LabelModelGrader):
        return label_score(grader, parse_label(answer, grader.labels))
    return parse_score(answer, grader.range)


def score_judge(
    grader: ScoreModelGrader | LabelModelGrader,
    conversations: list[list[dict[str, str]]],
    notes: list[GraderError],
) -> list[float]:
    """One score per rendered conversation, asked of the endpoint serving the grader's
    model (module docstring); soft errors go to ``notes``."""
    found = _RUNTIME.endpoints.endpoint_for(grader.model)
    if found is None:
        raise JudgeEndpointError(
            f"{grader.type} '{grader.name}': model {grader.model!r} is served by no judge "
            f"endpoint in this worker's {SETTING} (the API's and the workers' must agree)"
        )
    name, endpoint = found
    if not conversations:
        return []
    headers = _headers(name, endpoint)
    workers = min(endpoint.max_concurrency, len(conversations))
    with ThreadPoolExecutor(workers, thread_name_prefix="judge") as pool:
        results = list(pool.map(lambda c: ask(grader, endpoint, headers, c), conversations))
    failed = [error for answer, error in results if answer is None]
    if failed and endpoint.on_error == "error":
        raise JudgeEndpointError(
            f"{grader.type} grader '{grader.name}': judge endpoint '{name}' could not answer "
            f"{len(failed)} of {len(results)} samples ({failed[0]}); its on_error 'zero' in "
            f"{SETTING} would score such samples 0 instead"
        )
    scores = []
    for answer, error in results:
        if answer is None:
            notes.append(JudgeEndpointError(f"{grader.name}: {error}", soft=True))
            scores.append(0.0)
            continue
        try:
            scores.append(_score(grader, answer))
        except JudgeParseError as exc:
            notes.append(exc)
            with _RUNTIME.lock:
                _RUNTIME.parse_errors[grader.name] = _RUNTIME.parse_errors.get(grader.name, 0) + 1
            scores.append(0.0)
    return scores
