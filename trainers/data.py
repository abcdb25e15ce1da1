"""Turning a validated JSONL file into the dataset shapes TRL's trainers expect.

SFT rows become ``messages`` or ``prompt``/``completion``; preference rows (all three
shapes in ``trainers.rows``) become TRL's ``prompt``/``chosen``/``rejected``;
BCO takes unpaired ``prompt``/``completion``/``label`` rows, paired rows split in two.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainers.formats import DatasetError, read_as
from trainers.plan import JobError
from trainers.rows import (
    ChatMessage,
    ImplicitPreferenceRow,
    OpenAIPreferenceRow,
    OpenAIUnpairedRow,
    RowFormat,
    ScoredChatRow,
    ScoredRow,
    UnpairedPreferenceRow,
)

# Roles TRL chat templates know; OpenAI's "developer" is a system turn.
_ROLE = {"developer": "system"}


def _messages(msgs: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": _ROLE.get(m.role, m.role), "content": m.text()} for m in msgs]


def _text_or_messages(value: Any) -> Any:
    return value if isinstance(value, str) else _messages(value)


def sft_record(fmt: RowFormat, row: Any) -> dict[str, Any]:
    if fmt == RowFormat.chat:
        return {"messages": _messages(row.messages)}
    return {
        "prompt": _text_or_messages(row.prompt),
        "completion": _text_or_messages(row.completion),
    }


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value)


def dpo_record(row: Any, conversational: bool | None = None) -> dict[str, Any]:
    """TRL's explicit-prompt preference example from any preference row shape.

    OpenAI rows map ``input.messages`` / ``preferred_output`` / ``non_preferred_output``
    to ``prompt`` / ``chosen`` / ``rejected``; implicit-prompt rows are split after their
    shared prefix (``prompt_length()``). ``conversational=True`` turns plain-string
    fields into one user (prompt) or assistant (answer) turn, so a file whose rows mix
    strings and message lists becomes one conversational dataset; ``None`` keeps the
    row's own types.
    """
    if isinstance(row, OpenAIPreferenceRow):
        prompt, chosen, rejected = (
            row.input.messages,
            row.preferred_output,
            row.non_preferred_output,
        )
    elif isinstance(row, ImplicitPreferenceRow):
        n = row.prompt_length()
        prompt, chosen, rejected = row.chosen[:n], row.chosen[n:], row.rejected[n:]
    else:
        prompt, chosen, rejected = row.prompt, row.chosen, row.rejected
    if conversational is None:
        conversational = not all(isinstance(v, str) for v in (prompt, chosen, rejected))
    if not conversational:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": _as_messages(prompt, "user"),
        "chosen": _as_messages(chosen, "assistant"),
        "rejected": _as_messages(rejected, "assistant"),
    }


def dpo_records(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """``dpo_record`` for a whole file: all plain text, or all conversational if any
    row holds a message list (a dataset column has one type)."""
    rows = list(rows)
    mixed = [dpo_record(r) for r in rows]
    if all(isinstance(r["prompt"], str) and isinstance(r["chosen"], str) for r in mixed):
        return mixed
    return [dpo_record(r, conversational=True) for r in rows]


def _bco_record(row: Any) -> list[dict[str, Any]]:
    """One unpaired row -> [it]; one preference row -> [thumbs-up, thumbs-down]."""
    if isinstance(row, OpenAIUnpairedRow):
        return [{"prompt": row.input.messages, "completion": row.output, "label": row.label}]
    if isinstance(row, UnpairedPreferenceRow):
        return [{"prompt": row.prompt, "completion": row.completion, "label": row.label}]
    pair = dpo_record(row, conversational=False)
    return [
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
    ]


def bco_records(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """BCO's ``prompt``/``completion``/``label`` examples from unpaired or preference rows.

    A preference row becomes a thumbs-up row (its chosen answer) followed by a
    thumbs-down row (its rejected answer), with the same prompt. As in
    ``dpo_records``, the file becomes all plain text, or all messages if any field
    of any row is a message list (a plain prompt is then a user turn, a plain
    completion an assistant turn).
    """
    out = [rec for row in rows for rec in _bco_record(row)]
    if all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in out):
        return out
    return [
        {
            "prompt": _as_messages(r["prompt"], "user"),
            "completion": _as_messages(r["completion"], "assistant"),
            "label": r["label"],
        }
        for r in out
    ]


def oreo_records(rows: Iterable[ScoredRow]) -> list[dict[str, Any]]:
    """OREO's ``prompt``/``response``/``reward`` trajectories from scored rows.

    A message prompt stays a message list (the chat template is applied at tokenisation);
    if any prompt is a message list, every plain prompt becomes a user turn.
    """
    rows = [_split_scored_chat(r) for r in rows]
    text = all(isinstance(prompt, str) for prompt, _, _ in rows)
    return [
        {
            "prompt": prompt if text else _as_messages(prompt, "user"),
            "response": response,
            "reward": float(reward),
        }
        for prompt, response, reward in rows
    ]


def _split_scored_chat(row: Any) -> tuple[Any, str, float]:
    """(prompt, response text, reward): a ``messages`` row's last turn is its response."""
    if isinstance(row, ScoredChatRow):
        return row.messages[:-1], row.messages[-1].text(), row.reward
    return row.prompt, row.response, row.reward


def read_rows(path: Path, accepted: Iterable[RowFormat], param: str) -> tuple[RowFormat, list]:
    """Parse a JSONL file again in the training process, as the first of the method's
    ``accepted`` formats that every row fits (files can change under a job)."""
    try:
        with open(path, "rb") as fh:
            return read_as(fh, accepted)
    except FileNotFoundError:
        raise JobError(
            "invalid_training_file", f"{param} is missing from the data volume", param
        ) from None
    except DatasetError as exc:
        raise JobError("invalid_training_file", f"{param}: {exc}", param) from None


def build_dataset(records: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list(records)
