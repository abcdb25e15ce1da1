"""EGPO (Zhou, Fazel & Du 2025, arXiv 2503.08942) as a method: rows, config, trainer wiring.

Rows are prompts (``prompt`` or ``messages``, read like GRPO's; extra fields are kept
as the judge's ``item``), shuffled once with the job seed. The config makes
``max_steps`` and ``save_steps`` even (one iteration is two optimizer steps); the
trainer gets the judge (``trainers.judges.registry``), a frozen reference copy for
full training (or the policy with its adapter disabled for LoRA) and the rollout
engine. The trainer is ``trainer.py``; the math ``trainers/core/egpo.py``.

Rollouts: transformers ``generate`` on CPU and by default; TRL's vLLM integration (the
engine GRPO's vLLM path uses, ``colocate`` or a worker-started ``server``) with
``rollout_engine: vllm``, or ``auto`` on a GPU host where vLLM imports.
"""

from __future__ import annotations

import math
from typing import Any

from trainers.algorithms.egpo.trainer import EGPOTrainingArguments, PosttrainEGPOTrainer
from trainers.algorithms.reference_trainer import reference_kwargs
from trainers.contract.methods.egpo import EGPOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.records import prompt_records
from trainers.runner import MethodDef, TrainData


def records(rows: list, hp: EGPOHyperparameters | None = None, param: str = "") -> list[dict]:
    return prompt_records(rows)


def _even(n: int) -> int:
    return n + n % 2


def total_steps(hp: EGPOHyperparameters, rows: int) -> int:
    """Optimizer steps of the run: max_steps, or n_epochs passes over the prompts (one fresh
    batch per step), rounded up to whole iterations."""
    if hp.max_steps:
        steps = hp.max_steps
    else:
        batches = math.ceil(rows / hp.resolved_batch_size(rows))  # the global batch
        per_epoch = max(1, math.ceil(batches / hp.gradient_accumulation_steps))
        steps = hp.resolved_epochs() * per_epoch
    return _even(steps) if hp.extragradient else steps


def config_fields(plan: RunPlan, hp: EGPOHyperparameters, data: TrainData) -> dict[str, Any]:
    per_iteration = 2 if hp.extragradient else 1
    every = plan.checkpoint_every_steps
    return {
        "remove_unused_columns": False,
        "max_steps": total_steps(hp, len(data.train)),
        "save_steps": _even(every) if hp.extragradient else every,
        "steps_per_iteration": per_iteration,
        "eval_strategy": "no",
        "eval_steps": None,
    }


def trainer_kwargs(plan: RunPlan, model, data: TrainData) -> dict[str, Any]:
    from trainers.judges.registry import build_judge
    from trainers.models import pick_device_dtype, use_vllm

    spec = plan.spec
    hp: EGPOHyperparameters = spec.method_hyperparameters()
    device, _ = pick_device_dtype()
    return {
        "egpo": hp,
        "judge": build_judge(hp.judge, seed=spec.seed, device=device),
        "use_vllm": use_vllm(hp.rollout_engine, f"{spec.method.param}.rollout_engine"),
        "vllm_server_url": plan.vllm_server_url,
        **reference_kwargs(plan),
    }


METHOD = MethodDef(
    name="egpo",
    config_class=EGPOTrainingArguments,
    trainer_class=PosttrainEGPOTrainer,
    records=records,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
    shuffle=True,
)
