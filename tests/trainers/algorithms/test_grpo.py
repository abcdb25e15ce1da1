"""GRPO family: the config and data mappings, loss parity with TRL, vLLM mapping, real runs.

Parity: for the presets TRL computes itself (grpo, dapo, dr_grpo), ``PosttrainGRPOTrainer``
on posttrain's kernel gives the loss and gradients of TRL's own ``GRPOTrainer`` on TRL's
kernel, for the same generated batch (fp32). When posttrain's own objective path runs
(``trl_native`` False) with settings that mean the same thing as TRL's (a dual clip that
can never bind), its loss and gradients equal TRL's ``_compute_loss`` for every
aggregation, with and without the KL term. The runs go through the shared runner, as a
job does: LoRA trains the adapter only, full training moves the weights, and the XRPO
planner's history and HAPO's temperature statistics are saved with each checkpoint and
loaded again on resume.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from trainers import fused_head
from trainers.algorithms.grpo.method import METHOD
from trainers.algorithms.grpo.trainer import STATE_FILE, PosttrainGRPOTrainer
from trainers.contract.errors import JobError
from trainers.contract.graders.scoring import grade_batch
from trainers.contract.methods.grpo import PRESETS, resolve, trl_native
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.core.rollout import XrpoPlanner
from trainers.core.temperature import HapoAdaptiveTemperature
from trainers.reporting import Reporter
from trainers.runner import TrainData, common_config, read_data, run_method
from trainers.tiny_model import build_tiny_model

# Continuous rewards in [-1, 0] from a completion's length in characters: groups of random
# completions almost never tie, so advantages are non-zero.
LENGTH = {
    "type": "length_penalty",
    "name": "short",
    "input": "{{sample.output_text}}",
    "max_length": 40,
    "target_length": 8,
    "unit": "characters",
}
CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
PROMPTS = [
    {"prompt": [{"role": "user", "content": f"Count to {i}, please."}], "answer": str(i)}
    for i in range(4)
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_plan(
    root: Path,
    variant: str = "grpo",
    hp: dict | None = None,
    *,
    method: str = "grpo",
    graders: list[dict] | None = None,
    model: str = "tiny",
    rows: list[dict] | None = None,
    **spec_fields,
) -> RunPlan:
    graders = graders or [LENGTH]
    if method == "grpo":
        block = {"variant": variant, "graders": graders, "hyperparameters": hp or {}}
    else:
        block = {"variant": variant, "grader": graders[0], "hyperparameters": hp or {}}
    spec = JobSpec.model_validate(
        {
            "model": model,
            "training_file": "file-x",
            "method": {"type": method, method: block},
            **spec_fields,
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in (rows or PROMPTS)) + "\n")
    return RunPlan(
        job_id="j",
        spec=spec,
        training_path=train,
        output_dir=root / "out",
        data_dir=root,
        checkpoint_every_steps=spec_fields.get("checkpoint_every_steps") or 100,
    )


def config_dict(plan: RunPlan, data: TrainData | None = None) -> dict:
    data = data or TrainData(format="prompt_only", train=list(range(20)))
    hp = plan.spec.method_hyperparameters()
    return {**common_config(plan, hp, data), **METHOD.config_fields(plan, hp, data)}


def config_for(plan: RunPlan) -> GRPOConfig:
    return GRPOConfig(**config_dict(plan))


def settings_of(plan: RunPlan):
    return plan.spec.method.settings()


# ----------------------------------------------------------------------------- config mapping
def test_trl_presets_become_trls_own_config(tmp_path):
    cfg = config_for(make_plan(tmp_path, "grpo"))
    assert (cfg.loss_type, cfg.beta, cfg.epsilon, cfg.epsilon_high) == ("grpo", 0.04, 0.2, 0.2)
    assert cfg.scale_rewards == "group" and cfg.mask_truncated_completions is False

    cfg = config_for(make_plan(tmp_path, "dapo"))
    assert (cfg.loss_type, cfg.beta, cfg.epsilon, cfg.epsilon_high) == ("dapo", 0.0, 0.2, 0.28)
    assert cfg.mask_truncated_completions is True and cfg.scale_rewards == "group"

    cfg = config_for(make_plan(tmp_path, "dr_grpo"))
    assert (cfg.loss_type, cfg.beta, cfg.scale_rewards) == ("dr_grpo", 0.0, "none")
    assert cfg.mask_truncated_completions is False

    for variant in ("grpo", "dapo", "dr_grpo"):
        assert trl_native(settings_of(make_plan(tmp_path, variant))), variant
    for variant in ("ngrpo", "xrpo", "hapo"):
        assert not trl_native(settings_of(make_plan(tmp_path, variant))), variant
    assert set(PRESETS) == {"grpo", "dapo", "dr_grpo", "ngrpo", "xrpo", "hapo"}


def test_hyperparameters_override_the_preset(tmp_path):
    plan = make_plan(tmp_path, "grpo", {"beta": 0.0, "loss_type": "bnpo"})
    cfg = config_for(plan)
    assert (cfg.beta, cfg.loss_type, cfg.epsilon, cfg.epsilon_high) == (0.0, "bnpo", 0.2, 0.2)
    assert trl_native(settings_of(plan))  # still TRL's own computation

    plan = make_plan(
        tmp_path,
        "dapo",
        {"epsilon_high": 0.35, "mask_truncated_completions": False, "scale_rewards": "batch"},
    )
    cfg = config_for(plan)
    assert (cfg.epsilon_high, cfg.mask_truncated_completions) == (0.35, False)
    assert (cfg.scale_rewards, cfg.loss_type) == ("batch", "dapo")

    # a dual clip is not something TRL computes: posttrain's objective takes over
    plan = make_plan(tmp_path, "grpo", {"dual_clip": 3.0})
    assert settings_of(plan).dual_clip == 3.0 and not trl_native(settings_of(plan))

    # the generation settings reach TRL as given; HAPO samples at temperature 1 in TRL's
    # sampler and applies its own per-token rule around the requested temperature
    hp = {
        "num_generations": 4,
        "max_completion_length": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "num_iterations": 2,
        "eval_samples": 3,
    }
    cfg = config_for(make_plan(tmp_path, "grpo", hp))
    assert (cfg.num_generations, cfg.max_completion_length, cfg.temperature) == (4, 32, 0.7)
    assert (cfg.top_p, cfg.top_k, cfg.num_iterations, cfg.num_generations_eval) == (
        0.9,
        20,
        2,
        3,
    )
    assert cfg.per_device_train_batch_size == 8  # auto = two prompts' groups
    assert cfg.learning_rate == pytest.approx(1e-6)
    assert config_for(make_plan(tmp_path, "hapo", hp)).temperature == 1.0


def test_dr_grpo_estimator_refuses_scaled_rewards(tmp_path):
    with pytest.raises(ValidationError, match="centres rewards without scaling"):
        make_plan(tmp_path, "dr_grpo", {"scale_rewards": "group"})
    assert resolve("grpo", make_plan(tmp_path).spec.method.grpo.hyperparameters).beta == 0.04


def test_compute_multiplier_scales_completions_per_prompt(tmp_path):
    def gens(hp):
        plan = make_plan(tmp_path, hp=hp, method="reinforcement")
        return config_for(plan).num_generations

    assert gens({"num_generations": 4}) == 4
    assert gens({"num_generations": 4, "compute_multiplier": "auto"}) == 4
    assert gens({"num_generations": 4, "compute_multiplier": 1.5}) == 6
    assert gens({"num_generations": 8, "compute_multiplier": 0.5}) == 4
    assert gens({"num_generations": 4, "compute_multiplier": 0.1}) == 2  # at least 2
    # batch_size counts completions: it must hold whole groups of the scaled size
    with pytest.raises(ValidationError, match="multiple of num_generations"):
        make_plan(
            tmp_path,
            hp={"num_generations": 4, "compute_multiplier": 1.5, "batch_size": 8},
            method="reinforcement",
        )
    with pytest.raises(ValidationError, match="compute_multiplier must be > 0"):
        make_plan(tmp_path, hp={"compute_multiplier": 0}, method="reinforcement")


def test_reward_weights_need_one_weight_per_grader(tmp_path):
    with pytest.raises(ValidationError, match="reward_weights has 1 entries for 2 graders"):
        make_plan(tmp_path, hp={"reward_weights": [1.0]}, graders=[LENGTH, CHECK])
    with pytest.raises(ValidationError, match="reward_weights has 2 entries for 1 graders"):
        make_plan(tmp_path, hp={"reward_weights": [1.0, 2.0]}, method="reinforcement")
    plan = make_plan(tmp_path, hp={"reward_weights": [0.5, 2.0]}, graders=[LENGTH, CHECK])
    assert config_for(plan).reward_weights == [0.5, 2.0]
    assert config_for(make_plan(tmp_path, graders=[LENGTH, CHECK])).reward_weights is None


def test_reasoning_effort_reaches_the_chat_template(tmp_path):
    plan = make_plan(tmp_path, hp={"reasoning_effort": "high"}, method="reinforcement")
    assert config_for(plan).chat_template_kwargs == {"reasoning_effort": "high"}
    plan = make_plan(tmp_path, method="reinforcement")
    assert not config_for(plan).chat_template_kwargs


# ----------------------------------------------------------------------------- vLLM mapping
@pytest.fixture
def vllm_available(monkeypatch):
    """A GPU host with vLLM installed, as grpo.py detects one."""
    find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return object() if name == "vllm" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)


def fields_for(plan: RunPlan) -> dict:
    hp = plan.spec.method_hyperparameters()
    data = TrainData(format="prompt_only", train=list(range(20)))
    return METHOD.config_fields(plan, hp, data)


def test_vllm_colocate_and_server_modes(tmp_path, vllm_available):
    fields = fields_for(make_plan(tmp_path, hp={"rollout_engine": "vllm"}))
    assert fields["use_vllm"] is True and fields["vllm_mode"] == "colocate"
    assert "vllm_server_base_url" not in fields
    fields = fields_for(make_plan(tmp_path))  # auto on a host that has vLLM
    assert fields["use_vllm"] is True and fields["vllm_mode"] == "colocate"

    plan = make_plan(tmp_path, hp={"rollout_engine": "vllm", "vllm_mode": "server"})
    plan = plan.model_copy(update={"vllm_server_url": "http://127.0.0.1:8123"})
    fields = fields_for(plan)
    assert fields["use_vllm"] is True and fields["vllm_mode"] == "server"
    assert fields["vllm_server_base_url"] == "http://127.0.0.1:8123"

    assert (
        fields_for(make_plan(tmp_path, hp={"rollout_engine": "transformers"}))["use_vllm"] is False
    )


def test_hapo_temperature_never_uses_vllm(tmp_path, vllm_available):
    assert fields_for(make_plan(tmp_path, "hapo"))["use_vllm"] is False
    assert fields_for(make_plan(tmp_path, "xrpo"))["use_vllm"] is True  # the planner works on vLLM
    with pytest.raises(ValidationError, match=r"hapo_ats.*rollout_engine 'transformers'"):
        make_plan(tmp_path, "hapo", {"rollout_engine": "vllm"})
    with pytest.raises(ValidationError, match="hapo_ats"):
        make_plan(tmp_path, "grpo", {"temperature_rule": "hapo_ats", "rollout_engine": "vllm"})


def test_vllm_without_a_gpu_is_a_job_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(JobError) as err:
        fields_for(make_plan(tmp_path, hp={"rollout_engine": "vllm"}))
    assert err.value.code == "rollout_engine_unavailable"
    assert err.value.param == "method.grpo.hyperparameters.rollout_engine"
    assert fields_for(make_plan(tmp_path))["use_vllm"] is False  # auto falls back quietly


# ----------------------------------------------------------------------------- data mapping
def test_prompt_rows_keep_their_extra_fields(tmp_path):
    rows = [
        {"prompt": "2+2=", "answer": "4", "label": "easy"},
        {"prompt": "3+3=", "answer": "6", "label": "easy"},
    ]
    data = read_data(METHOD, make_plan(tmp_path / "text", rows=rows))
    assert str(data.format) == "prompt_only"
    assert [data.train[i] for i in range(2)] == rows

    user = {"role": "user", "content": "2+2="}
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, user], "answer": "4"},
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "3+3="}]}],
            "answer": "6",
        },
    ]
    data = read_data(METHOD, make_plan(tmp_path / "chat", rows=rows))
    assert data.train[0] == {
        "prompt": [{"role": "system", "content": "Be brief."}, user],
        "answer": "4",
    }
    assert data.train[1] == {"prompt": [{"role": "user", "content": "3+3="}], "answer": "6"}

    rows = [{"prompt": [user], "answer": "4"}]  # TRL's conversational prompt-only row
    data = read_data(METHOD, make_plan(tmp_path / "trl", rows=rows))
    assert data.train[0] == {"prompt": [user], "answer": "4"}


def test_openai_developer_turns_become_system_turns(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ]
        }
    ]
    data = read_data(METHOD, make_plan(tmp_path, rows=rows))
    assert data.train[0]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_a_file_mixing_text_and_chat_prompts_becomes_one_conversational_dataset(tmp_path):
    rows = [
        {"prompt": "2+2=", "answer": "4"},
        {"messages": [{"role": "user", "content": "3+3="}], "answer": "6", "hint": "add"},
    ]
    data = read_data(METHOD, make_plan(tmp_path, rows=rows))
    assert data.train[0] == {
        "prompt": [{"role": "user", "content": "2+2="}],
        "answer": "4",
        "hint": None,  # a field only some rows have is kept, empty on the others
    }
    assert data.train[1]["prompt"] == [{"role": "user", "content": "3+3="}]
    assert data.train[1]["hint"] == "add"


def test_a_chat_ending_with_an_assistant_turn_is_not_a_prompt(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "2+2="}], "answer": "4"},
        {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]},
    ]
    with pytest.raises(JobError) as err:
        read_data(METHOD, make_plan(tmp_path, rows=rows))
    assert err.value.code == "invalid_training_file" and err.value.param == "training_file"
    assert "line 2" in err.value.message


# ----------------------------------------------------------------------------- loss parity
def _tiny(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _trainers(model_dir: Path, plan: RunPlan):
    """posttrain's trainer from the method's own mapping, and TRL's on the same config."""
    data = read_data(METHOD, plan)
    fields = config_dict(plan, data)
    # bias generation toward <|end|> so completions end at varied lengths (and some are
    # truncated, which dapo masks); the loss is computed without the bias
    fields["generation_kwargs"] = {"sequence_bias": {(1,): 5.0}}
    args = GRPOConfig(**fields)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token_id == 1
    kwargs = METHOD.trainer_kwargs(plan, None, data)
    ours = METHOD.trainer_class(
        model=_tiny(model_dir),
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        **kwargs,
    )
    with fused_head.trl_kernel():
        theirs = GRPOTrainer(
            model=_tiny(model_dir),
            args=args,
            train_dataset=data.train,
            processing_class=tokenizer,
            reward_funcs=METHOD.trainer_kwargs(plan, None, data)["reward_funcs"],
        )
    ours.model.train()
    theirs.model.train()
    return ours, theirs, data


