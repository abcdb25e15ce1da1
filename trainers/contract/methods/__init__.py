"""The list of methods: every name, alias and torch side a job can reach comes from here.

``METHOD_MODELS`` is the one list. The job spec's method union
(``trainers.contract.spec``), the names the API accepts and lists in its errors, the
aliases, and the training process's registry (``trainers.registry``: each model's
``algorithm`` module) are all built from it. Adding a method is one contract module
here (``<name>.py``: hyperparameters, request block, ``MethodModel`` subclass), one
algorithm folder (``trainers/algorithms/<name>/``) and one line below.
"""

from __future__ import annotations

from trainers.contract.methods.base import MethodModel
from trainers.contract.methods.bco import BCOMethod
from trainers.contract.methods.dpo import DPOMethod
from trainers.contract.methods.egpo import EGPOMethod
from trainers.contract.methods.grpo import GRPOMethod
from trainers.contract.methods.oreo import OREOMethod
from trainers.contract.methods.reinforcement import ReinforcementMethod
from trainers.contract.methods.sft import SupervisedMethod

# Methods with a trainer in this release, in the order the docs list them.
METHOD_MODELS: tuple[type[MethodModel], ...] = (
    SupervisedMethod,
    DPOMethod,
    BCOMethod,
    OREOMethod,
    GRPOMethod,
    ReinforcementMethod,
    EGPOMethod,
)

METHODS: tuple[str, ...] = tuple(m.type_name() for m in METHOD_MODELS)
# A request without ``method`` (OpenAI's legacy shape) trains this one.
DEFAULT_METHOD = SupervisedMethod.type_name()
BY_NAME: dict[str, type[MethodModel]] = dict(zip(METHODS, METHOD_MODELS, strict=True))
# Other spellings a request may use for a method type (and for its block's key).
METHOD_ALIASES: dict[str, str] = {a: m.type_name() for m in METHOD_MODELS for a in m.aliases}
# Known methods whose trainers arrive in later releases: the API says "not available yet".
PLANNED_METHODS: tuple[str, ...] = ()


def method_model(name: str) -> type[MethodModel]:
    """The model of the method ``name`` (an alias works); KeyError listing the names."""
    name = METHOD_ALIASES.get(name, name)
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown method '{name}'; available: {', '.join(METHODS)}") from None
