"""The GRPO-family variants as named presets over the shared pieces (torch-free).

A variant is a row of settings over the registries in ``trainers/core``
(advantage estimator, shaper, objective, aggregation, rollout planner,
temperature rule) plus TRL's clip widths, KL coefficient and reward scaling,
with each paper's published defaults. Every field of a job's
``hyperparameters`` that is not None overrides the preset.

When the resolved settings are ones TRL 1.16's ``GRPOTrainer`` computes itself
(z-scored or centred group advantages, PPO clipping, no dual clip, uniform
rollouts, a constant temperature), ``trl_native`` is true and posttrain
overrides nothing: the job runs TRL's own advantage and loss code with the
``GRPOConfig`` built from these settings.

Departures from the papers: ``dapo`` is TRL's DAPO (asymmetric clip, token-level
aggregation over the step, overlong completions masked); DAPO's dynamic
sampling (drop zero-variance groups and refill) is not done. ``ngrpo`` drops no
groups (the paper drops all-correct ones). ``xrpo`` realises its allocator's
phases across visits of a prompt (``trainers/core/rollout.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from trainers.hparams import GRPOHyperparameters

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath's GRPO (TRL's loss_type 'grpo': per-sequence mean, then batch mean).
    "grpo": {"epsilon": 0.2, "epsilon_high": 0.2, "beta": 0.04, "loss_type": "grpo"},
    # DAPO as TRL implements it.
    "dapo": {
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "beta": 0.0,
        "loss_type": "dapo",
        "mask_truncated_completions": True,
    },
    # Dr.GRPO: centred advantages, length-independent aggregation.
    "dr_grpo": {
        "advantage_estimator": "dr_grpo",
        "scale_rewards": "none",
        "beta": 0.0,
        "loss_type": "dr_grpo",
    },
    # NGRPO: virtual-max advantages, asymmetric clip, token mean.
    "ngrpo": {
        "advantage_estimator": "ngrpo",
        "epsilon": 0.16,
        "epsilon_high": 0.24,
        "beta": 0.0,
        "loss_type": "bnpo",
    },
    # XRPO: GRPO advantages sharpened by novelty, hierarchical allocation with ICL seeding.
    "xrpo": {
        "advantage_shaper": "xrpo_novelty",
        "rollout_planner": "xrpo",
        "beta": 0.0,
        "loss_type": "dapo",
    },
    # HAPO: token-level group average, adaptive clip + redistribution, adaptive temperature.
    "hapo": {
        "advantage_estimator": "hapo",
        "objective": "hapo",
        "temperature_rule": "hapo_ats",
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "dual_clip": 10.0,
        "beta": 0.0,
        "loss_type": "bnpo",
    },
}


@dataclass(frozen=True)
class GRPOSettings:
    """A job's resolved GRPO settings: its variant's preset overridden by its request."""

    variant: str
    advantage_estimator: str = "grpo"
    advantage_shaper: str = "none"
    objective: str = "ppo_clip"
    loss_type: str = "dapo"
    rollout_planner: str = "uniform"
    temperature_rule: str = "constant"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = None
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False

    @property
    def trl_native(self) -> bool:
        """True when TRL's own advantage and loss code computes exactly these settings."""
        return (
            self.advantage_estimator in ("grpo", "dr_grpo")
            and self.advantage_shaper == "none"
            and self.objective == "ppo_clip"
            and self.dual_clip is None
            and self.rollout_planner == "uniform"
            and self.temperature_rule == "constant"
        )


def resolve(variant: str, hp: GRPOHyperparameters) -> GRPOSettings:
    """The preset of ``variant`` with every non-None field of ``hp`` on top of it."""
    if variant not in PRESETS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(PRESETS)}")
    settings = replace(GRPOSettings(variant=variant), **PRESETS[variant])
    overrides = {
        f.name: getattr(hp, f.name)
        for f in fields(GRPOSettings)
        if f.name != "variant" and getattr(hp, f.name, None) is not None
    }
    settings = replace(settings, **overrides)
    if settings.advantage_estimator == "dr_grpo" and hp.scale_rewards is None:
        settings = replace(settings, scale_rewards="none")  # centred means unscaled
    check(settings, hp)
    return settings


def check(s: GRPOSettings, hp: GRPOHyperparameters) -> None:
    """Combinations that cannot mean what the request says; each message says how to fix it."""
    if s.advantage_estimator == "dr_grpo" and s.scale_rewards != "none":
        raise ValueError(
            "advantage_estimator 'dr_grpo' centres rewards without scaling them; drop "
            "scale_rewards or use advantage_estimator 'grpo'"
        )
    if s.advantage_estimator in ("ngrpo", "hapo") and hp.scale_rewards is not None:
        raise ValueError(
            f"scale_rewards applies to the 'grpo' estimator; '{s.advantage_estimator}' "
            "defines its own normalisation, so drop scale_rewards"
        )
    if not s.trl_native and hp.importance_sampling_level == "sequence":
        raise ValueError(
            "importance_sampling_level 'sequence' (GSPO) is computed by TRL's own loss; "
            f"variant '{s.variant}' with these settings uses posttrain's per-token objective, "
            "so use importance_sampling_level 'token'"
        )
    if s.temperature_rule == "hapo_ats" and hp.rollout_engine == "vllm":
        raise ValueError(
            "temperature_rule 'hapo_ats' sets a temperature per token, which vLLM's sampler "
            "does not take; use rollout_engine 'transformers' or temperature_rule 'constant'"
        )
