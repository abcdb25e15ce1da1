"""``rollout_mode: "async"`` jobs on TRL's ``AsyncGRPOTrainer`` (``trainers.registry``
picks this module through ``GradedMethod.job_algorithm``).

The contract (``trainers/contract/methods/grpo_async.py``, ``check_async``) admits only jobs
that generate on the worker's vLLM server and whose settings are what this trainer
computes, so the mapping here is direct:

* ``num_generations`` (``reinforcement``: times ``compute_multiplier``; its
  ``reasoning_effort`` goes to the chat template as on the synchronous path),
  ``max_completion_length``, ``temperature``, ``top_p``, ``top_k``,
  ``epsilon``/``epsilon_high``, ``max_staleness``, the learning rate and its schedule, the
  seed: the ``AsyncGRPOConfig`` fields of the same names;
* ``batch_size`` (completions per micro-batch) and ``gradient_accumulation_steps``: a
  fixed count of samples per micro-batch (``token_budget`` 0, TRL's ``FixedCountBatcher``);
* ``n_epochs``/``max_steps``: an explicit ``max_steps`` (epochs x rows x G completions
  over the step's samples), so the schedule's horizon is the run's length (TRL would
  otherwise stop on its epoch count under a far larger safety ceiling);
* graders: the same ``RewardFunction`` objects as the synchronous path; TRL scores in a
  spawned process, so they travel pickled;
* LoRA: the adapter; with a server started with ``--enable-lora`` TRL syncs the adapter
  alone, otherwise merged weights;
* the server: ``plan.vllm_server_url``, the server the worker started for the run.

The trainer loads the model itself from its path (``AsyncGRPOTrainer`` takes a model
id, not a model), with ``tree_fa3`` attention, and the runner loads none
(``loads_model``); ``trainer.build_kwargs`` adds what the
host needs (the CPU kernel, the weight transfer).
"""

from __future__ import annotations

import math
from typing import Any

from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

from trainers.algorithms.grpo_async.trainer import adapted_for_host, guard_worker_stop
from trainers.base import PosttrainTrainerMixin
from trainers.contract.errors import JobError
from trainers.contract.methods.grpo import GRPOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.records import prompt_records
from trainers.runner import MethodDef, TrainData, per_process_batch


class PosttrainAsyncGRPOTrainer(PosttrainTrainerMixin, AsyncGRPOTrainer):
    """TRL's ``AsyncGRPOTrainer`` built from the runner's arguments: the model's path
    (``loads_model``: the runner loads no copy of its own), no evaluation set (the
    contract refuses one)."""

    def __init__(
        self,
        model,
        args: AsyncGRPOConfig,
        train_dataset,
        processing_class,
        reward_funcs: list,
        eval_dataset=None,
        peft_config=None,
        callbacks=None,
    ):
        path = model if isinstance(model, str) else model.name_or_path
        del model  # the trainer loads the model itself, with tree attention
        with adapted_for_host(args, peft_config) as extra:
            super().__init__(
                path,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                peft_config=peft_config,
                **extra,
            )
        guard_worker_stop(self)


def records(rows: list, hp: GRPOHyperparameters | None = None, param: str = "") -> list:
    """Prompt rows; TRL's asynchronous rollout worker renders every prompt with the chat
    template, so a plain-text prompt (which the synchronous path continues as raw text)
    is refused rather than silently wrapped as a user message."""
    return check_messages(prompt_records(rows), param)


def check_messages(out: list[dict[str, Any]], param: str = "") -> list[dict[str, Any]]:
    """``out`` if every prompt is messages; else a JobError naming the first text row."""
    for i, row in enumerate(out):
        if isinstance(row.get("prompt"), str):
            raise JobError(
                "invalid_training_file",
                f"{param or 'training_file'} row {i + 1}: rollout_mode 'async' takes prompts as "
                "messages (TRL's asynchronous trainer applies the chat template to every "
                "prompt); give the row 'messages' or use rollout_mode 'sync'",
                param or "training_file",
            )
    return out


def planned_steps(plan: RunPlan, s: GRPOHyperparameters, data: TrainData) -> int:
    if s.max_steps:
        return s.max_steps
    per_step = per_process_batch(plan, s, len(data.train)) * s.gradient_accumulation_steps
    return max(1, math.ceil(s.resolved_epochs() * len(data.train) * s.generations() / per_step))


def config_fields(plan: RunPlan, hp: GRPOHyperparameters, data: TrainData) -> dict[str, Any]:
    s = plan.spec.method.settings()
    return {
        "num_generations": s.generations(),
        "max_completion_length": s.max_completion_length,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "epsilon": s.epsilon,
        "epsilon_high": s.epsilon_high,
        "max_staleness": s.max_staleness,
        "max_steps": planned_steps(plan, s, data),
        "token_budget": 0,
        "vllm_server_base_url": plan.vllm_server_url,
        "include_num_input_tokens_seen": "no",
        "log_completions": False,
        "dtype": "float32",
        "chat_template_kwargs": s.chat_template_kwargs(),  # reinforcement's reasoning_effort
    }


def events(plan: RunPlan, hp: GRPOHyperparameters, data: TrainData) -> list[str]:
    s = plan.spec.method.settings()
    return [
        f"Asynchronous rollouts: TRL's AsyncGRPOTrainer on the run's vLLM server, "
        f"{planned_steps(plan, s, data)} steps, samples at most {s.max_staleness} policy "
        f"version(s) old"
    ]


def trainer_kwargs(plan: RunPlan, model, data: TrainData) -> dict[str, Any]:
    from trainers.contract.graders.remote import merge_grader_secrets
    from trainers.contract.tools import pop_secrets_from_env
    from trainers.graders.reward import build_reward_function

    method = plan.spec.method
    secrets = pop_secrets_from_env()
    graders = merge_grader_secrets(method.block.grader_list(), secrets.get("grader_headers") or {})
    return {
        "reward_funcs": [
            build_reward_function(g, plan.tools, plan.python_graders, plan.judges) for g in graders
        ]
    }


METHOD = MethodDef(
    name="grpo_async",
    config_class=AsyncGRPOConfig,
    trainer_class=PosttrainAsyncGRPOTrainer,
    records=records,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
    events=events,
    loads_model=True,
)