def _batch(trainer, data, generations: int, seed: int = 0) -> dict:
    """One generation batch, rows repeated as TRL's sampler does, old/ref log-probs nudged."""
    prompts = trainer.args.generation_batch_size // generations
    assert prompts <= len(data.train)
    rows = [data.train[i] for i in range(prompts) for _ in range(generations)]
    torch.manual_seed(seed)
    with fused_head.posttrain_kernel():
        batch = trainer._generate_and_score_completions(rows)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attn, batch["completion_ids"].size(1)
            )
    gen = torch.Generator().manual_seed(seed + 1)
    # the policy moved since sampling (ratios around 1, some beyond the clip range) ...
    batch["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    if "ref_per_token_logps" in batch:  # ... and away from the reference
        ref = batch["ref_per_token_logps"]
        batch["ref_per_token_logps"] = ref + 0.3 * torch.randn(ref.shape, generator=gen)
    return batch


def _loss_and_grads(trainer, batch):
    """Loss and gradients of one optimiser step: the batch split into the trainer's
    accumulation steps as TRL's ``_prepare_inputs`` splits a generation batch."""
    steps = trainer.args.gradient_accumulation_steps
    trainer.current_gradient_accumulation_steps = steps  # set by the training loop
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    for micro in split_tensor_dict(batch, steps):
        loss = trainer.compute_loss(trainer.model, micro)
        loss.backward()
        total += loss.detach()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return total, grads


def max_relative_difference(grads: dict, ref: dict) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref|."""
    return max(
        ((g - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)).item()
        for n, g in grads.items()
    )


def _assert_same(loss, grads, ref_loss, ref_grads):
    assert loss.item() != 0.0
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    ours_apply = fused_head.PosttrainLogProbFunction.apply

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return ours_apply(*args, **kwargs)

    monkeypatch.setattr(fused_head.PosttrainLogProbFunction, "apply", staticmethod(counted))
    return calls


HP = {"num_generations": 4, "max_completion_length": 12}


@pytest.mark.parametrize("variant", ["grpo", "dapo", "dr_grpo"])
def test_trl_presets_give_trls_loss_and_gradients(model_dir, tmp_path, kernel_calls, variant):
    plan = make_plan(tmp_path, variant, HP)
    ours, theirs, data = _trainers(model_dir, plan)
    assert trl_native(ours.pt_settings)
    batch = _batch(ours, data, HP["num_generations"])
    mask = batch["completion_mask"]
    assert 0 < mask.sum() and mask.sum(1).unique().numel() > 2  # varied completion lengths
    assert batch["advantages"].abs().max() > 0
    assert ("ref_per_token_logps" in batch) == (variant == "grpo")  # grpo's beta is 0.04

    calls = len(kernel_calls)
    with fused_head.posttrain_kernel():
        loss, grads = _loss_and_grads(ours, batch)
    assert len(kernel_calls) == calls + 1  # posttrain's kernel scored the policy
    with fused_head.trl_kernel():
        ref_loss, ref_grads = _loss_and_grads(theirs, batch)
    assert len(kernel_calls) == calls + 1  # ... and TRL's trainer ran TRL's kernel

    _assert_same(loss, grads, ref_loss, ref_grads)
    metrics = ours._metrics["train"]
    assert metrics["clip_ratio/region_mean"][-1] > 0  # clipping mattered
    assert metrics["clip_ratio/region_mean"][-1] < 1
    if variant == "grpo":
        assert metrics["kl"][-1] == pytest.approx(theirs._metrics["train"]["kl"][-1], rel=1e-5)
        assert metrics["kl"][-1] > 0


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_posttrains_objective_equals_trls_loss(model_dir, tmp_path, loss_type, beta):
    # a dual clip this wide can never bind: posttrain's own objective and aggregation run,
    # computing what TRL's loss computes; two accumulation steps per generated batch, so
    # dapo's step-wide token count differs from a micro-batch's
    hp = {**HP, "dual_clip": 1e9, "loss_type": loss_type, "beta": beta}
    plan = make_plan(tmp_path, "grpo", {**hp, "gradient_accumulation_steps": 2})
    ours, theirs, data = _trainers(model_dir, plan)
    assert not trl_native(ours.pt_settings) and ours.args.steps_per_generation == 2
    batch = _batch(ours, data, HP["num_generations"])
    assert ("ref_per_token_logps" in batch) == (beta != 0.0)
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()

    with fused_head.posttrain_kernel():
        loss, grads = _loss_and_grads(ours, batch)
    with fused_head.trl_kernel():
        ref_loss, ref_grads = _loss_and_grads(theirs, batch)
    metrics = ours._metrics["train"]
    assert metrics["clip_ratio/dual_mean"] == [0.0, 0.0]  # posttrain's objective ran; c never bound
    assert metrics["clip_ratio/region_mean"][-1] > 0
    for name in ("clip_ratio/low_min", "clip_ratio/high_max", "clip_ratio/region_mean"):
        assert metrics[name] == pytest.approx(theirs._metrics["train"][name], rel=1e-6), name
    _assert_same(loss, grads, ref_loss, ref_grads)
    if beta:
        assert metrics["kl"][-1] == pytest.approx(theirs._metrics["train"]["kl"][-1], rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_posttrains_objective_corrects_for_vllm_sampling_as_trl_does(model_dir, tmp_path, beta):
    """With vLLM's importance-sampling correction, TRL scales the policy term by the
    sampler ratio and adds the KL term unscaled; posttrain's objective path does the same."""
    hp = {**HP, "dual_clip": 1e9, "loss_type": "bnpo", "beta": beta}
    hp["gradient_accumulation_steps"] = 2
    ours, theirs, data = _trainers(model_dir, make_plan(tmp_path, "grpo", hp))
    batch = _batch(ours, data, HP["num_generations"])
    gen = torch.Generator().manual_seed(7)
    shape = batch["completion_mask"].shape
    batch["importance_sampling_ratio"] = torch.rand(shape, generator=gen) * 1.5 + 0.25
    for t in (ours, theirs):  # what a vLLM rollout sets; the loss reads nothing else of it
        t.use_vllm, t.vllm_importance_sampling_correction = True, True
    with fused_head.posttrain_kernel():
        loss, grads = _loss_and_grads(ours, batch)
    with fused_head.trl_kernel():
        ref_loss, ref_grads = _loss_and_grads(theirs, batch)
    _assert_same(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_posttrains_objective_leaves_tool_results_out_of_the_loss_as_trl_does(
    model_dir, tmp_path, loss_type
):
    """A tool episode's result tokens (``tool_mask`` 0) are attended to but not trained on:
    TRL's loss multiplies them out, and so does posttrain's objective path (hapo, a dual
    clip), in the policy term, the KL term, the aggregation and the entropy metric."""
    hp = {**HP, "dual_clip": 1e9, "loss_type": loss_type, "beta": 0.04}
    ours, theirs, data = _trainers(model_dir, make_plan(tmp_path, "grpo", hp))
    batch = _batch(ours, data, HP["num_generations"])
    tool_mask = torch.ones_like(batch["completion_mask"])
    tool_mask[::2, 2:5] = 0  # a tool's result inside every other completion
    batch["tool_mask"] = tool_mask
    # dapo's step-wide count is of model tokens only, as TRL counts it with tools
    batch["num_items_in_batch"] = (batch["completion_mask"] * tool_mask).sum()
    assert (batch["completion_mask"] * (1 - tool_mask)).sum() > 0
    with fused_head.posttrain_kernel():
        loss, grads = _loss_and_grads(ours, batch)
    with fused_head.trl_kernel():
        ref_loss, ref_grads = _loss_and_grads(theirs, batch)
    _assert_same(loss, grads, ref_loss, ref_grads)
    mine, trls = ours._metrics["train"], theirs._metrics["train"]
    for name in ("entropy", "kl", "clip_ratio/region_mean"):
        assert mine[name][-1] == pytest.approx(trls[name][-1], rel=1e-5), name


# ----------------------------------------------------------------------------- real runs
RUN_HP = {
    "num_generations": 4,
    "batch_size": 8,
    "max_completion_length": 8,
    "learning_rate": 5e-3,
}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture
def trained(monkeypatch):
    """The trainers run_method builds, captured when they start training."""
    seen: list[PosttrainGRPOTrainer] = []
    train = PosttrainGRPOTrainer.train

    def spy(self, *args, **kwargs):
        seen.append(self)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(PosttrainGRPOTrainer, "train", spy)
    return seen


def test_lora_trains_the_adapter_and_leaves_the_base_weights(model_dir, tmp_path, trained):
    plan = make_plan(
        tmp_path,
        "grpo",
        {**RUN_HP, "max_steps": 3},
        model=str(model_dir),
        training_type="lora",
        lora={"r": 4, "alpha": 8},
    )
    result = run_method(METHOD, plan, Reporter())
    assert result.step == 3 and not result.paused
    ckpt = tmp_path / result.checkpoint
    assert not (ckpt / "model.safetensors").exists()
    adapter = _weights(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    lora_b = [w for k, w in adapter.items() if "lora_B" in k]
    assert lora_b and sum(bool(w.abs().max() > 0) for w in lora_b) > len(lora_b) // 2  # init 0

    base = _weights(model_dir / "model.safetensors")
    (trainer,) = trained
    state = trainer.model.state_dict()
    checked = 0
    for name, w in state.items():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in base:
            torch.testing.assert_close(w, base[key], rtol=0, atol=0, msg=name)
            checked += 1
    assert checked == len(base)


def test_full_training_moves_the_weights(model_dir, tmp_path):
    # DAPO leaves completions cut at max_completion_length out of the loss, and a random
    # tiny model rarely ends one within 8 tokens: keep them, so every step has a gradient
    hp = {**RUN_HP, "max_steps": 3, "mask_truncated_completions": False}
    plan = make_plan(tmp_path, "dapo", hp, model=str(model_dir))
    reporter = Reporter()
    result = run_method(METHOD, plan, reporter)
    assert result.step == 3 and result.trained_tokens > 0
    before = _weights(model_dir / "model.safetensors")
    after = _weights(tmp_path / result.checkpoint / "model.safetensors")
    assert after.keys() == before.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before)
    logs = [m for m in reporter.sent if m.type == "log"]
    assert [m.step for m in logs] == [1, 2, 3]
    # DAPO's recipe takes several updates per generated batch (2 with 4 prompts, 2 a step):
    # rewards are logged on the steps that generate, a loss on every step
    generated = [m.step for m in logs if "reward" in m.metrics and "advantages/std" in m.metrics]
    assert generated == [1, 3] and all("loss" in m.metrics for m in logs)
    # one sample per generated batch (every step by default): its first 4 rows, one group
    samples = [m for m in reporter.sent if m.type == "samples"]
    assert [m.step for m in samples] == [1, 3] and all(len(m.rows) == 4 for m in samples)
    for row in (r for m in samples for r in m.rows):
        # the prompt as the model saw it: the tiny model's chat template around the turn
        assert row.prompt.startswith("<|user|>Count to ") and row.prompt.endswith("<|assistant|>")
        assert row.group == 0 and 0 < row.completion_tokens <= hp["max_completion_length"]
        (expected,) = grade_batch(LENGTH, [{}], [row.completion])  # the grader, rerun
        assert (
            row.rewards == {"short": pytest.approx(expected)} and row.reward == row.rewards["short"]
        )
        assert row.truncated == (row.completion_tokens == hp["max_completion_length"])


def _state(plan: RunPlan, step: int) -> dict:
    return json.loads((plan.output_dir / f"checkpoint-{step}" / STATE_FILE).read_text())


def _resume(plan: RunPlan, steps: int) -> tuple[RunPlan, Reporter]:
    hp = plan.spec.method_hyperparameters().model_copy(update={"max_steps": steps})
    spec = plan.spec.model_copy(deep=True)
    getattr(spec.method, spec.method.type).hyperparameters = hp
    return plan.model_copy(update={"spec": spec}), Reporter()


def test_the_xrpo_planner_history_travels_with_checkpoints(model_dir, tmp_path, monkeypatch):
    plan = make_plan(
        tmp_path,
        "xrpo",
        {**RUN_HP, "max_steps": 4},
        model=str(model_dir),
        checkpoint_every_steps=2,
        rows=PROMPTS[:3],  # 2 prompts a step out of 3: prompts are revisited
    )
    assert run_method(METHOD, plan, Reporter()).step == 4
    at2, at4 = _state(plan, 2), _state(plan, 4)
    assert at2["temperature"] is None
    assert at2["planner"]["step"] == 2 and at4["planner"]["step"] == 4
    assert len(at2["planner"]["prompts"]) == 3 and len(at4["planner"]["prompts"]) == 3
    # every prompt's rollouts counted: 8 completions a step
    assert sum(p[0] for p in at4["planner"]["prompts"].values()) == 4 * 8

    loaded = []
    load = XrpoPlanner.load_state_dict
    monkeypatch.setattr(
        XrpoPlanner, "load_state_dict", lambda self, s: (loaded.append(s), load(self, s))[1]
    )
    plan6, reporter = _resume(plan, 6)
    assert run_method(METHOD, plan6, reporter).step == 6
    assert any(m.type == "event" and m.message.startswith("Resumed") for m in reporter.sent)
    assert loaded == [at4["planner"]]
    at6 = _state(plan, 6)["planner"]
    assert at6["step"] == 6  # the step counter continued from 4
    assert sum(p[0] for p in at6["prompts"].values()) == 6 * 8
    logs = [m for m in reporter.sent if m.type == "log"]
    assert [m.metrics["rollout/step"] for m in logs] == [5.0, 6.0]


def test_hapo_temperature_statistics_travel_with_checkpoints(model_dir, tmp_path, monkeypatch):
    plan = make_plan(
        tmp_path,
        "hapo",
        {**RUN_HP, "max_steps": 4},
        model=str(model_dir),
        checkpoint_every_steps=2,
    )
    assert run_method(METHOD, plan, Reporter()).step == 4
    at2, at4 = _state(plan, 2), _state(plan, 4)
    assert at2["planner"] is None
    assert at2["temperature"]["stats"] is not None and at4["temperature"]["stats"] is not None
    assert at2["temperature"] != at4["temperature"]  # fresh entropies each step

    loaded = []
    load = HapoAdaptiveTemperature.load_state_dict
    monkeypatch.setattr(
        HapoAdaptiveTemperature,
        "load_state_dict",
        lambda self, s: (loaded.append(s), load(self, s))[1],
    )
    plan6, reporter = _resume(plan, 6)
    assert run_method(METHOD, plan6, reporter).step == 6
    assert loaded == [at4["temperature"]]
    logs = [m for m in reporter.sent if m.type == "log"]
    assert [m.step for m in logs] == [5, 6]
    # the first resumed rollout sampled with the saved statistics' pivot
    pivot = at4["temperature"]["stats"]["pivot"]
    assert logs[0].metrics["temperature/entropy_pivot"] == pytest.approx(pivot, rel=1e-6)


def test_sequence_level_ratios_are_refused_where_posttrains_objective_runs():
    from trainers.contract.methods.grpo import GRPOHyperparameters

    seq = GRPOHyperparameters(importance_sampling_level="sequence")
    assert trl_native(resolve("grpo", seq))  # GSPO through TRL's own loss is fine
    with pytest.raises(ValueError, match="importance_sampling_level 'token'"):
        resolve("hapo", seq)


def test_a_prompt_longer_than_the_sequence_budget_is_refused_naming_its_row(tmp_path):
    from trainers import registry
    from trainers.contract.errors import JobError
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.reporting import Reporter
    from trainers.runner import run_method
    from trainers.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "m", seed=0)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "short"}\n{"prompt": "' + "word " * 200 + '"}\n')
    grader = {"type": "regex", "name": "r", "input": "{{sample.output_text}}", "pattern": "x"}
    hp = {"max_seq_length": 64, "max_completion_length": 16, "num_generations": 2}
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "training_file": "f",
            "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
        }
    )
    plan = RunPlan(
        job_id="j", spec=spec, training_path=data, output_dir=tmp_path / "o", data_dir=tmp_path
    )
    with pytest.raises(JobError, match="training_file row 2: the prompt is"):
        run_method(registry.resolve("grpo"), plan, Reporter(), None)


