"""The names a job may use, torch-free: method types, aliases, and per-method variants.

The API's schema, its error messages, the README and the training process's
registries all read these tuples, so they cannot drift: ``tests/trainers/
test_methods.py`` checks that they equal the keys of the torch-side registries
(``trainers.registry`` and, for DPO, the loss types TRL 1.16's ``DPOTrainer``
implements).
"""

from __future__ import annotations

# Methods with a trainer in this release, in the order the docs list them.
METHODS: tuple[str, ...] = (
    "supervised",
    "dpo",
    "bco",
    "oreo",
    "grpo",
    "reinforcement",
    "egpo",
)
# Known methods whose trainers arrive in later releases: the API says "not available yet".
PLANNED_METHODS: tuple[str, ...] = ()
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

# GRPO family (trainers/core registries; tests compare these with the registry keys).
# Advantage estimators: a base normaliser per group.
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "ngrpo", "hapo")
# Advantage shapers applied on top of any estimator ("none" = identity).
ADVANTAGE_SHAPERS: tuple[str, ...] = ("none", "xrpo_novelty")
# Per-token surrogate objectives (clipping rules).
OBJECTIVES: tuple[str, ...] = ("ppo_clip", "hapo")
# Loss aggregation over tokens (TRL's loss_type names).
AGGREGATIONS: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
# Rollout planners: how many samples each prompt gets, and from what context.
ROLLOUT_PLANNERS: tuple[str, ...] = ("uniform", "xrpo")
# Sampling temperature rules.
TEMPERATURE_RULES: tuple[str, ...] = ("constant", "hapo_ats")
# Named presets over the pieces above (trainers/grpo_presets.py).
GRPO_VARIANTS: tuple[str, ...] = ("grpo", "dapo", "dr_grpo", "ngrpo", "xrpo", "hapo")
# OpenAI grader types posttrain runs, plus its own; "python" is refused by name.
GRADERS: tuple[str, ...] = (
    "string_check",
    "text_similarity",
    "score_model",
    "multi",
    "math_verify",
    "regex",
    "length_penalty",
)
REFUSED_GRADERS: dict[str, str] = {
    "python": "posttrain never runs user code; use string_check, text_similarity, score_model, "
    "multi, math_verify, regex or length_penalty",
}
# OREO loss variants (trainers/core/oreo.py).
OREO_VARIANTS: tuple[str, ...] = ("token", "step", "response")
