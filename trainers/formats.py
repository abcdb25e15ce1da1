"""Dataset row formats: what a JSONL training file may contain, checked line by line.

This module is shared by the API (which validates uploads before anything is
stored) and the training process (which turns validated rows into the shapes
TRL expects). It imports pydantic only, never torch.

A row may fit several formats (``{"prompt", "completion", "label"}`` is both an
unpaired preference and a prompt/completion pair; a GRPO prompt row may carry
grader fields such as ``answer`` or ``label``). A file's formats are those every
row fits. Each method lists the formats it accepts (``trainers.spec``), so which
reading applies is decided by the method at job creation, not by the upload.

| format               | row fields                                              | used by      |
|----------------------|---------------------------------------------------------|--------------|
| chat                 | messages (with at least one assistant turn)             | SFT          |
| prompt_completion    | prompt, completion                                      | SFT          |
| preference           | prompt, chosen, rejected; chosen, rejected (implicit    | DPO, BCO     |
|                      | prompt); or OpenAI's input, preferred_output,           |              |
|                      | non_preferred_output                                    |              |
| unpaired_preference  | prompt, completion, label (bool); or OpenAI-style       | BCO          |
|                      | input, output, label                                    |              |
| prompt_only          | messages not ending in an assistant turn, or prompt     | GRPO, EGPO   |
| scored               | prompt, response, reward; or messages ending in the     | OREO         |
|                      | scored assistant turn, reward                           |              |
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)


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


class OpenAIInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[ChatMessage]

    _check = field_validator("messages")(lambda cls, v: _non_empty(v))


_ANSWER_FIELDS = frozenset({"completion", "chosen", "rejected", "response"})


def _answer(messages: list[ChatMessage]) -> list[ChatMessage]:
    """A preferred/rejected answer: assistant turns only, with some text."""
    _non_empty(messages)
    for i, m in enumerate(messages):
        if m.role != "assistant":
            raise ValueError(
                f"message {i} has role '{m.role}'; an answer holds assistant turns only"
            )
    if not any(m.text().strip() for m in messages):
        raise ValueError("the answer is empty")
    return messages


def _text_answer(value: str | list[ChatMessage]) -> str | list[ChatMessage]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("the answer is empty")
        return value
    return _answer(value)


class OpenAIPreferenceRow(_Row):
    """OpenAI's DPO row: ``input.messages`` plus one preferred and one non-preferred answer."""

    input: OpenAIInput
    preferred_output: list[ChatMessage]
    non_preferred_output: list[ChatMessage]

    _answers = field_validator("preferred_output", "non_preferred_output")(
        lambda cls, v: _answer(v)
    )


class PreferenceRow(_Row):
    """TRL's explicit-prompt preference row (strings or message lists)."""

    prompt: str | list[ChatMessage]
    chosen: str | list[ChatMessage]
    rejected: str | list[ChatMessage]

    _answers = field_validator("chosen", "rejected")(lambda cls, v: _text_answer(v))


class ImplicitPreferenceRow(_Row):
    """TRL's implicit-prompt row: two full conversations sharing a prompt prefix.

    The prompt is the longest common prefix of the two message lists; what follows
    it on each side must be assistant turns with some text.
    """

    chosen: list[ChatMessage]
    rejected: list[ChatMessage]

    @model_validator(mode="after")
    def _split(self) -> ImplicitPreferenceRow:
        n = self.prompt_length()
        if n == 0:
            raise ValueError("'chosen' and 'rejected' share no prompt turns; add a 'prompt' field")
        for name in ("chosen", "rejected"):
            try:
                _answer(getattr(self, name)[n:])
            except ValueError as exc:
                raise ValueError(f"'{name}' after the shared prompt: {exc}") from None
        return self

    def prompt_length(self) -> int:
        n = 0
        for a, b in zip(self.chosen, self.rejected, strict=False):
            if a.role != b.role or a.text() != b.text():
                break
            n += 1
        # The shared part must end before the first answer turn of either side.
        while n and self.chosen[n - 1].role == "assistant":
            n -= 1
        return n


class UnpairedPreferenceRow(_Row):
    """TRL's unpaired (KTO/BCO) row; ``label`` must be a JSON boolean (True = thumbs-up)."""

    prompt: str | list[ChatMessage]
    completion: str | list[ChatMessage]
    label: StrictBool

    _answer = field_validator("completion")(lambda cls, v: _text_answer(v))


