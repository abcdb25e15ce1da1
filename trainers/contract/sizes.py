"""Size limits of what a job record stores (torch-free).

Every GET and list of a job returns its spec, so a spec is bounded: a 20 MB grader
string would otherwise be stored and sent back with every read. The request body is
bounded before it is read (``service.bodylimit``); these bound what is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_SPEC_BYTES = 256 << 10  # a whole job spec, as JSON
MAX_DEFINITION_BYTES = 64 << 10  # one grader or judge definition, as JSON


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (UTF-8); anything JSON cannot hold counts as
    its ``str``."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return len(text.encode("utf-8", "surrogatepass"))


def at_most(limit: int, what: str) -> Callable[[Any], Any]:
    """A pydantic before-validator refusing a raw value over ``limit`` bytes of JSON."""

    def check(value: Any) -> Any:
        size = json_size(value)
        if size > limit:
            raise ValueError(f"{what} is {size} bytes of JSON; at most {limit}")
        return value

    return check
