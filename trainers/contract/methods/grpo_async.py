"""What ``rollout_mode: "async"`` admits (torch-free; the GRPO contract calls
``check_async`` while resolving a job's settings).

Asynchronous rollouts run on TRL's experimental ``AsyncGRPOTrainer``
(``trainers/algorithms/grpo_async``), which samples on a vLLM server only: its rollout
worker posts to the server's ``/v1/completions`` and its weights reach the server after
every sync. So a job must generate on a worker-owned vLLM server, and every setting of
the GRPO family must hold the one value that trainer computes (``ASYNC_FIXED``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from trainers.contract.hparams import RolloutEngine

# Jobs that do not generate on a worker-owned vLLM server are refused with this.
ASYNC_REFUSAL = (
    "rollout_mode 'async' needs a vLLM server to generate on: TRL's asynchronous GRPO "
    "trainer samples only through one, so set rollout_engine 'vllm' and vllm_mode 'server' "
    "(a GPU worker with the 'gpu' extra starts it for the run), or use rollout_mode 'sync'"
)
# What TRL's AsyncGRPOTrainer computes, and so the only value of each setting it can
# honour: group z-scored advantages, the PPO clip per token with the loss summed over the
# step's completion tokens and divided by their count (TRL's 'dapo' aggregation), no KL
# term and no reference model, each sample trained on once, truncated completions kept.
ASYNC_FIXED: dict[str, tuple[Any, str]] = {
    "beta": (0.0, "it has no KL term (no reference model)"),
    "advantage_estimator": ("grpo", "its advantages are the group's z-scored rewards"),
    "scale_rewards": ("group", "its advantages are the group's z-scored rewards"),
    "advantage_shaper": ("none", "its advantages are not reshaped"),
    "objective": ("ppo_clip", "its objective is the PPO clip"),
    "dual_clip": (None, "its objective is the PPO clip without a dual clip"),
    "loss_type": ("dapo", "it averages the loss over the step's completion tokens"),
    "rollout_planner": ("uniform", "it samples num_generations completions of every prompt"),
    "temperature_rule": ("constant", "its sampling temperature is constant"),
    "num_iterations": (1, "it trains on each sample once"),
    "steps_per_generation": (1, "it trains on each sample once, as it arrives"),
    "mask_truncated_completions": (False, "it trains on truncated completions too"),
    "importance_sampling_level": ("token", "its importance ratio is per token"),
    "reward_weights": (None, "it sums the graders' rewards unweighted"),
}


def check_async(s: BaseModel, hp: RolloutEngine, variant: str) -> None:
    """``rollout_mode: "async"``: on a worker-owned vLLM server, with every resolved
    setting one TRL's AsyncGRPOTrainer honours (``ASYNC_FIXED``); each refusal names the
    field, the value and where it came from (the request or the variant's preset)."""
    if not hp.wants_vllm_server:
        raise ValueError(ASYNC_REFUSAL)
    for name, (wanted, why) in ASYNC_FIXED.items():
        value = getattr(s, name)
        if value == wanted:
            continue
        origin = (
            "the request"
            if name in hp.model_fields_set and getattr(hp, name) is not None
            else f"variant '{variant}'"
        )
        fix = "drop it" if wanted is None else f"set {name} {wanted!r}"
        raise ValueError(
            f"rollout_mode 'async' cannot take {name} {value!r} (from {origin}): TRL's "
            f"asynchronous GRPO trainer has one value for it because {why}; {fix}, or use "
            "rollout_mode 'sync'"
        )