class OpenAIUnpairedRow(_Row):
    """The OpenAI-style unpaired row: ``input.messages``, one assistant ``output``, ``label``."""

    input: OpenAIInput
    output: list[ChatMessage]
    label: StrictBool

    _answer = field_validator("output")(lambda cls, v: _answer(v))


class PromptOnlyRow(_Row):
    """A prompt to sample answers for; extra fields (``answer``, ``label``...) feed graders."""

    prompt: str | list[ChatMessage]

    @model_validator(mode="after")
    def _no_answer(self) -> PromptOnlyRow:
        answers = sorted(_ANSWER_FIELDS.intersection(self.model_extra or {}))
        if answers:
            raise ValueError(f"a prompt-only row has no answer field, found {answers}")
        if isinstance(self.prompt, list) and self.prompt and self.prompt[-1].role == "assistant":
            raise ValueError("a prompt must not end with an assistant turn")
        return self


class ChatPromptRow(_Row):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _prompt(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        _non_empty(v)
        if v[-1].role == "assistant":
            raise ValueError("a prompt must not end with an assistant turn")
        return v


class ScoredRow(_Row):
    """OREO's trajectory: a prompt, one response, and its number reward."""

    prompt: str | list[ChatMessage]
    response: str
    reward: StrictFloat | StrictInt


class ScoredChatRow(_Row):
    """The OpenAI-style trajectory: ``messages`` ending in the scored assistant turn, ``reward``."""

    messages: list[ChatMessage]
    reward: StrictFloat | StrictInt

    @field_validator("messages")
    @classmethod
    def _ends_with_answer(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if len(v) < 2 or v[-1].role != "assistant":
            raise ValueError("must hold the prompt turns and end with the assistant's response")
        return v


# Every row shape, most specific first. A row fits a shape when the shape's required
# fields are present and it validates; a file's formats are those every row fits.
SHAPES: tuple[tuple[RowFormat, type[_Row]], ...] = (
    (RowFormat.chat, ChatRow),
    (RowFormat.preference, OpenAIPreferenceRow),
    (RowFormat.preference, PreferenceRow),
    (RowFormat.preference, ImplicitPreferenceRow),
    (RowFormat.unpaired_preference, OpenAIUnpairedRow),
    (RowFormat.unpaired_preference, UnpairedPreferenceRow),
    (RowFormat.scored, ScoredRow),
    (RowFormat.scored, ScoredChatRow),
    (RowFormat.prompt_completion, PromptCompletionRow),
    (RowFormat.prompt_only, ChatPromptRow),
    (RowFormat.prompt_only, PromptOnlyRow),
)
FORMAT_ORDER: tuple[RowFormat, ...] = tuple(dict.fromkeys(f for f, _ in SHAPES))


def _required(model: type[_Row]) -> frozenset[str]:
    return frozenset(n for n, f in model.model_fields.items() if f.is_required())


def _classify(row: dict[str, Any]) -> tuple[RowFormat, type[_Row]]:
    """The shape a row was most likely meant to have (the one its errors are reported for)."""
    keys = row.keys()
    if "messages" in keys and "reward" in keys:
        return RowFormat.scored, ScoredChatRow
    if "messages" in keys:
        msgs = row["messages"]
        has_assistant = isinstance(msgs, list) and any(
            isinstance(m, dict) and m.get("role") == "assistant" for m in msgs
        )
        return (
            (RowFormat.chat, ChatRow) if has_assistant else (RowFormat.prompt_only, ChatPromptRow)
        )
    if "input" in keys and ("output" in keys or "label" in keys):
        return RowFormat.unpaired_preference, OpenAIUnpairedRow
    if "input" in keys or "preferred_output" in keys or "non_preferred_output" in keys:
        return RowFormat.preference, OpenAIPreferenceRow
    if "chosen" in keys or "rejected" in keys:
        if "prompt" in keys:
            return RowFormat.preference, PreferenceRow
        return RowFormat.preference, ImplicitPreferenceRow
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
        "prompt+chosen+rejected | chosen+rejected | input+preferred_output+"
        "non_preferred_output | prompt+completion+label | prompt+response+reward | prompt",
    )


class DatasetError(ValueError):
    """A JSONL row that cannot be used. ``line`` is 1-based; ``param`` names the field."""

    def __init__(self, line: int, param: str | None, message: str):
        self.line, self.param, self.reason = line, param, message
        where = f"line {line}" + (f", field '{param}'" if param else "")
        super().__init__(f"{where}: {message}")


@dataclass
class FileSummary:
    """What an upload holds. ``formats``: every format all rows fit, most specific first;
    ``format`` is the first of them (the one shown to users)."""

    formats: list[RowFormat]
    rows: int
    extra_fields: set[str] = field(default_factory=set)

    @property
    def format(self) -> RowFormat:
        return self.formats[0]


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


def _load(line_no: int, text: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise DatasetError(line_no, None, msg) from None
    if not isinstance(raw, dict):
        raise DatasetError(
            line_no, None, f"each line must be a JSON object, got {type(raw).__name__}"
        )
    return raw


def _validate(line_no: int, model: type[_Row], raw: dict[str, Any]) -> _Row:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _loc_to_param(err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        raise DatasetError(line_no, param or None, reason) from None


def parse_row(
    line_no: int, text: str, formats: Iterable[RowFormat] | None = None
) -> dict[RowFormat, _Row]:
    """Every format (of ``formats``, default all) one JSONL line fits, with its parsed row.

    Raises DatasetError naming the line and field when the line fits none of them; the
    error is the one of the shape the row was most likely meant to have.
    """
    raw = _load(line_no, text)
    wanted = FORMAT_ORDER if formats is None else tuple(formats)
    fits: dict[RowFormat, _Row] = {}
    for fmt, model in SHAPES:
        if fmt in wanted and fmt not in fits and _required(model) <= raw.keys():
            try:
                fits[fmt] = model.model_validate(raw)
            except ValidationError:
                continue
    if fits:
        return fits
    try:
        fmt, model = _classify(raw)
    except DatasetError as exc:
        raise DatasetError(line_no, None, exc.reason) from None
    if fmt not in wanted:  # meant as another format: name the ones wanted instead
        fmt, model = next((f, m) for f, m in SHAPES if f in wanted)
    _validate(line_no, model, raw)
    raise DatasetError(line_no, None, f"row does not fit the '{fmt}' format")  # pragma: no cover


def _decode(line_no: int, line: str | bytes) -> str:
    if isinstance(line, bytes):
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError(line_no, None, "not valid UTF-8") from None
    return line


def iter_rows(
    lines: Iterable[str | bytes], formats: Iterable[RowFormat] | None = None
) -> Iterator[tuple[int, dict[RowFormat, _Row]]]:
    """Yield (line_no, {format: row}) for every non-blank line, keeping only the formats
    every line so far fits; a line that narrows them to none is an error."""
    common: list[RowFormat] | None = None
    first_line = 0
    for line_no, line in enumerate(lines, start=1):
        text = _decode(line_no, line)
        if not text.strip():
            continue
        fits = parse_row(line_no, text, formats)
        if common is None:
            common, first_line = [f for f in FORMAT_ORDER if f in fits], line_no
        else:
            narrowed = [f for f in common if f in fits]
            if not narrowed:
                raise DatasetError(
                    line_no,
                    None,
                    f"row is in '{next(iter(fits))}' format but line {first_line} set the "
                    f"file's format to '{common[0]}'; a file must use one format throughout",
                )
            common = narrowed
        yield line_no, {f: fits[f] for f in common}


def summarize(lines: Iterable[str | bytes]) -> FileSummary:
    """Validate a whole JSONL file; return the formats it fits and its row count."""
    summary: FileSummary | None = None
    for _, fits in iter_rows(lines):
        if summary is None:
            summary = FileSummary(formats=list(fits), rows=0)
        summary.formats = [f for f in summary.formats if f in fits]
        summary.rows += 1
        summary.extra_fields.update((next(iter(fits.values())).model_extra or {}).keys())
    if summary is None:
        raise DatasetError(1, None, "file contains no rows")
    return summary


def read_as(
    lines: Iterable[str | bytes], accepted: Iterable[RowFormat]
) -> tuple[RowFormat, list[_Row]]:
    """Parse a file as the first of ``accepted`` (in the method's order of preference) that
    every row fits. Raises DatasetError naming the first line that fits none of them."""
    accepted = tuple(accepted)
    rows: list[dict[RowFormat, _Row]] = [fits for _, fits in iter_rows(lines, accepted)]
    if not rows:
        raise DatasetError(1, None, "file contains no rows")
    fmt = next(f for f in accepted if f in rows[-1])
    return fmt, [fits[fmt] for fits in rows]
