"""Method registry: method name -> the ``MethodDef`` that trains it (training process only).

Entries are import paths, resolved only inside the training process, so importing
this module never loads torch. The names are ``trainers.methods.METHODS``; a test
checks the two agree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainers.methods import METHODS

if TYPE_CHECKING:
    from trainers.runner import MethodDef

TRAINERS: dict[str, str] = {
    "supervised": "trainers.algorithms.sft:METHOD",
    "dpo": "trainers.algorithms.dpo:METHOD",
    "bco": "trainers.algorithms.bco:METHOD",
    "oreo": "trainers.algorithms.oreo:METHOD",
    "grpo": "trainers.algorithms.grpo:METHOD",
    "reinforcement": "trainers.algorithms.grpo:METHOD",  # OpenAI's name for GRPO with a grader
    "egpo": "trainers.algorithms.egpo:METHOD",
}


def resolve(method: str) -> MethodDef:
    """Import and return the method definition for ``method``."""
    try:
        target = TRAINERS[method]
    except KeyError:
        raise KeyError(f"unknown method '{method}'; available: {', '.join(METHODS)}") from None
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)
