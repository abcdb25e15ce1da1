"""The rows an eval run grades: their shape and the data file they come in (torch-free).

A row is one JSON object ``{"item": {...}, "sample": {...}}`` (``sample`` optional), inline
in a run's data source or one per line of an uploaded file with purpose ``evals``.
``check_row`` checks one row's shape; ``read_rows`` reads a data file (the API when the
file is uploaded and when a run names it, the worker when it grades the run or counts a
checkpoint run's rows); ``check_item`` checks an item against the eval's ``item_schema``
(a subset of JSON Schema). A refusal is a ``RowError`` naming where (the field's path,
and a file's line).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_ITEMS", "MAX_ROW_BYTES", "RowError", "check_item", "check_row", "read_rows"]

MAX_ITEMS = 10_000  # rows of one run
MAX_ROW_BYTES = 1 << 20  # one row of a run's data, as JSON


class RowError(ValueError):
    """A row of a run's data that cannot be graded; ``where`` names it (the field path)."""

    def __init__(self, where: str, message: str, line: int | None = None):
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.line = where, message, line


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _is_type(value: Any, kind: str) -> bool:
    if kind not in _TYPES:
        return True  # a type this checker does not know: not checked
    if isinstance(value, bool) and kind in ("number", "integer"):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def check_item(value: Any, schema: Any, where: str) -> None:
    """Raise RowError naming the first field of ``value`` that ``schema`` refuses.

    A subset of JSON Schema, as deep as the schema goes: ``type`` (one or a list),
    ``required``, ``properties``, ``items``, ``enum``. Other keywords are not checked."""
    if not isinstance(schema, dict):
        return
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if isinstance(kinds, list) and not any(_is_type(value, k) for k in kinds):
        raise RowError(where, f"must be of type {' or '.join(kinds)}, got {_json_type(value)}")
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        raise RowError(where, f"must be one of {json.dumps(enum)[:200]}")
    if isinstance(value, dict):
        for name in schema.get("required") or []:
            if name not in value:
                raise RowError(f"{where}.{name}", "is required by the eval's item_schema")
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                check_item(value[name], sub, f"{where}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, element in enumerate(value):
            check_item(element, schema["items"], f"{where}[{i}]")


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name) and not (name == "number" and isinstance(value, int)):
            return name
    return type(value).__name__


def read_rows(lines: Iterable[bytes | str], where: str) -> list[dict[str, Any]]:
    """The rows of an eval data file: one JSON object ``{"item": {...}, "sample": {...}}``
    per line (``sample`` optional; blank lines skipped). RowError names the line."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            line = line.decode("utf-8-sig" if number == 1 else "utf-8", "replace")
        if not line.strip():
            continue
        at = f"{where} line {number}"
        if len(line) > MAX_ROW_BYTES:
            raise RowError(at, f"a row is at most {MAX_ROW_BYTES} bytes", number)
        try:
            row = json.loads(line)
        except ValueError:
            raise RowError(at, "is not JSON", number) from None
        try:
            check_row(row, at)
        except RowError as exc:
            exc.line = number
            raise
        rows.append(row)
        if len(rows) > MAX_ITEMS:
            raise RowError(where, f"at most {MAX_ITEMS} rows")
    if not rows:
        raise RowError(where, "has no rows")
    return rows


def check_row(row: Any, where: str) -> None:
    """A row's shape: an object with an ``item`` object and an optional ``sample`` object."""
    if not isinstance(row, dict):
        raise RowError(where, 'must be an object {"item": {...}, "sample": {...}}')
    extra = next((k for k in row if k not in ("item", "sample")), None)
    if extra is not None:
        raise RowError(f"{where}.{extra}", "unknown field; a row has 'item' and 'sample'")
    if not isinstance(row.get("item"), dict):
        raise RowError(f"{where}.item", "is required and must be an object")
    if "sample" in row and not isinstance(row["sample"], dict):
        raise RowError(f"{where}.sample", "must be an object")
