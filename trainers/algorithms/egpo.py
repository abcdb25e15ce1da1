"""EGPO (Zhou, Fazel & Du 2025, arXiv 2503.08942): online Nash preference optimisation
with extragradient steps, judged by a pairwise preference judge.

This module is the method's wiring: the data mapping (prompt-only rows, ``prompt`` or
``messages``, read like GRPO's; extra fields are kept as the judge's ``item``), the
config mapping (an even ``max_steps`` and ``save_steps``: one iteration is two
optimizer steps) and the trainer's construction (the judge from
``trainers.judges.registry``, a frozen reference copy for full training or the policy
with its adapter disabled for LoRA, the rollout engine). The trainer is
``trainers/algorithms/egpo_trainer.py``; the math ``trainers/core/egpo.py``.

Rollouts: transformers ``generate`` on CPU and by default; TRL's vLLM integration (the
engine GRPO's vLLM path uses, ``colocate`` or a worker-started ``server``) with
``rollout_engine: vllm``, or ``auto`` on a GPU host where vLLM imports.
"""

from __future__ import annotations

import math
from typing import Any

from trainers.algorithms.egpo_trainer import (
    EGPOSettings,
    EGPOTrainingArguments,
    PosttrainEGPOTrainer,
)
from trainers.algorithms.grpo import _prompt_dataset
from trainers.data import read_rows
from trainers.hparams import EGPOHyperparameters
from trainers.plan import RunPlan
from trainers.runner import MethodDef, TrainData
from trainers.spec import EGPOMethod


def datasets(plan: RunPlan) -> TrainData:
    fmt, rows = read_rows(plan.training_path, EGPOMethod.accepted_formats, "training_file")
    # shuffled once with the job seed; the trainer then reads prompts in order
    return TrainData(fmt, _prompt_dataset(rows).shuffle(seed=plan.spec.seed), None)


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
    from trainers.models import load_causal_lm, pick_device_dtype, use_vllm

    spec = plan.spec
    hp: EGPOHyperparameters = spec.method_hyperparameters()
    vllm = use_vllm(hp.rollout_engine, "method.egpo.hyperparameters.rollout_engine")
    device, _ = pick_device_dtype()
    kwargs: dict[str, Any] = {
        "egpo": EGPOSettings.from_hparams(
            hp, use_vllm=vllm, vllm_mode=hp.vllm_mode, vllm_server_url=plan.vllm_server_url
        ),
        "judge": build_judge(hp.judge, seed=spec.seed, device=device),
    }
    if spec.training_type != "lora":
        kwargs["ref_model"] = load_causal_lm(spec.model)  # the base, even on resume
    return kwargs


METHOD = MethodDef(
    name="egpo",
    config_class=EGPOTrainingArguments,
    trainer_class=PosttrainEGPOTrainer,
    datasets=datasets,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
)
