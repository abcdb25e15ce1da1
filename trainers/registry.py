"""Method name -> the ``MethodDef`` that trains it (training process only).

Each method's contract model (``trainers.contract.methods``) names the module of its
torch side (``algorithm``); this module imports it on demand, so resolving a name
loads that method's trainer and nothing else. The names are the contract's
``METHODS``, the one list of methods.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainers.contract.methods import method_model

if TYPE_CHECKING:
    from trainers.contract.spec import JobSpec
    from trainers.runner import MethodDef


def resolve(method: str) -> MethodDef:
    """Import and return the method definition for ``method`` (KeyError naming the valid
    ones for an unknown name)."""
    return importlib.import_module(method_model(method).algorithm).METHOD


def resolve_job(spec: JobSpec) -> MethodDef:
    """The method definition that trains ``spec``: its method's, or the one its settings
    pick (``MethodModel.job_algorithm``)."""
    return importlib.import_module(spec.method.job_algorithm()).METHOD
