"""From a validated JSONL file to the records a method's trainer takes.

The runner reads a job's files here (``read_rows``: parsed again in the training
process, as the first of the method's formats every row fits) and hands the rows to
the method's ``records`` mapping (``trainers/algorithms/<name>/method.py``); the
helpers below are the pieces those mappings share: message lists in the shape TRL's
chat templates take, a preference row's (prompt, chosen, rejected), prompt records
with every extra field kept, and one column type per dataset column.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainers.contract.errors import JobError
from trainers.contract.formats import DatasetError, read_as
from trainers.contract.rows import (
    ChatMessage,
    ChatPromptRow,
    ImplicitPreferenceRow,
    OpenAIPreferenceRow,
    RowFormat,
)

# Roles TRL chat templates know; OpenAI's "developer" is a system turn.
_ROLE = {"developer": "system"}


def messages(msgs: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": _ROLE.get(m.role, m.role), "content": m.text()} for m in msgs]


def text_or_messages(value: Any) -> Any:
    return value if isinstance(value, str) else messages(value)


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """A plain string as one turn of ``role``; a message list as TRL's messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else messages(value)


def preference_triple(row: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of any preference row shape.

    OpenAI rows map ``input.messages`` / ``preferred_output`` / ``non_preferred_output``;
    implicit-prompt rows are split after their shared prefix (``prompt_length()``).
    """
    if isinstance(row, OpenAIPreferenceRow):
        return row.input.messages, row.preferred_output, row.non_preferred_output
    if isinstance(row, ImplicitPreferenceRow):
        n = row.prompt_length()
        return row.chosen[:n], row.chosen[n:], row.rejected[n:]
    return row.prompt, row.chosen, row.rejected


def all_text(records: Iterable[dict[str, Any]], keys: Iterable[str]) -> bool:
    """Whether every record holds plain strings under ``keys`` (a dataset column has one
    type: a file mixing strings and message lists becomes all messages)."""
    keys = tuple(keys)
    return all(isinstance(r[k], str) for r in records for k in keys)


def _prompt_record(row: Any) -> dict[str, Any]:
    extra = dict(row.model_extra or {})
    if isinstance(row, ChatPromptRow):
        prompt = messages(row.messages)  # OpenAI's "developer" turn is a system turn
    else:
        prompt = text_or_messages(row.prompt)
    return {"prompt": prompt, **extra}


def prompt_records(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Prompt rows with every extra field kept (graders and judges read them as ``item``).

    One column type each: a file mixing text and chat prompts becomes chat (a text prompt
    is one user turn), and a field only some rows carry is None on the rest."""
    records = [_prompt_record(r) for r in rows]
    if not all_text(records, ["prompt"]):
        for r in records:
            if isinstance(r["prompt"], str):
                r["prompt"] = [{"role": "user", "content": r["prompt"]}]
    keys = list(dict.fromkeys(k for r in records for k in r))
    return [{k: r.get(k) for k in keys} for r in records]


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
