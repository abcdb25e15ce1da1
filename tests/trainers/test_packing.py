"""Padding-free batches give the padded batches' per-token losses, for SFT and DPO."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, SFTConfig

from trainers import packing
from trainers.algorithms.dpo.method import PosttrainDPOTrainer
from trainers.algorithms.dpo.method import records as dpo_records
from trainers.algorithms.sft.method import METHOD as SFT
from trainers.algorithms.sft.method import PosttrainSFTTrainer
from trainers.contract.errors import JobError
from trainers.contract.plan import RunPlan
from trainers.contract.rows import OpenAIPreferenceRow
from trainers.contract.spec import JobSpec
from trainers.fused_head import install_fused_head
from trainers.records import build_dataset
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model

ASSETS = resources.files("trainers") / "assets"
FIELDS = ("log_probs", "entropy", "is_top1", "label_mask")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture
def packed_calls(monkeypatch) -> list[int]:
    """Rows of every forward that really ran packed."""
    calls: list[int] = []
    real = packing._pack_call

    def spy(fused, kwargs):
        out = real(fused, kwargs)
        if out is not None:
            calls.append(kwargs["input_ids"].shape[0])
        return out

    monkeypatch.setattr(packing, "_pack_call", spy)
    return calls


def _batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 600, (len(lengths), width), generator=gen).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _assert_same_outputs(padded, packed):
    for name in FIELDS:
        a, b = getattr(padded, name), getattr(packed, name)
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-6)


def _assert_same_grads(a: torch.nn.Module, b: torch.nn.Module):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if p.grad is not None:
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


# ----------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("impl", ["sdpa", "eager", "sdpa+window"])
def test_packed_forward_gives_the_padded_per_token_outputs_and_gradients(
    model_dir, packed_calls, impl
):
    impl, _, window = impl.partition("+")
    # a sliding window of 4 tokens on every layer, shorter than most rows
    extra = {
        "use_sliding_window": True,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "sliding_attention"],
    }
    padded = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation=impl, **(extra if window else {})
    )
    if window:
        assert set(padded.config.layer_types) == {"sliding_attention"}
    install_fused_head(padded)
    packed = copy.deepcopy(padded)
    assert packing.install_padding_free(packed)
    # sdpa becomes the per-sequence varlen sdpa; eager masks packed rows itself
    assert packed.config._attn_implementation == (
        "eager" if impl == "eager" else "posttrain_varlen_sdpa"
    )
    batch = _batch([5, 17, 1, 11, 0])  # a one-token and an empty row too
    out_padded = padded(**batch, fused_lm_head=True)
    out_packed = packed(**batch, fused_lm_head=True)
    assert packed_calls == [5]
    _assert_same_outputs(out_padded, out_packed)
    out_padded.loss.backward()
    out_packed.loss.backward()
    _assert_same_grads(padded, packed)


def test_batches_it_cannot_pack_exactly_run_the_padded_forward(model_dir, packed_calls):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    install_fused_head(model)
    reference = copy.deepcopy(model)
    packing.install_padding_free(model)
    full = _batch([6, 6])  # no padding: nothing to gain
    left = {k: v.flip(1) for k, v in _batch([3, 7]).items()}  # left padding
    for batch in (full, left):
        _assert_same_outputs(
            reference(**batch, fused_lm_head=True), model(**batch, fused_lm_head=True)
        )
    # the plain forward (generation, full logits) is untouched
    plain = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    assert plain.logits.shape == (2, 6, model.config.vocab_size)
    assert packed_calls == []


def test_an_attention_that_cannot_keep_rows_apart_is_refused_or_skipped():
    flex = torch.nn.Module()
    flex.config = SimpleNamespace(_attn_implementation="flex_attention")
    assert not packing.packing_supported(flex)
    assert packing.resolve_packing("auto", flex)[0] is False
    with pytest.raises(JobError) as err:
        packing.resolve_packing("padding_free", flex)
    assert err.value.param == "hyperparameters.packing" and "flex_attention" in str(err.value)
    sdpa = torch.nn.Module()
    sdpa.config = SimpleNamespace(_attn_implementation="sdpa")
    assert packing.resolve_packing("auto", sdpa)[0] is True
    assert packing.resolve_packing("off", sdpa)[0] is False
    assert packing.packed_attention("flash_attention_2") == "flash_attention_2"


# ----------------------------------------------------------------------------- SFT and DPO trainers
def _sft_trainer(model_dir, out, mode: str, lora: bool = False):
    """mode: assistant_only (chat rows), all_tokens (chat rows), completion_only
    (the same conversations as prompt/completion rows)."""
    rows = [json.loads(x) for x in (ASSETS / "demo_sft.jsonl").read_text().splitlines()[:8]]
    records = [{"messages": r["messages"]} for r in rows]
    if mode == "completion_only":
        records = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        assistant_only_loss=mode == "assistant_only",
        completion_only_loss=mode == "completion_only",
        max_length=64,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    return PosttrainSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None,
    )


def _dpo_trainer(model_dir, out):
    rows = [
        OpenAIPreferenceRow.model_validate_json(x)
        for x in (ASSETS / "demo_dpo.jsonl").read_text().splitlines()[:4]
    ]
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        beta=0.2,
        max_length=128,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # move the policy off its reference
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    return PosttrainDPOTrainer(
        model=model,
        args=args,
        train_dataset=build_dataset(dpo_records(rows)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def _loss_grads_metrics(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_trainer_matches_when_packed(trainer, batch, packed_calls, forwards: int):
    # the per-token probe: SFT's labels, or DPO's answer tokens (what its loss scores)
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    probe = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        padded_out = trainer.model(**probe, labels=labels, fused_lm_head=True)
    padded = _loss_grads_metrics(trainer, batch)
    packing.install_on_trainer(trainer)
    with torch.no_grad():
        packed_out = trainer.model(**probe, labels=labels, fused_lm_head=True)
    packed = _loss_grads_metrics(trainer, batch)
    assert len(packed_calls) == 1 + forwards  # the probe, then the loss's own forwards
    assert padded_out.label_mask.sum() > 0
    _assert_same_outputs(padded_out, packed_out)  # per-token losses, masks, accuracy
    assert packed[0].item() == pytest.approx(padded[0].item(), rel=1e-5)
    for name, g in padded[1].items():
        scale = g.abs().max().item()
        torch.testing.assert_close(packed[1][name], g, rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert packed[2].keys() == padded[2].keys()
    # num_tokens is the running total: the packed step added the same real tokens again
    assert packed[2].pop("num_tokens") == 2 * padded[2].pop("num_tokens") > 0
    for key, value in padded[2].items():
        assert packed[2][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    "mode,lora",
    [
        ("assistant_only", False),
        ("all_tokens", False),
        ("completion_only", False),
        ("assistant_only", True),
    ],
    ids=["assistant_only", "all_tokens", "completion_only", "lora"],
)
def test_sft_loss_grads_and_metrics_equal_the_padded_batch(
    model_dir, tmp_path, packed_calls, mode, lora
):
    trainer = _sft_trainer(model_dir, tmp_path, mode, lora)
    assert isinstance(trainer.model, PeftModel) == lora
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert batch["attention_mask"].min() == 0  # rows of different lengths: there is padding
    masked = (batch["labels"][batch["attention_mask"] == 1] == -100).any()
    assert bool(masked) == (mode != "all_tokens")  # prompt tokens left out of the loss
    _assert_trainer_matches_when_packed(trainer, batch, packed_calls, forwards=1)


def test_dpo_loss_grads_and_metrics_equal_the_padded_batch(model_dir, tmp_path, packed_calls):
    trainer = _dpo_trainer(model_dir, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["attention_mask"].min() == 0
    # the policy and the (separate, frozen) reference forward both run packed
    _assert_trainer_matches_when_packed(trainer, batch, packed_calls, forwards=2)
    assert trainer._metrics["train"]["rewards/margins"][-1] != 0.0


# ----------------------------------------------------------------------------- a job
def _sft_plan(model_dir: Path, root: Path, **hp) -> RunPlan:
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("\n".join((ASSETS / "demo_sft.jsonl").read_text().splitlines()[:16]) + "\n")
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir),
            "training_file": "file-x",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
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


def test_sft_job_packs_by_default_learns_and_trains_like_padded(model_dir, tmp_path, packed_calls):
    hp = {"n_epochs": 3, "batch_size": 8, "learning_rate": 5e-3}
    runs = {}
    for mode in ("auto", "off"):
        reporter = Reporter()
        result = run_method(
            SFT, _sft_plan(model_dir, tmp_path / mode, packing=mode, **hp), reporter
        )
        logs = [m for m in reporter.sent if m.type == "log"]
        events = [m.message for m in reporter.sent if m.type == "event"]
        runs[mode] = (result, [m.metrics["loss"] for m in logs], events)
        if mode == "auto":
            assert len(packed_calls) == result.step  # every step ran packed
    (packed, packed_losses, packed_events), (padded, padded_losses, padded_events) = runs.values()
    assert any(e.startswith("Padding-free batches") for e in packed_events)
    assert any(e.startswith("Padded batches (packing: off)") for e in padded_events)
    assert packed.step == padded.step == 6
    assert packed_losses[-1] < 0.8 * packed_losses[0]  # it learns
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4)  # the same loss curve
    assert packed.trained_tokens == padded.trained_tokens > 0  # real tokens, no padding
