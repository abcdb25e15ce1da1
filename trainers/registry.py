"""Method registry: method name -> the function that trains it.

Entries are import paths, resolved only inside the training process, so the API
can list and validate method names without importing torch. The names a request
may use are the keys here; ``trainers.spec`` and the API read them from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from trainers.spec import PLANNED_METHODS

TRAINERS: dict[str, str] = {
    "supervised": "trainers.algorithms.sft:train",
}


def available_methods() -> list[str]:
    return sorted(TRAINERS)


def planned_methods() -> list[str]:
    return [m for m in PLANNED_METHODS if m not in TRAINERS]


def resolve(method: str) -> Callable[..., Any]:
    """Import and return the train function for ``method`` (training process only)."""
    try:
        target = TRAINERS[method]
    except KeyError:
        raise KeyError(
            f"unknown method '{method}'; available: {', '.join(available_methods())}"
        ) from None
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)
