"""The GRPO family (GRPO, DAPO, Dr.GRPO, NGRPO, XRPO, HAPO) on TRL's ``GRPOTrainer``.

A job names a variant (``trainers/contract/methods/grpo.py``) and may override any of its
settings; the graders it lists become TRL reward functions, summed with
``reward_weights``. This module is the method's config mapping (resolved settings ->
``GRPOConfig``), row mapping (prompt rows, with every extra field kept as a column
the graders read) and trainer construction; the trainer itself is ``trainer.py``.
``reinforcement`` (OpenAI's name, one grader) runs here too.

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

Tools (``method.<type>.tools``): TRL's own tool loop (``tools=``,
``max_tool_calling_iterations`` = ``max_turns``) runs the job's HTTP tools
(``trainers.tools``) on either rollout engine: it calls the engine once per turn, so on
vLLM each turn is a vLLM generation and the tools run in the training process between
turns.

Environments (``method.<type>.environment``): the job's stateful HTTP environment
(``trainers.environments``) is TRL's ``environment_factory``; its actions join the tools
in the same loop, and its reward, when the job uses it, is one more reward source (weight
1, named ``environment``) after the graders.

Endpoint graders (``trainers.contract.graders.remote``) call under the same outbound
policy as the tools (``plan.tools``), their header values coming from the worker
beside the tools'. Remote judges (``trainers.contract.graders.judgeendpoints``) ask the
judge endpoints of the run plan (``plan.judges``).
"""

from __future__ import annotations

import os
from secrets import token_hex
from typing import Any

from trl import GRPOConfig

from trainers.algorithms.grpo.trainer import PosttrainGRPOTrainer
from trainers.contract.methods.grpo import GRPOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.models import use_vllm
from trainers.records import prompt_records
from trainers.runner import MethodDef, TrainData


def records(rows: list, hp: GRPOHyperparameters | None = None, param: str = "") -> list:
    return prompt_records(rows)


def _use_vllm(plan: RunPlan, s: GRPOHyperparameters) -> bool:
    if s.temperature_rule == "hapo_ats":  # per-prompt temperatures: generate() only
        return False
    return use_vllm(s.rollout_engine, f"{plan.spec.method.param}.rollout_engine")


