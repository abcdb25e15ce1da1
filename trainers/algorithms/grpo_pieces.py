"""From a job's resolved GRPO settings to the configured pieces its trainer plugs in.

Each piece takes its own hyperparameters (never the whole config): this module is
the one place that maps the job spec's field names onto them.
"""

from __future__ import annotations

from typing import Any

from trainers.core.rollout import format_seeded_prompt, get_planner
from trainers.core.temperature import get_temperature_rule
from trainers.grpo_presets import GRPOSettings
from trainers.hparams import GRPOHyperparameters


def estimator_hp(s: GRPOSettings, hp: GRPOHyperparameters) -> dict[str, Any]:
    if s.advantage_estimator == "grpo":
        return {"scale": s.scale_rewards}
    if s.advantage_estimator == "ngrpo":
        return {"r_max": hp.ngrpo_virtual_reward, "n_virtual": hp.ngrpo_virtual_count}
    return {}


def shaper_hp(s: GRPOSettings, hp: GRPOHyperparameters) -> dict[str, Any]:
    if s.advantage_shaper == "xrpo_novelty":
        return {"lambda_novelty": hp.xrpo_novelty_lambda, "kappa_clip": hp.xrpo_novelty_kappa}
    return {}


def objective_hp(s: GRPOSettings, hp: GRPOHyperparameters) -> dict[str, Any]:
    if s.objective == "hapo":
        return {
            "alpha": hp.hapo_alpha,
            "beta_adv": hp.hapo_beta_a,
            "pivot_quantile": hp.hapo_pivot_quantile,
        }
    return {}


def build_pieces(s: GRPOSettings, hp: GRPOHyperparameters) -> dict[str, Any]:
    """Hyperparameters per piece, plus the stateful planner and temperature rule (or None)."""
    planner = None
    if s.rollout_planner == "xrpo":
        planner = get_planner("xrpo")(
            alpha=hp.xrpo_alpha, lam=hp.xrpo_ucb_lambda, num_exemplars=hp.xrpo_exemplars
        )
    temperature = None
    if s.temperature_rule == "hapo_ats":
        temperature = get_temperature_rule("hapo_ats")(
            base_temperature=hp.temperature,
            tau=hp.hapo_tau,
            quantile=hp.hapo_pivot_quantile,
        )
    return {
        "estimator": estimator_hp(s, hp),
        "shaper": shaper_hp(s, hp),
        "objective": objective_hp(s, hp),
        "planner": planner,
        "temperature": temperature,
        "seed_prompt": format_seeded_prompt,
        "max_seq_length": hp.max_seq_length,
    }
