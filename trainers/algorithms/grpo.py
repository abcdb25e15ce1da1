"""The GRPO family (GRPO, DAPO, Dr.GRPO, NGRPO, XRPO, HAPO) on TRL's ``GRPOTrainer``.

A job names a variant (``trainers/grpo_presets.py``) and may override any of its
settings; the graders it lists become TRL reward functions, summed with
``reward_weights``. This module is the method's config mapping (settings ->
``GRPOConfig``), data mapping (prompt rows, with every extra field kept as a
column the graders read) and trainer construction; the trainer itself is
``trainers/algorithms/grpo_trainer.py``.

Rollouts: TRL's vLLM integration when the job asks for it (``rollout_engine``
``vllm``, or ``auto`` on a GPU host where vLLM imports), ``colocate`` or
``server`` mode; otherwise transformers ``generate`` (CPU, tests, demo).
HAPO's per-token temperature needs the transformers path; XRPO's planner works
on both, since it only changes which prompts are sampled how often.

Departures: with the ``hapo_ats`` temperature rule, generation runs with the
rule's per-token temperature around ``temperature`` and training log-probs are
taken at temperature 1 (the untempered policy is what is trained).
OpenAI's ``reasoning_effort`` is passed to the chat template as a keyword
(templates that do not read it ignore it).
"""

from __future__ import annotations

from typing import Any

from trl import GRPOConfig

from trainers.algorithms.grpo_trainer import PosttrainGRPOTrainer
from trainers.data import _messages, build_dataset, read_rows
from trainers.grpo_presets import GRPOSettings, resolve
from trainers.hparams import GRPOHyperparameters
from trainers.models import use_vllm
from trainers.plan import RunPlan
from trainers.rows import ChatPromptRow
from trainers.runner import MethodDef, TrainData
from trainers.spec import GRPOMethod


def grpo_config_of(plan: RunPlan):
    """(the method's config block, its hyperparameters, resolved settings) of a job."""
    method = plan.spec.method
    block = method.grpo if method.type == "grpo" else method.reinforcement
    hp = block.hyperparameters
    return block, hp, resolve(block.variant, hp)


def _prompt_record(row) -> dict[str, Any]:
    extra = dict(row.model_extra or {})
    if isinstance(row, ChatPromptRow):
        prompt = _messages(row.messages)  # OpenAI's "developer" turn is a system turn
    elif isinstance(row.prompt, str):
        prompt = row.prompt
    else:
        prompt = _messages(row.prompt)
    return {"prompt": prompt, **extra}


def _prompt_dataset(rows):
    """One dataset column type each: a file mixing text and chat prompts becomes chat (a
    text prompt is one user turn), and a field only some rows carry is None on the rest."""
    records = [_prompt_record(r) for r in rows]
    if any(not isinstance(r["prompt"], str) for r in records):
        for r in records:
            if isinstance(r["prompt"], str):
                r["prompt"] = [{"role": "user", "content": r["prompt"]}]
    keys = list(dict.fromkeys(k for r in records for k in r))
    return build_dataset([{k: r.get(k) for k in keys} for r in records])


def datasets(plan: RunPlan) -> TrainData:
    fmt, rows = read_rows(plan.training_path, GRPOMethod.accepted_formats, "training_file")
    train = _prompt_dataset(rows)
    evals = None
    if plan.validation_path:
        _, vrows = read_rows(plan.validation_path, (fmt,), "validation_file")
        evals = _prompt_dataset(vrows)
    return TrainData(fmt, train, evals)


def _use_vllm(hp: GRPOHyperparameters, s: GRPOSettings) -> bool:
    if s.temperature_rule == "hapo_ats":  # per-prompt temperatures: generate() only
        return False
    return use_vllm(hp.rollout_engine, "method.grpo.hyperparameters.rollout_engine")


def config_fields(plan: RunPlan, hp: GRPOHyperparameters, data: TrainData) -> dict[str, Any]:
    block, hp, s = grpo_config_of(plan)
    ats = s.temperature_rule == "hapo_ats"
    vllm = _use_vllm(hp, s)
    fields: dict[str, Any] = {
        "num_generations": hp.generations(),
        "num_generations_eval": hp.resolved_eval_samples(),
        "max_completion_length": hp.max_completion_length,
        "temperature": 1.0 if ats else hp.temperature,
        "top_p": hp.top_p,
        "top_k": hp.top_k,
        "num_iterations": hp.num_iterations,
        "importance_sampling_level": hp.importance_sampling_level,
        "beta": s.beta,
        "epsilon": s.epsilon,
        "epsilon_high": s.epsilon_high,
        "loss_type": s.loss_type,
        "scale_rewards": s.scale_rewards,
        "mask_truncated_completions": s.mask_truncated_completions,
        "reward_weights": hp.reward_weights,
        "use_vllm": vllm,
        "log_completions": False,
        # TRL's GRPOTrainer counts prompt + completion tokens into the same state field
        "include_num_input_tokens_seen": "no",
        "chat_template_kwargs": _chat_template_kwargs(block),
    }
    if vllm:
        fields["vllm_mode"] = hp.vllm_mode
        if hp.vllm_mode == "server":  # the worker started it and says where (see supervisor)
            fields["vllm_server_base_url"] = plan.vllm_server_url
    if data.eval is not None and hp.eval_interval != "auto":
        fields["eval_steps"] = hp.eval_interval
    return fields


def _chat_template_kwargs(block) -> dict[str, Any] | None:
    effort = getattr(block.hyperparameters, "reasoning_effort", "auto")
    return None if effort in (None, "auto") else {"reasoning_effort": effort}


def trainer_kwargs(plan: RunPlan, model, data: TrainData) -> dict[str, Any]:
    from trainers.algorithms.grpo_pieces import build_pieces
    from trainers.graders.registry import build_reward_function

    block, hp, settings = grpo_config_of(plan)
    graders = block.graders if hasattr(block, "graders") else [block.grader]
    return {
        "reward_funcs": [build_reward_function(g) for g in graders],
        "settings": settings,
        "pieces": build_pieces(settings, hp),
    }


METHOD = MethodDef(
    name="grpo",
    config_class=GRPOConfig,
    trainer_class=PosttrainGRPOTrainer,
    datasets=datasets,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
)
