"""JSON numbers as posttrain reads them: finite, bounded, never NaN or Infinity.

JSON has no NaN or Infinity, but Python's parser accepts them (and ``1e999``
becomes ``inf``). Every reader of stored or uploaded JSON goes through ``loads``:
uploaded rows and stored job specs refuse non-finite numbers (``nonfinite="raise"``),
and the API's fallback view of an unreadable old record turns them into null
(``nonfinite="null"``). Report metrics (``trainers.contract.messages``) map a
non-finite value to None with ``finite_or_none``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal


class NumberError(ValueError):
    """A number JSON cannot hold, or one past the reader's length limit."""


def finite_or_none(value: Any) -> Any:
    """A tensor or number as a plain number, None where it is NaN or infinite."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def loads(
    text: str | bytes,
    *,
    nonfinite: Literal["raise", "null"] = "raise",
    max_number_chars: int | None = None,
) -> Any:
    """``json.loads`` that raises ``NumberError`` on NaN, Infinity, an overflowing float
    or a number longer than ``max_number_chars`` (or, with ``nonfinite="null"``, reads a
    non-finite number as None)."""

    def too_long(raw: str) -> None:
        if max_number_chars is not None and len(raw) > max_number_chars:
            raise NumberError(f"a number longer than {max_number_chars} characters")

    def parse_int(raw: str) -> int:
        too_long(raw)
        return int(raw)

    def parse_float(raw: str) -> float | None:
        too_long(raw)
        value = float(raw)
        if math.isfinite(value):
            return value
        if nonfinite == "null":
            return None
        raise NumberError(f"{raw} is out of range for a number")

    def parse_constant(raw: str) -> None:
        if nonfinite == "null":
            return None
        raise NumberError(f"{raw} is not valid JSON (NaN and Infinity are not numbers)")

    return json.loads(
        text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant
    )
