"""From a job's resolved GRPO settings to the configured pieces its trainer plugs in.

Each piece takes its own hyperparameters (never the whole config): this module is
the one place that maps the job spec's field names onto them. ``s`` is the job's
hyperparameters with every piece field resolved (``trainers.contract.methods.grpo.resolve``).
"""

from __future__ import annotations

from typing import Any

from trainers.contract.methods.grpo import GRPOHyperparameters
from trainers.core.rollout import format_seeded_prompt, get_planner
from trainers.core.temperature import get_temperature_rule


def estimator_hp(s: GRPOHyperparameters) -> dict[str, Any]:
    if s.advantage_estimator == "grpo":
        return {"scale": s.scale_rewards}
    if s.advantage_estimator == "ngrpo":
        return {"r_max": s.ngrpo_virtual_reward, "n_virtual": s.ngrpo_virtual_count}
    return {}


def shaper_hp(s: GRPOHyperparameters) -> dict[str, Any]:
    if s.advantage_shaper == "xrpo_novelty":
        return {"lambda_novelty": s.xrpo_novelty_lambda, "kappa_clip": s.xrpo_novelty_kappa}
    return {}


def objective_hp(s: GRPOHyperparameters) -> dict[str, Any]:
    if s.objective == "hapo":
        return {
            "alpha": s.hapo_alpha,
            "beta_adv": s.hapo_beta_a,
            "pivot_quantile": s.hapo_pivot_quantile,
            "literal_code_sign": s.hapo_literal_code_sign,
        }
    return {}


def build_pieces(s: GRPOHyperparameters) -> dict[str, Any]:
    """Hyperparameters per piece, plus the stateful planner and temperature rule (or None)."""
    planner = None
    if s.rollout_planner == "xrpo":
        planner = get_planner("xrpo")(
            alpha=s.xrpo_alpha, lam=s.xrpo_ucb_lambda, num_exemplars=s.xrpo_exemplars
        )
    temperature = None
    if s.temperature_rule == "hapo_ats":
        temperature = get_temperature_rule("hapo_ats")(
            base_temperature=s.temperature,
            tau=s.hapo_tau,
            use_raw_z=s.hapo_raw_z,
            literal_code_sign=s.hapo_literal_code_sign,
            quantile=s.hapo_pivot_quantile,
        )
    return {
        "estimator": estimator_hp(s),
        "shaper": shaper_hp(s),
        "objective": objective_hp(s),
        "planner": planner,
        "temperature": temperature,
        "seed_prompt": format_seeded_prompt,
        "max_seq_length": s.max_seq_length,
    }
