"""The report messages a training process sends its supervisor: one typed schema, both ends.

The trainer (``trainers.reporting.Reporter``) builds these models and writes each
as one JSON line; the worker (``workers.ingest.ReportIngest``) parses every
line back with ``parse_report``. A line that is not one of these messages raises
``InvalidReport``, and the supervisor fails the job with that reason instead of
crashing or storing something the API cannot serve; an invalid ``samples`` line is the
one exception (``workers.ingest`` skips it: samples are for reading, not for running).
Torch-free.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from trainers.contract.jsonnum import finite_or_none

Scalar = float | int | str | bool | None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(values: Any) -> Any:
    """Tensors to numbers, non-finite floats to None (JSON has no NaN)."""
    if not isinstance(values, dict):
        return values
    return {k: finite_or_none(v) for k, v in values.items()}


Metrics = Annotated[dict[str, float | None], BeforeValidator(_finite)]

# An absolute path in a message (not the path part of a URL, not a fraction like 1/2).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~…])(?:/[^\s'\"`:,;()\[\]{}<>]+)+")


def redact_paths(text: Any) -> Any:
    """``text`` with every absolute path cut to its last part (``…/model.safetensors``):
    what users read names their inputs, never where the server keeps things (the full
    text stays in the training log)."""
    if not isinstance(text, str):
        return text
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


UserText = Annotated[str, BeforeValidator(redact_paths)]


class Event(_Message):
    """A human-readable line for the job's event list."""

    type: Literal["event"] = "event"
    level: Literal["info", "warn", "error"] = "info"
    message: UserText = Field(max_length=4000)
    data: Annotated[dict[str, Scalar] | None, BeforeValidator(_finite)] = None


class Log(_Message):
    """Metrics of one optimizer step."""

    type: Literal["log"] = "log"
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    metrics: Metrics
    trained_tokens: int | None = Field(None, ge=0, description="Tokens trained on so far.")


class Checkpoint(_Message):
    """A checkpoint whose save has finished (``path`` relative to the data dir)."""

    type: Literal["checkpoint"] = "checkpoint"
    step: int = Field(ge=0)
    path: str = Field(min_length=1)
    metrics: Metrics = {}
    final: bool = False


class Result(_Message):
    """The run finished: the final checkpoint and the counters of the whole job."""

    type: Literal["result"] = "result"
    step: int = Field(ge=0)
    trained_tokens: int = Field(ge=0)
    checkpoint: str = Field(min_length=1)


class Paused(_Message):
    """The run stopped on a pause request after saving a resumable checkpoint."""

    type: Literal["paused"] = "paused"
    step: int = Field(ge=0)
    trained_tokens: int = Field(0, ge=0)
    checkpoint: str = Field(min_length=1)


class Error(_Message):
    """The run failed; ``code`` and ``message`` go to the job's ``error``."""

    type: Literal["error"] = "error"
    code: str = Field(min_length=1, max_length=64)
    message: UserText = Field(max_length=4000)
    param: str | None = None


# Bounds of a samples report (README, "Samples of RL jobs"): rows per report, characters
# per text. A longer text keeps its start and its end, cut in the middle with a marker.
MAX_SAMPLE_ROWS = 16
MAX_PROMPT_CHARS = 2000
MAX_COMPLETION_CHARS = 4000
MAX_GRADER_NAME_CHARS = 128
MAX_GRADERS = 16
MAX_SAMPLE_TOOL_CALLS = 16
MAX_TOOL_TEXT_CHARS = 1000
_MARK_ROOM = 40  # the marker's length, with room for the count


def cut_middle(text: Any, limit: int) -> Any:
    """``text`` at most ``limit`` characters: its start and end around a marker saying how
    many characters were cut (idempotent: a cut text is within ``limit``)."""
    if not isinstance(text, str) or len(text) <= limit:
        return text
    keep = max(0, limit - _MARK_ROOM)
    head = keep // 2
    tail = keep - head
    mark = f" …[{len(text) - keep} characters cut]… "
    return text[:head] + mark + (text[len(text) - tail :] if tail else "")


def _cut(limit: int):
    return BeforeValidator(lambda v: cut_middle(v, limit))


def _grader_rewards(values: Any) -> Any:
    """Grader names cut to a bound, rewards to numbers or None (NaN: the grader gave none)."""
    if not isinstance(values, dict):
        return values
    return {cut_middle(str(k), MAX_GRADER_NAME_CHARS): finite_or_none(v) for k, v in values.items()}


def _arguments(value: Any) -> Any:
    """A call's arguments as stored: the object, or its JSON text cut to a bound when long."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) <= MAX_TOOL_TEXT_CHARS:
        return value
    return cut_middle(text, MAX_TOOL_TEXT_CHARS)


class SampleToolCall(_Message):
    """One tool call of a sampled episode and the text the model read back."""

    name: Annotated[str | None, _cut(128)] = None
    arguments: Annotated[Any, BeforeValidator(_arguments)] = None
    result: Annotated[str | None, _cut(MAX_TOOL_TEXT_CHARS)] = Field(
        None, description="The tool message that answered it (``error: ...`` when it failed)."
    )


def _first_calls(values: Any) -> Any:
    return values[:MAX_SAMPLE_TOOL_CALLS] if isinstance(values, list) else values


class SampleRow(_Message):
    """One completion of a rollout: what the model saw, what it wrote, how it was scored."""

    prompt: Annotated[str, _cut(MAX_PROMPT_CHARS)] = Field(
        description="The prompt's tokens as the model saw them (chat template included), decoded."
    )
    completion: Annotated[str, _cut(MAX_COMPLETION_CHARS)] = Field(
        description="The completion's text as the graders read it."
    )
    reward: Annotated[float | None, BeforeValidator(finite_or_none)] = Field(
        None, description="The total: the graders' rewards weighted and summed."
    )
    rewards: Annotated[dict[str, float | None], BeforeValidator(_grader_rewards)] = Field(
        default_factory=dict, max_length=MAX_GRADERS, description="Each grader's, by its name."
    )
    advantage: Annotated[float | None, BeforeValidator(finite_or_none)] = Field(
        None, description="The advantage the loss used for this completion."
    )
    group: int | None = Field(
        None, ge=0, description="The prompt's group in the rollout batch (siblings share it)."
    )
    completion_tokens: int | None = Field(None, ge=0)
    truncated: bool | None = Field(
        None, description="Cut at the length limit (no end-of-sequence token)."
    )
    tool_calls: Annotated[list[SampleToolCall] | None, BeforeValidator(_first_calls)] = Field(
        None,
        description="The episode's tool calls in order, each with its result (a job with "
        "tools; the first 16).",
    )


class Samples(_Message):
    """A bounded sample of one rollout batch's completions, at the step it trains."""

    type: Literal["samples"] = "samples"
    step: int = Field(ge=0)
    rows: list[SampleRow] = Field(min_length=1, max_length=MAX_SAMPLE_ROWS)


ReportMessage = Annotated[
    Union[Event, Log, Checkpoint, Result, Paused, Error, Samples],  # noqa: UP007
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[ReportMessage] = TypeAdapter(ReportMessage)


class InvalidReport(ValueError):
    """A report line that is not a valid message; ``str()`` says what is wrong."""


def parse_report(line: str) -> ReportMessage:
    try:
        return _ADAPTER.validate_json(line)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "line"
        raise InvalidReport(f"{where}: {err['msg']} (line starts {line[:120]!r})") from None


def encode(msg: _Message) -> bytes:
    return (msg.model_dump_json() + "\n").encode()