@pytest.mark.parametrize("shape", ["text", "chat"])
def test_the_prompt_budget_counts_chat_prompts_by_their_template(tmp_path, shape):
    """A chat prompt is measured as the chat template renders it (transformers 5.17's
    apply_chat_template returns a dict, whose len() is 2): one token over the room fails in
    both shapes, one under passes."""
    from transformers import AutoTokenizer

    from trainers.algorithms.tokens import prompt_ids

    model = build_tiny_model(tmp_path / "m", seed=0)
    tok = AutoTokenizer.from_pretrained(model)
    room = 64 - 16  # max_seq_length - max_completion_length

    def row(words: int) -> dict:
        text = "word " * words
        return (
            {"prompt": text}
            if shape == "text"
            else {"messages": [{"role": "user", "content": text}]}
        )

    def tokens(r: dict) -> int:
        return len(prompt_ids(tok, r.get("prompt") or [dict(m) for m in r["messages"]]))

    words = next(w for w in range(1, room) if tokens(row(w)) > room)
    fits, too_long = row(words - 1), row(words)
    assert tokens(fits) <= room < tokens(too_long)
    hp = {"max_seq_length": 64, "max_completion_length": 16, "num_generations": 2, "max_steps": 1}
    for rows, refused in (([fits, fits], False), ([fits, too_long], True)):
        plan = make_plan(tmp_path / str(refused), "grpo", hp, rows=rows, model=str(model))
        if refused:
            with pytest.raises(JobError, match="training_file row 2: the prompt is"):
                run_method(METHOD, plan, Reporter())
        else:
            assert run_method(METHOD, plan, Reporter()).step == 1


