"""The names a job may use, torch-free: method types, aliases, and per-method variants.

The API's schema, its error messages, the README and the training process's
registries all read these tuples, so they cannot drift: ``tests/trainers/
test_methods.py`` checks that they equal the keys of the torch-side registries
(``trainers.registry`` and, for DPO, the loss types TRL 1.16's ``DPOTrainer``
implements).
"""

from __future__ import annotations

# Methods with a trainer in this release, in the order the docs list them.
METHODS: tuple[str, ...] = ("supervised", "dpo")
# Known methods whose trainers arrive in later releases: the API says "not available yet".
PLANNED_METHODS: tuple[str, ...] = ("bco", "grpo", "reinforcement", "egpo", "oreo")
# Other spellings a request may use for a method type (and for its config key).
METHOD_ALIASES: dict[str, str] = {"sft": "supervised"}

# TRL 1.16 DPOConfig.loss_type values (several may be combined with loss_weights).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
