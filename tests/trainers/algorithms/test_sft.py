"""SFT through the fused kernel trains exactly like SFT through the model's own logits."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from trainers.algorithms.sft.method import PosttrainSFTTrainer
from trainers.logprobs import FullLogitsForbidden
from trainers.tiny_model import build_tiny_model


class LogitsSFTTrainer(SFTTrainer):
    """The reference: loss from the model's full logits and PyTorch's cross-entropy."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits[:, :-1]
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        denom = (
            (labels != -100).sum().clamp(min=1)
            if num_items_in_batch is None
            else num_items_in_batch
        )
        return total / denom


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    rows = [
        json.loads(x)
        for x in (resources.files("trainers") / "assets" / "demo_sft.jsonl")
        .read_text()
        .splitlines()[:16]
    ]
    return model_dir, Dataset.from_list([{"messages": r["messages"]} for r in rows])


def _run(cls, setup, out, *, lora=False, steps=4, **overrides):
    """Train ``steps`` steps; return (log entries with a loss, trainable params after)."""
    model_dir, data = setup
    torch.manual_seed(0)
    args = {
        "max_steps": steps,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "assistant_only_loss": True,
        "seed": 0,
        "disable_tqdm": True,
        **overrides,
    }
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=SFTConfig(output_dir=str(out / cls.__name__), **args),
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if lora else None,
    )
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return [h for h in trainer.state.log_history if "loss" in h], params


def _train(cls, setup, tmp_path, lora: bool):
    # SGD, not Adam: Adam rescales gradients that are zero in exact arithmetic (e.g. key
    # biases, to which softmax attention is invariant) into lr-sized rounding noise.
    logs, params = _run(
        cls,
        setup,
        tmp_path,
        lora=lora,
        learning_rate=0.5,
        optim="sgd",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    return [h["loss"] for h in logs], params


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kernel_and_logits_paths_give_the_same_training(setup, tmp_path, lora):
    fused_losses, fused_params = _train(PosttrainSFTTrainer, setup, tmp_path, lora)
    ref_losses, ref_params = _train(LogitsSFTTrainer, setup, tmp_path, lora)
    assert len(fused_losses) == 4
    assert fused_losses == pytest.approx(ref_losses, rel=1e-5)
    assert fused_losses[-1] < fused_losses[0]  # and it learned
    assert fused_params.keys() == ref_params.keys()
    for name, p in fused_params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)


def test_one_step_gradients_match_the_logits_path(setup):
    model_dir, _ = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok.apply_chat_template(
        [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]],
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
    )
    labels = enc["input_ids"].masked_fill(torch.as_tensor(enc["assistant_masks"]) == 0, -100)
    inputs = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }

    from trainers.logprobs import causal_lm_logprobs

    grads = []
    for fused in (True, False):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        if fused:
            res = causal_lm_logprobs(
                model, inputs["input_ids"], labels, attention_mask=inputs["attention_mask"]
            )
            loss = -res.logp.sum()
        else:
            logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_full_logits_on_the_training_path_are_refused(setup, tmp_path):
    model_dir, data = setup
    cfg = SFTConfig(
        output_dir=str(tmp_path / "guard"),
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = PosttrainSFTTrainer(
        model=str(model_dir),
        args=cfg,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    ids = torch.tensor([[5, 6, 7]])
    trainer.model.train()
    with pytest.raises(FullLogitsForbidden):
        trainer.model(input_ids=ids)
    with torch.no_grad():  # generation and evaluation without grads still work
        assert trainer.model(input_ids=ids).logits.shape[-1] == trainer.model.config.vocab_size


def test_logged_metrics_match_trls_own_sft(setup, tmp_path):
    """Loss, entropy, token accuracy and token counts are what TRL's SFTTrainer logs."""
    ours, _ = _run(PosttrainSFTTrainer, setup, tmp_path, steps=3)
    trls, _ = _run(SFTTrainer, setup, tmp_path, steps=3)
    for mine, theirs in zip(ours, trls, strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert any(0 < e["mean_token_accuracy"] for e in ours)


def test_gradient_checkpointing_trains_the_same(setup, tmp_path):
    """The switch costs a recomputed forward, not a different result (the kernel's
    backward runs under recomputation too)."""
    logs = {}
    for on in (False, True):
        logs[on], _ = _run(
            PosttrainSFTTrainer, setup, tmp_path / str(on), steps=3, gradient_checkpointing=on
        )
    assert [h["loss"] for h in logs[True]] == pytest.approx([h["loss"] for h in logs[False]])
    assert logs[True][-1]["loss"] < logs[True][0]["loss"]