def updates_per_generation(s: GRPOHyperparameters, rows: int) -> int:
    """The schedule's optimizer steps per generated batch, at most as many as the training
    file has steps' worth of prompts (TRL generates for all of them at once, and drops a
    rollout batch the file cannot fill)."""
    prompts_per_step = (
        s.resolved_batch_size(rows) // s.generations() * s.gradient_accumulation_steps
    )
    return max(1, min(s.steps_per_generation, rows // max(1, prompts_per_step)))


def events(plan: RunPlan, hp: GRPOHyperparameters, data: TrainData) -> list[str]:
    s = plan.spec.method.settings()
    fitted = updates_per_generation(s, len(data.train))
    schedule = f"{fitted} policy update(s) x {s.num_iterations} pass(es) per generated batch"
    if fitted < s.steps_per_generation:
        schedule += (
            f" (the recipe's {s.steps_per_generation} steps per generation need more prompts "
            f"than the training file's {len(data.train)})"
        )
    return [f"Update schedule: {schedule}"]


def config_fields(plan: RunPlan, hp: GRPOHyperparameters, data: TrainData) -> dict[str, Any]:
    s = plan.spec.method.settings()
    ats = s.temperature_rule == "hapo_ats"
    vllm = _use_vllm(plan, s)
    fields: dict[str, Any] = {
        "num_generations": s.generations(),
        "num_generations_eval": s.resolved_eval_samples(),
        "max_completion_length": s.max_completion_length,
        "temperature": 1.0 if ats else s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "num_iterations": s.num_iterations,
        # TRL counts micro-batches: one optimizer step is gradient_accumulation_steps of them
        "steps_per_generation": updates_per_generation(s, len(data.train))
        * s.gradient_accumulation_steps,
        "importance_sampling_level": s.importance_sampling_level,
        "beta": s.beta,
        "epsilon": s.epsilon,
        "epsilon_high": s.epsilon_high,
        "loss_type": s.loss_type,
        "scale_rewards": s.scale_rewards,
        "mask_truncated_completions": s.mask_truncated_completions,
        "reward_weights": s.reward_weights,
        "use_vllm": vllm,
        "log_completions": False,
        # TRL's GRPOTrainer counts prompt + completion tokens into the same state field
        "include_num_input_tokens_seen": "no",
        "chat_template_kwargs": s.chat_template_kwargs(),
    }
    if method_tools(plan) or method_environment(plan) is not None:
        fields["max_tool_calling_iterations"] = s.max_turns
    if vllm:
        fields["vllm_mode"] = s.vllm_mode
        if s.vllm_mode == "server":  # the worker started it and says where (see supervisor)
            fields["vllm_server_base_url"] = plan.vllm_server_url
    if data.eval is not None and s.eval_interval != "auto":
        fields["eval_steps"] = s.eval_interval
    return fields


def method_tools(plan: RunPlan) -> list:
    return getattr(plan.spec.method.block, "tools", None) or []


def method_environment(plan: RunPlan):
    return getattr(plan.spec.method.block, "environment", None)


def trainer_kwargs(plan: RunPlan, model, data: TrainData) -> dict[str, Any]:
    from trainers.algorithms.grpo.pieces import build_pieces
    from trainers.contract.graders.remote import merge_grader_secrets
    from trainers.contract.tools import pop_secrets_from_env
    from trainers.graders.reward import build_reward_function

    method = plan.spec.method
    settings = method.settings()
    secrets = pop_secrets_from_env()  # header values from the worker, never in the plan
    graders = merge_grader_secrets(method.block.grader_list(), secrets.get("grader_headers") or {})
    kwargs = {
        "reward_funcs": [
            build_reward_function(g, plan.tools, plan.python_graders, plan.judges) for g in graders
        ],
        "settings": settings,
        "pieces": build_pieces(settings),
    }
    if method_tools(plan) or method_environment(plan) is not None:
        kwargs["tools"], kwargs["pieces"]["tools"] = _tools(plan, settings, secrets)
        env = kwargs["pieces"]["tools"].get("environment")
        if env is not None:
            kwargs["environment_factory"] = env["factory"]
    return kwargs


def _tools(
    plan: RunPlan, s: GRPOHyperparameters, secrets: dict[str, Any]
) -> tuple[list, dict[str, Any]]:
    """The job's tools as TRL callables and its environment as TRL's factory (header
    values from the worker, not the plan), sharing one client, budgets and counts."""
    from trainers.contract.environments import merge_environment_secrets
    from trainers.contract.outbound import pinned_client
    from trainers.contract.tools import merge_secrets
    from trainers.environments import EnvironmentClient, EnvStats, environment_class
    from trainers.tools import HttpTool, ToolLimits, ToolStats

    limits = ToolLimits(
        timeout=s.tool_timeout_seconds,
        retries=s.tool_retries,
        max_reply_bytes=s.tool_max_reply_bytes,
        max_calls=s.max_tool_calls,
        episode_seconds=s.episode_tool_seconds,
    )
    stats = ToolStats()
    client = pinned_client(plan.tools.check)  # every call checked, and sent where approved
    tools = merge_secrets(method_tools(plan), secrets.get("tool_headers") or {})
    callables = [HttpTool(t, plan.tools, limits, stats, client) for t in tools]
    pieces: dict[str, Any] = {"limits": limits, "stats": stats}
    spec = method_environment(plan)
    if spec is not None:
        spec = merge_environment_secrets(spec, secrets.get("environment_headers") or {})
        env_stats = EnvStats()
        env = EnvironmentClient(spec, plan.tools, limits, client, env_stats)
        # a token per process start: a resumed run never reuses an earlier run's ids
        prefix = f"{plan.job_id}-{os.environ.get('RANK', '0')}-{token_hex(3)}"
        pieces["environment"] = {
            "factory": environment_class(env, limits, stats, prefix),
            "schemas": spec.schemas(),
            "stats": env_stats,
        }
    return callables, pieces


METHOD = MethodDef(
    name="grpo",
    config_class=GRPOConfig,
    trainer_class=PosttrainGRPOTrainer,
    records=records,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
    events=events,
)