def _trl_server_replay(rows: list[str], g: int) -> list[str]:
    """TRL 1.16's vLLM server path (``VLLMGeneration.generate``, mode "server"): it keeps
    every G-th prompt, asks for G completions of each, and hands each process its slice of
    the duplicated prompts. Returns the prompt each row's completion was generated for."""
    ordered = rows[::g]
    return [p for p in ordered for _ in range(g)][: len(rows)]


def test_xrpo_rows_cannot_reach_trls_vllm_server_so_the_combination_is_refused():
    # XRPO re-spends a step's 12 completions (G = 4) over its 3 prompts unevenly
    planner = XrpoPlanner(alpha=0.05, lam=0.1, num_exemplars=0)
    for key, rewards in (("A", [1, 1, 1, 1]), ("B", [1, 0, 1, 0]), ("C", [0, 0, 0, 1])):
        planner.observe(key, key, rewards, ["x"] * 4)
    allocations = planner.plan(["A", "B", "C"], 12)
    rows = [k for k, a in zip("ABC", allocations, strict=True) for _ in range(a.n)]
    assert sorted(a.n for a in allocations) != [4, 4, 4]  # uneven: the point of XRPO
    served = _trl_server_replay(rows, 4)
    assert sum(a != b for a, b in zip(rows, served, strict=True)) > 0  # wrong prompts
    block = {"variant": "xrpo", "graders": [LENGTH], "hyperparameters": {}}
    for engine in ("vllm", "auto"):
        block["hyperparameters"] = {"rollout_engine": engine, "vllm_mode": "server"}
        with pytest.raises(ValueError, match="vllm_mode 'colocate' or rollout_engine"):
            JobSpec.model_validate(
                {"model": "m", "training_file": "f", "method": {"type": "grpo", "grpo": block}}
            )
    block["hyperparameters"] = {"rollout_engine": "vllm", "vllm_mode": "colocate"}
    JobSpec.model_validate(
        {"model": "m", "training_file": "f", "method": {"type": "grpo", "grpo": block}}
    )  # colocate generates each planned row as it is (n=1)


