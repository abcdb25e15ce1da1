"""DPO: the method's data and config mappings, its kernel parity with TRL, and a real run.

Parity: ``PosttrainDPOTrainer`` on posttrain's kernel gives the loss, the
gradients and the logged metrics of TRL's own ``DPOTrainer`` on TRL's kernel, for
the same model and collated batch (fp32). The run goes through the shared runner,
as a job does: it learns, reports DPO's metrics per step, counts trained tokens,
keeps the reference at the base model, and continues the token count on resume.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from trainers import fused_head
from trainers.algorithms.dpo.method import DPO_METRICS, METHOD, PosttrainDPOTrainer
from trainers.algorithms.dpo.method import record as dpo_record
from trainers.algorithms.dpo.method import records as dpo_records
from trainers.contract.plan import RunPlan
from trainers.contract.rows import ImplicitPreferenceRow, OpenAIPreferenceRow, PreferenceRow
from trainers.contract.spec import JobSpec
from trainers.records import build_dataset
from trainers.reporting import PauseRequest, Reporter
from trainers.runner import TrainData, common_config, run_method

DEMO = resources.files("trainers") / "assets" / "demo_dpo.jsonl"
U = {"role": "user", "content": "Q?"}
A = {"role": "assistant", "content": "Good."}
B = {"role": "assistant", "content": "Bad."}


def demo_rows(n: int) -> list[OpenAIPreferenceRow]:
    lines = DEMO.read_text().splitlines()[:n]
    return [OpenAIPreferenceRow.model_validate_json(x) for x in lines]


# ----------------------------------------------------------------------------- data mapping
def test_openai_rows_map_to_prompt_chosen_rejected():
    row = OpenAIPreferenceRow.model_validate(
        {
            "input": {"messages": [{"role": "developer", "content": "Be kind."}, U]},
            "preferred_output": [A],
            "non_preferred_output": [
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Ba"}, {"type": "text", "text": "d."}],
                }
            ],
        }
    )
    assert dpo_record(row) == {
        "prompt": [{"role": "system", "content": "Be kind."}, U],
        "chosen": [A],
        "rejected": [B],
    }


def test_trl_explicit_rows_keep_text_or_messages():
    text = PreferenceRow.model_validate({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    assert dpo_record(text) == {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    chat = PreferenceRow.model_validate({"prompt": [U], "chosen": [A], "rejected": [B]})
    assert dpo_record(chat) == {"prompt": [U], "chosen": [A], "rejected": [B]}
    # a row mixing text and messages becomes messages: text prompt = user, text answer = assistant
    mixed = PreferenceRow.model_validate({"prompt": "Q?", "chosen": [A], "rejected": "Bad."})
    assert dpo_record(mixed) == {"prompt": [U], "chosen": [A], "rejected": [B]}


def test_implicit_rows_split_after_the_shared_prompt():
    system = {"role": "system", "content": "S"}
    row = ImplicitPreferenceRow.model_validate(
        {"chosen": [system, U, A], "rejected": [system, U, B]}
    )
    assert row.prompt_length() == 2
    assert dpo_record(row) == {"prompt": [system, U], "chosen": [A], "rejected": [B]}


def test_a_file_mixing_text_and_message_rows_becomes_one_conversational_dataset():
    rows = [
        PreferenceRow.model_validate({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}),
        OpenAIPreferenceRow.model_validate(
            {"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": [B]}
        ),
    ]
    expected = {"prompt": [U], "chosen": [A], "rejected": [B]}
    assert dpo_records(rows) == [expected, expected]
    assert dpo_records(rows[:1]) == [{"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}]
    build_dataset(dpo_records(rows))  # one column type each: the dataset builds


# ----------------------------------------------------------------------------- config mapping
def config_for(hp: dict, training_type: str = "full", tmp: Path = Path("/tmp")) -> DPOConfig:
    spec = JobSpec.model_validate(
        {
            "model": "tiny",
            "training_file": "file-x",
            "method": {"type": "dpo", "dpo": {"hyperparameters": hp}},
            "training_type": training_type,
        }
    )
    plan = RunPlan(
        job_id="j", spec=spec, training_path=tmp / "t", output_dir=tmp / "o", data_dir=tmp
    )
    hparams = spec.method_hyperparameters()
    data = TrainData(format="preference", train=list(range(20)))
    return METHOD.config_class(
        **common_config(plan, hparams, data), **METHOD.config_fields(plan, hparams, data)
    )


def test_defaults_are_trls_dpo_with_beta_auto():
    cfg = config_for({})
    assert cfg.beta == 0.1 and cfg.loss_type == ["sigmoid"] and cfg.loss_weights == [1.0]
    assert cfg.label_smoothing == 0.0 and cfg.learning_rate == pytest.approx(1e-6)
    assert cfg.per_device_train_batch_size == 8 and cfg.num_train_epochs == 3
    assert cfg.max_length == 1024 and not cfg.precompute_ref_log_probs


def test_hyperparameters_reach_dpo_config():
    cfg = config_for(
        {
            "beta": 0.3,
            "loss_type": ["sigmoid", "sft"],  # RPO
            "loss_weights": [1.0, 0.5],
            "label_smoothing": 0.1,
            "learning_rate_multiplier": 3.0,
            "max_seq_length": 256,
            "batch_size": 2,
        }
    )
    assert cfg.beta == 0.3 and cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.loss_weights == [1.0, 0.5] and cfg.label_smoothing == 0.1
    assert cfg.learning_rate == pytest.approx(3e-6)
    assert cfg.max_length == 256 and cfg.per_device_train_batch_size == 2
    assert config_for({"loss_type": "ipo"}).loss_type == ["ipo"]


def test_exo_without_its_epsilon_is_refused_by_the_spec():
    with pytest.raises(ValidationError, match="label_smoothing > 0"):
        config_for({"loss_type": "exo_pair"})
    assert config_for({"loss_type": "exo_pair", "label_smoothing": 1e-3}).loss_type == ["exo_pair"]


def test_learning_rate_base_is_higher_for_lora_and_absolute_wins():
    assert config_for({}, "lora").learning_rate == pytest.approx(5e-6)
    assert config_for({"learning_rate_multiplier": 2.0}, "lora").learning_rate == pytest.approx(
        1e-5
    )
    assert (
        config_for({"learning_rate": 3e-3, "learning_rate_multiplier": 9.0}).learning_rate == 3e-3
    )


# ----------------------------------------------------------------------------- kernel parity
def _trainer(cls, model_dir, out, loss_type):
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        loss_type=loss_type,
        loss_weights=[1.0, 0.7][: len(loss_type)],
        beta=0.2,
        max_length=128,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():  # move the policy off the reference, the same way for both trainers
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    return cls(
        model=model,
        args=args,
        train_dataset=build_dataset(dpo_records(demo_rows(8))),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def _loss_grads_metrics(trainer, batch):
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize(
    "loss_type", [["sigmoid"], ["sigmoid", "sft"], ["ipo"]], ids=["dpo", "rpo", "ipo"]
)
def test_loss_grads_and_metrics_equal_trls_kernel(model_dir, tmp_path, monkeypatch, loss_type):
    calls = []
    ours_apply = fused_head.PosttrainLogProbFunction.apply

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return ours_apply(*args, **kwargs)

    monkeypatch.setattr(fused_head.PosttrainLogProbFunction, "apply", staticmethod(counted))

    ours = _trainer(PosttrainDPOTrainer, model_dir, tmp_path / "ours", loss_type)
    examples = [ours.train_dataset[i] for i in range(4)]
    batch = ours.data_collator(examples)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    with fused_head.posttrain_kernel():
        loss, grads, metrics = _loss_grads_metrics(ours, batch)
    assert len(calls) == 2  # the policy and the reference forward both ran posttrain's kernel

    with fused_head.trl_kernel():
        theirs = _trainer(DPOTrainer, model_dir, tmp_path / "trl", loss_type)
        assert not fused_head.posttrain_kernel_active()
        ref_loss, ref_grads, ref_metrics = _loss_grads_metrics(theirs, batch)
    assert len(calls) == 2  # ...and TRL's trainer did not

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert metrics["rewards/margins"] != 0.0  # the policy really differs from its reference
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), key


def test_reference_is_a_frozen_base_copy_in_full_training_and_the_bare_base_under_lora(
    model_dir, tmp_path
):
    from peft import LoraConfig, PeftModel

    full = _trainer(PosttrainDPOTrainer, model_dir, tmp_path / "full", ["sigmoid"])
    assert full.ref_model is not None and full.ref_model is not full.model
    assert not full.ref_model.training
    assert fused_head.fused_head_settings(full.ref_model) is not None
    cfg = DPOConfig(output_dir=str(tmp_path / "lora"), report_to="none", use_cpu=True)
    lora = PosttrainDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=cfg,
        train_dataset=build_dataset(dpo_records(demo_rows(4))),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    assert lora.ref_model is None and isinstance(lora.model, PeftModel)  # adapter disabled = ref


# ----------------------------------------------------------------------------- a real run
def _plan(model_dir: Path, root: Path, **hp) -> RunPlan:
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("\n".join(DEMO.read_text().splitlines()[:16]) + "\n")
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir),
            "training_file": "file-x",
            "method": {"type": "dpo", "dpo": {"hyperparameters": hp}},
        }
    )
    return RunPlan(
        job_id="j",
        spec=spec,
        training_path=train,
        output_dir=root / "out",
        data_dir=root,
        checkpoint_every_steps=100,
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_run_learns_reports_dpo_metrics_and_counts_tokens(model_dir, tmp_path):
    hp = {"n_epochs": 4, "batch_size": 4, "learning_rate": 3e-3}
    reporter = Reporter()
    result = run_method(METHOD, _plan(model_dir, tmp_path, **hp), reporter)
    logs = [m for m in reporter.sent if m.type == "log"]
    assert result.step == 16 and not result.paused
    assert [m.step for m in logs] == list(range(1, 17))
    for key in DPO_METRICS:
        assert all(key in m.metrics for m in logs), key
    assert logs[-1].metrics["rewards/accuracies"] == 1.0
    assert logs[-1].metrics["rewards/margins"] > logs[0].metrics["rewards/margins"] + 1.0
    # trained tokens: every non-padding token of both sequences of every pair, every step
    counts = [m.trained_tokens for m in logs]
    assert counts[0] > 0 and counts == sorted(counts) and result.trained_tokens == counts[-1]
    final = [m for m in reporter.sent if m.type == "checkpoint"][-1]
    assert final.final and "rewards/accuracies" in final.metrics


def test_resume_continues_the_token_count_and_keeps_the_base_as_reference(model_dir, tmp_path):
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate": 3e-3}
    straight = run_method(METHOD, _plan(model_dir, tmp_path / "a", **hp), Reporter())

    plan = _plan(model_dir, tmp_path / "b", **hp)
    pause = PauseRequest()
    pause.requested = True
    paused = Reporter()
    first = run_method(METHOD, plan, paused, pause)
    assert first.paused and first.step == 1 and 0 < first.trained_tokens
    said = [m.message for m in paused.sent if m.type == "event"]
    assert any(m.startswith("Training paused at step 1 after") for m in said)
    assert not any(m.startswith("Training finished") for m in said)  # it did not finish
    reporter = Reporter()
    second = run_method(METHOD, plan, reporter)
    assert any(m.type == "event" and m.message.startswith("Resumed") for m in reporter.sent)
    assert (second.step, second.trained_tokens) == (straight.step, straight.trained_tokens)
    # the resumed run's reference was the base model, not the step-1 checkpoint: both runs
    # end with the same weights
    a = _weights(tmp_path / "a" / straight.checkpoint)
    b = _weights(tmp_path / "b" / second.checkpoint)
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, rtol=1e-4, atol=1e-6, msg=name)
    assert (
        json.loads((tmp_path / "b" / second.checkpoint / "trainer_state.json").read_text())[
            "num_input_tokens_seen"
        ]
        == straight.trained_tokens
    )
