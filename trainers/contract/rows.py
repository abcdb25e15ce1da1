"""The JSONL row shapes posttrain accepts, one pydantic model each (torch-free).

``SHAPES`` lists every (format, model) pair, most specific first; a row fits a
shape when the model's required fields are present and it validates.
``trainers.contract.formats`` turns files into rows with these and reports errors by line.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

FLOAT32_MAX = 3.4028234663852886e38


def _float32(value: float | int) -> float | int:
    """Trainers compute in float32 or lower: a number past its range would become inf."""
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value!r} is outside float32's range (|x| <= 3.4e38)")
    return value


# A number a row carries into training (OREO's reward), representable in float32.
RowNumber = Annotated[StrictFloat | StrictInt, AfterValidator(_float32)]


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


class Row(BaseModel):
    # Rows may carry extra fields (graders read them); only the named ones are checked.
    model_config = ConfigDict(extra="allow")


class ChatRow(Row):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        _non_empty(v)
        if not any(m.role == "assistant" for m in v):
            raise ValueError("must contain at least one assistant message")
        return v


class PromptCompletionRow(Row):
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


class OpenAIPreferenceRow(Row):
    """OpenAI's DPO row: ``input.messages`` plus one preferred and one non-preferred answer."""

    input: OpenAIInput
    preferred_output: list[ChatMessage]
    non_preferred_output: list[ChatMessage]

    _answers = field_validator("preferred_output", "non_preferred_output")(
        lambda cls, v: _answer(v)
    )


class PreferenceRow(Row):
    """TRL's explicit-prompt preference row (strings or message lists)."""

    prompt: str | list[ChatMessage]
    chosen: str | list[ChatMessage]
    rejected: str | list[ChatMessage]

    _answers = field_validator("chosen", "rejected")(lambda cls, v: _text_answer(v))


class ImplicitPreferenceRow(Row):
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


class UnpairedPreferenceRow(Row):
    """TRL's unpaired (KTO/BCO) row; ``label`` must be a JSON boolean (True = thumbs-up)."""

    prompt: str | list[ChatMessage]
    completion: str | list[ChatMessage]
    label: StrictBool

    _answer = field_validator("completion")(lambda cls, v: _text_answer(v))


class OpenAIUnpairedRow(Row):
    """The OpenAI-style unpaired row: ``input.messages``, one assistant ``output``, ``label``."""

    input: OpenAIInput
    output: list[ChatMessage]
    label: StrictBool

    _answer = field_validator("output")(lambda cls, v: _answer(v))


class PromptOnlyRow(Row):
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


class ChatPromptRow(Row):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _prompt(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        _non_empty(v)
        if v[-1].role == "assistant":
            raise ValueError("a prompt must not end with an assistant turn")
        return v


class ScoredRow(Row):
    """OREO's trajectory: a prompt, one response, and its number reward."""

    prompt: str | list[ChatMessage]
    response: str
    reward: RowNumber


class ScoredChatRow(Row):
    """The OpenAI-style trajectory: ``messages`` ending in the scored assistant turn, ``reward``."""

    messages: list[ChatMessage]
    reward: RowNumber

    @field_validator("messages")
    @classmethod
    def _ends_with_answer(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if len(v) < 2 or v[-1].role != "assistant":
            raise ValueError("must hold the prompt turns and end with the assistant's response")
        return v


# Every row shape, most specific first. A row fits a shape when the shape's required
# fields are present and it validates; a file's formats are those every row fits.
SHAPES: tuple[tuple[RowFormat, type[Row]], ...] = (
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


def required_fields(model: type[Row]) -> frozenset[str]:
    return frozenset(n for n, f in model.model_fields.items() if f.is_required())


def classify(row: dict[str, Any]) -> tuple[RowFormat, type[Row]] | None:
    """The shape a row was most likely meant to have (the one its errors are reported for),
    or None when its fields match no shape."""
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
    return None