# ----------------------------------------------------------------------------- group edges
YES = {
    "type": "string_check",
    "name": "says_yes",
    "input": "{{item.answer}}",
    "reference": "yes",
    "operation": "eq",
}


def test_two_rows_with_the_same_prompt_text_are_two_groups(model_dir, tmp_path):
    """Same prompt, answers "yes" and "no": two groups whose rewards do not vary (NGRPO:
    A = 0 for the all-correct one, -1/sqrt(5) for the all-wrong one of 4). Pooled as one
    group of 8, neither would be zero-variance and the advantages would differ."""
    rows = [{"prompt": "Same?", "answer": "yes"}, {"prompt": "Same?", "answer": "no"}]
    hp = {**RUN_HP, "max_steps": 1, "steps_per_generation": 1}
    plan = make_plan(
        tmp_path, "ngrpo", hp, graders=[YES], rows=rows, model=str(model_dir), sample_rows=8
    )
    reporter = Reporter()
    run_method(METHOD, plan, reporter)
    (log,) = [m for m in reporter.sent if m.type == "log"]
    assert log.metrics["frac_zero_variance_groups"] == 1.0
    assert log.metrics["advantages/abs_max"] == pytest.approx(5**-0.5, abs=1e-4)
    # the sample holds both groups, with the advantages the loss was given
    (sample,) = [m for m in reporter.sent if m.type == "samples"]
    assert sample.step == 1 and [r.group for r in sample.rows] == [0] * 4 + [1] * 4
    for group in (sample.rows[:4], sample.rows[4:]):
        (reward,) = {r.rewards["says_yes"] for r in group}
        (advantage,) = {round(r.advantage, 4) for r in group}
        assert advantage == (0.0 if reward == 1.0 else pytest.approx(-(5**-0.5), abs=1e-4))


