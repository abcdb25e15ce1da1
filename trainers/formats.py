"""Dataset row formats: what a JSONL training file may contain, checked line by line.

This module is shared by the API (which validates uploads before anything is
stored) and the training process (which turns validated rows into the shapes
TRL expects). It imports pydantic only, never torch.

A file has exactly one format, fixed by its first row; every later row must have
the same one. Each method accepts a set of formats (see ``trainers.spec``).

| format               | row fields                                              | used by      |
|----------------------|---------------------------------------------------------|--------------|
| chat                 | messages (with at least one assistant turn)             | SFT          |
| prompt_completion    | prompt, completion                                      | SFT          |
| preference           | prompt, chosen, rejected  or OpenAI's input,            | DPO, BCO     |
|                      | preferred_output, non_preferred_output                  |              |
| unpaired_preference  | prompt, completion, label (bool)                        | BCO          |
| prompt_only          | messages without an assistant turn, or prompt alone     | GRPO, EGPO   |
| scored               | prompt, response, reward                                | OREO         |
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RowFormat(StrEnum):
    chat = "chat"
    prompt_completion = "prompt_completion"
    preference = "preference"
    unpaired_preference = "unpaired_preference"
    prompt_only = "prompt_only"
    scored = "scored"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn. Content is a string or a list of text parts (OpenAI's shape)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    # OpenAI's per-assistant-turn weight (0 excludes the turn from the loss).
    weight: Literal[0, 1] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _non_empty(messages: list[ChatMessage]) -> list[ChatMessage]:
    if not messages:
        raise ValueError("must contain at least one message")
    return messages


class _Row(BaseModel):
    # Rows may carry extra fields (graders read them); only the named ones are checked.
    model_config = ConfigDict(extra="allow")


class ChatRow(_Row):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        _non_empty(v)
        if not any(m.role == "assistant" for m in v):
            raise ValueError("must contain at least one assistant message")
        return v


class PromptCompletionRow(_Row):
    prompt: str | list[ChatMessage]
    completion: str | list[ChatMessage]


class PreferenceRow(_Row):
    prompt: str | list[ChatMessage]
    chosen: str | list[ChatMessage]
    rejected: str | list[ChatMessage]


class OpenAIInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage]

    _check = field_validator("messages")(lambda cls, v: _non_empty(v))


class OpenAIPreferenceRow(_Row):
    input: OpenAIInput
    preferred_output: list[ChatMessage] = Field(min_length=1)
    non_preferred_output: list[ChatMessage] = Field(min_length=1)


class UnpairedPreferenceRow(_Row):
    prompt: str | list[ChatMessage]
    completion: str | list[ChatMessage]
    label: bool


class PromptOnlyRow(_Row):
    prompt: str | list[ChatMessage]


class ChatPromptRow(_Row):
    messages: list[ChatMessage]

    _check = field_validator("messages")(lambda cls, v: _non_empty(v))


class ScoredRow(_Row):
    prompt: str | list[ChatMessage]
    response: str
    reward: float


def _classify(row: dict[str, Any]) -> tuple[RowFormat, type[_Row]]:
    """Pick a row's format from the fields it has (most specific shape first)."""
    keys = row.keys()
    if "messages" in keys:
        msgs = row["messages"]
        has_assistant = isinstance(msgs, list) and any(
            isinstance(m, dict) and m.get("role") == "assistant" for m in msgs
        )
        return (
            (RowFormat.chat, ChatRow) if has_assistant else (RowFormat.prompt_only, ChatPromptRow)
        )
    if "input" in keys or "preferred_output" in keys or "non_preferred_output" in keys:
        return RowFormat.preference, OpenAIPreferenceRow
    if "chosen" in keys or "rejected" in keys:
        return RowFormat.preference, PreferenceRow
    if "label" in keys:
        return RowFormat.unpaired_preference, UnpairedPreferenceRow
    if "response" in keys or "reward" in keys:
        return RowFormat.scored, ScoredRow
    if "completion" in keys:
        return RowFormat.prompt_completion, PromptCompletionRow
    if "prompt" in keys:
        return RowFormat.prompt_only, PromptOnlyRow
    raise DatasetError(
        0,
        None,
        "row matches no known format; expected one of: messages | prompt+completion | "
        "prompt+chosen+rejected | input+preferred_output+non_preferred_output | "
        "prompt+completion+label | prompt+response+reward | prompt",
    )


class DatasetError(ValueError):
    """A JSONL row that cannot be used. ``line`` is 1-based; ``param`` names the field."""

    def __init__(self, line: int, param: str | None, message: str):
        self.line, self.param, self.reason = line, param, message
        where = f"line {line}" + (f", field '{param}'" if param else "")
        super().__init__(f"{where}: {message}")


@dataclass
class FileSummary:
    format: RowFormat
    rows: int
    extra_fields: set[str] = field(default_factory=set)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"str", "list[ChatMessage]", "list[TextPart]"} or "[" in str(part):
            continue  # union branch names add nothing for a user
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_row(line_no: int, text: str) -> tuple[RowFormat, _Row]:
    """Parse and validate one JSONL line; raise DatasetError naming the line and field."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise DatasetError(line_no, None, msg) from None
    if not isinstance(raw, dict):
        raise DatasetError(
            line_no, None, f"each line must be a JSON object, got {type(raw).__name__}"
        )
    try:
        fmt, model = _classify(raw)
    except DatasetError as exc:
        raise DatasetError(line_no, None, exc.reason) from None
    try:
        return fmt, model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _loc_to_param(err["loc"])
        raise DatasetError(line_no, param or None, err["msg"]) from None


def iter_rows(lines: Iterable[str | bytes]) -> Iterator[tuple[int, RowFormat, _Row]]:
    """Yield (line_no, format, row) for every non-blank line, enforcing one format per file."""
    file_format: RowFormat | None = None
    first_line = 0
    for line_no, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(line_no, None, "not valid UTF-8") from None
        if not line.strip():
            continue
        fmt, row = parse_row(line_no, line)
        if file_format is None:
            file_format, first_line = fmt, line_no
        elif fmt != file_format:
            raise DatasetError(
                line_no,
                None,
                f"row is in '{fmt}' format but line {first_line} set the file's format to "
                f"'{file_format}'; a file must use one format throughout",
            )
        yield line_no, fmt, row


def summarize(lines: Iterable[str | bytes]) -> FileSummary:
    """Validate a whole JSONL file; return its format and row count or raise DatasetError."""
    summary: FileSummary | None = None
    for _, fmt, row in iter_rows(lines):
        if summary is None:
            summary = FileSummary(format=fmt, rows=0)
        summary.rows += 1
        summary.extra_fields.update((row.model_extra or {}).keys())
    if summary is None:
        raise DatasetError(1, None, "file contains no rows")
    return summary
