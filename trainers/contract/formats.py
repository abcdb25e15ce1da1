"""Dataset row formats: what a JSONL training file may contain, checked line by line.

This module is shared by the API (which validates uploads before anything is
stored) and the training process (which turns validated rows into the shapes
TRL expects). It imports pydantic only, never torch.

A row may fit several formats (``{"prompt", "completion", "label"}`` is both an
unpaired preference and a prompt/completion pair; a GRPO prompt row may carry
grader fields such as ``answer`` or ``label``). A file's formats are those every
row fits. Each method lists the formats it accepts (``trainers.contract.spec``), so which
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
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from trainers.contract.jsonnum import NumberError, loads
from trainers.contract.rows import (
    FORMAT_ORDER,
    SHAPES,
    Row,
    RowFormat,
    classify,
    required_fields,
)

_NO_FORMAT = (
    "row matches no known format; expected one of: messages | prompt+completion | "
    "prompt+chosen+rejected | chosen+rejected | input+preferred_output+"
    "non_preferred_output | prompt+completion+label | prompt+response+reward | prompt"
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


# What one row's JSON may hold (README, "Limits"): nesting depth, and the characters of
# one number. Deeper or longer is no training row, and costs the parser memory and time.
MAX_JSON_DEPTH = 64
MAX_NUMBER_CHARS = 100


_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _load(line_no: int, text: str) -> dict[str, Any]:
    try:
        raw = loads(text, max_number_chars=MAX_NUMBER_CHARS)
    except json.JSONDecodeError as exc:
        msg = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise DatasetError(line_no, None, msg) from None
    except NumberError as exc:
        raise DatasetError(line_no, None, str(exc)) from None
    except RecursionError:  # far deeper than the limit
        raise DatasetError(line_no, None, _TOO_DEEP) from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(raw) > MAX_JSON_DEPTH:
        raise DatasetError(line_no, None, _TOO_DEEP)
    if not isinstance(raw, dict):
        raise DatasetError(
            line_no, None, f"each line must be a JSON object, got {type(raw).__name__}"
        )
    if "\\u" in text:  # only an escape can put a lone surrogate in decoded JSON
        where = lone_surrogate(raw)
        if where is not None:
            raise DatasetError(line_no, where or None, LONE_SURROGATE)
    return raw


LONE_SURROGATE = (
    "holds a lone surrogate escape (\\ud800-\\udfff without its pair), which is not "
    "valid Unicode text"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The field path of the first string (or key) in ``value`` holding a lone surrogate
    (``""`` for ``value`` itself), or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return sub
            found = lone_surrogate(item, sub)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _validate(line_no: int, model: type[Row], raw: dict[str, Any]) -> Row:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _loc_to_param(err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        raise DatasetError(line_no, param or None, reason) from None


def parse_row(
    line_no: int, text: str, formats: Iterable[RowFormat] | None = None
) -> dict[RowFormat, Row]:
    """Every format (of ``formats``, default all) one JSONL line fits, with its parsed row.

    Raises DatasetError naming the line and field when the line fits none of them; the
    error is the one of the shape the row was most likely meant to have.
    """
    raw = _load(line_no, text)
    wanted = FORMAT_ORDER if formats is None else tuple(formats)
    fits: dict[RowFormat, Row] = {}
    for fmt, model in SHAPES:
        if fmt in wanted and fmt not in fits and required_fields(model) <= raw.keys():
            try:
                fits[fmt] = model.model_validate(raw)
            except ValidationError:
                continue
    if fits:
        return fits
    shape = classify(raw)
    if shape is None:
        raise DatasetError(line_no, None, _NO_FORMAT)
    fmt, model = shape
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
) -> Iterator[tuple[int, dict[RowFormat, Row]]]:
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
) -> tuple[RowFormat, list[Row]]:
    """Parse a file as the first of ``accepted`` (in the method's order of preference) that
    every row fits. Raises DatasetError naming the first line that fits none of them."""
    accepted = tuple(accepted)
    rows: list[dict[RowFormat, Row]] = [fits for _, fits in iter_rows(lines, accepted)]
    if not rows:
        raise DatasetError(1, None, "file contains no rows")
    fmt = next(f for f in accepted if f in rows[-1])
    return fmt, [fits[fmt] for fits in rows]
