"""Turning a validated JSONL file into the dataset shapes TRL's trainers expect."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainers.formats import ChatMessage, DatasetError, RowFormat, iter_rows
from trainers.plan import JobError

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


def read_rows(path: Path, accepted: Iterable[RowFormat], param: str) -> tuple[RowFormat, list]:
    """Parse a JSONL file again in the training process (files can change under a job)."""
    accepted = frozenset(accepted)
    try:
        with open(path, "rb") as fh:
            rows = list(iter_rows(fh))
    except FileNotFoundError:
        raise JobError(
            "invalid_training_file", f"{param} is missing from the data volume", param
        ) from None
    except DatasetError as exc:
        raise JobError("invalid_training_file", f"{param}: {exc}", param) from None
    if not rows:
        raise JobError("invalid_training_file", f"{param} has no rows", param)
    fmt = rows[0][1]
    if fmt not in accepted:
        raise JobError(
            "invalid_training_file",
            f"{param} is in '{fmt}' format; this method accepts {sorted(str(f) for f in accepted)}",
            param,
        )
    return fmt, [(fmt, row) for _, fmt, row in rows]


def build_dataset(records: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list(records)
