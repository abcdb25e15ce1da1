"""The torch-free names the API accepts equal the keys of the torch-side implementations."""

from __future__ import annotations

import inspect
import re

from trl import DPOTrainer

from trainers import registry
from trainers.contract.methods import METHODS, PLANNED_METHODS
from trainers.contract.methods.dpo import DPO_LOSS_TYPES


def test_method_names_are_the_registry_keys_and_resolve_to_their_method():
    assert not set(METHODS) & set(PLANNED_METHODS)
    for name in METHODS:  # OpenAI's "reinforcement" is GRPO with one grader
        assert registry.resolve(name).name == {"reinforcement": "grpo"}.get(name, name)


def test_dpo_loss_types_are_the_branches_trls_dpo_loss_implements():
    source = inspect.getsource(DPOTrainer)
    implemented = set(re.findall(r'loss_type == "([a-z_]+)"', source))
    assert implemented == set(DPO_LOSS_TYPES)


def test_oreo_variant_names_are_its_registry_keys():
    from trainers.contract.methods.oreo import OREO_VARIANT_NAMES as OREO_VARIANTS
    from trainers.core.oreo import OREO_VARIANTS as REGISTRY

    assert tuple(REGISTRY) == OREO_VARIANTS


def test_gradient_checkpointing_auto_follows_the_device_and_a_choice_wins():
    from trainers.contract.methods.sft import SupervisedHyperparameters as SFTHyperparameters

    auto = SFTHyperparameters()
    assert (
        auto.resolved_gradient_checkpointing("cuda"),
        auto.resolved_gradient_checkpointing("cpu"),
    ) == (True, False)
    for choice in (True, False):
        hp = SFTHyperparameters(gradient_checkpointing=choice)
        assert hp.resolved_gradient_checkpointing("cuda") is choice
        assert hp.resolved_gradient_checkpointing("cpu") is choice