def _ngrpo(graders: list[dict], hp: dict) -> JobSpec:
    block = {"variant": "ngrpo", "graders": graders, "hyperparameters": hp}
    return JobSpec.model_validate(
        {"model": "m", "training_file": "f", "method": {"type": "grpo", "grpo": block}}
    )


def test_ngrpos_virtual_reward_must_reach_the_graders_largest_reward():
    # weight 2 on a [0, 1] grader: rewards reach 2, above the default r_max of 1, where an
    # all-correct group would get a positive advantage
    with pytest.raises(ValidationError, match="set ngrpo_virtual_reward to 2"):
        _ngrpo([YES], {"reward_weights": [2.0]})
    _ngrpo([YES], {"reward_weights": [2.0], "ngrpo_virtual_reward": 2.0})
    _ngrpo([YES], {})  # binary grader, r_max 1: fine


def test_hapos_literal_code_sign_and_raw_z_reach_the_pieces():
    from trainers.algorithms.grpo.pieces import build_pieces

    block = {
        "variant": "hapo",
        "graders": [LENGTH],
        "hyperparameters": {"hapo_literal_code_sign": True, "hapo_raw_z": True},
    }
    spec = JobSpec.model_validate(
        {"model": "m", "training_file": "f", "method": {"type": "grpo", "grpo": block}}
    )
    pieces = build_pieces(spec.method.settings())
    assert pieces["objective"]["literal_code_sign"] is True
    rule = pieces["temperature"]
    assert (rule.use_raw_z, rule.literal_code_sign) == (True, True)


def test_gradient_checkpointing_can_be_switched_on_for_a_cpu_job(model_dir, tmp_path):
    """auto keeps it off on CPU; asked for, the GRPO step runs under recomputation and
    still trains (TRL's generation turns the model's cache off around it)."""
    hp = {**RUN_HP, "max_steps": 2, "mask_truncated_completions": False}
    plan = make_plan(tmp_path, "dapo", {**hp, "gradient_checkpointing": True}, model=str(model_dir))
    assert config_for(plan).gradient_checkpointing is True
    assert config_for(make_plan(tmp_path / "auto", "dapo", hp)).gradient_checkpointing is False
    result = run_method(METHOD, plan, Reporter())
    assert result.step == 2
    before = _weights(model_dir / "model.safetensors")
    after = _weights(tmp_path / result.checkpoint / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)
