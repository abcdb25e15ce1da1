"""BCO's trainer: data mapping, step-0 loss, kernel parity with full logits, resume, LoRA/full.

Parity: the loss and the gradients ``PosttrainBCOTrainer`` computes through the
fused forward (posttrain's kernel, no logits) equal BCO computed by hand from the
model's own full logits (log_softmax, gather) in fp32, rel 1e-5.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from trainers.algorithms.bco.method import METHOD
from trainers.algorithms.bco.method import records as bco_records
from trainers.algorithms.bco.trainer import BCO_METRICS, STATE_FILE, PosttrainBCOTrainer
from trainers.algorithms.tokens import truncate
from trainers.contract.methods.bco import BCOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.contract.rows import (
    ImplicitPreferenceRow,
    OpenAIPreferenceRow,
    OpenAIUnpairedRow,
    PreferenceRow,
    UnpairedPreferenceRow,
)
from trainers.contract.spec import JobSpec
from trainers.core.bco import PromptClassifier
from trainers.records import build_dataset
from trainers.reporting import Reporter
from trainers.runner import run_method

DEMO = resources.files("trainers") / "assets" / "demo_bco.jsonl"
U = {"role": "user", "content": "Q?"}
A = {"role": "assistant", "content": "Good."}
B = {"role": "assistant", "content": "Bad."}


def demo_records(n: int) -> list[dict]:
    rows = [OpenAIUnpairedRow.model_validate_json(x) for x in DEMO.read_text().splitlines()[:n]]
    return bco_records(rows)


# ----------------------------------------------------------------------------- data mapping
def test_unpaired_rows_keep_their_label_and_text_or_messages():
    text = UnpairedPreferenceRow.model_validate(
        {"prompt": "2+2=", "completion": "4", "label": True}
    )
    assert bco_records([text]) == [{"prompt": "2+2=", "completion": "4", "label": True}]
    oai = OpenAIUnpairedRow.model_validate(
        {
            "input": {"messages": [{"role": "developer", "content": "S"}, U]},
            "output": [B],
            "label": False,
        }
    )
    assert bco_records([oai]) == [
        {"prompt": [{"role": "system", "content": "S"}, U], "completion": [B], "label": False}
    ]
    # a file mixing text and messages becomes messages (text prompt = user turn)
    assert bco_records([text, oai])[0] == {
        "prompt": [{"role": "user", "content": "2+2="}],
        "completion": [{"role": "assistant", "content": "4"}],
        "label": True,
    }


def test_paired_rows_split_into_a_thumbs_up_and_a_thumbs_down_row():
    want = [
        {"prompt": [U], "completion": [A], "label": True},
        {"prompt": [U], "completion": [B], "label": False},
    ]
    oai = OpenAIPreferenceRow.model_validate(
        {"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": [B]}
    )
    trl = PreferenceRow.model_validate({"prompt": [U], "chosen": [A], "rejected": [B]})
    implicit = ImplicitPreferenceRow.model_validate({"chosen": [U, A], "rejected": [U, B]})
    for row in (oai, trl, implicit):
        assert bco_records([row]) == want
    text = PreferenceRow.model_validate({"prompt": "p", "chosen": "c", "rejected": "r"})
    assert bco_records([text]) == [
        {"prompt": "p", "completion": "c", "label": True},
        {"prompt": "p", "completion": "r", "label": False},
    ]


def test_truncation_keeps_the_prompt_end_then_cuts_the_completion():
    assert truncate([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])
    assert truncate([1, 2, 3, 4, 5, 6], [7, 8], 6) == ([3, 4, 5, 6], [7, 8])
    # a long completion: the prompt keeps at least half the budget, the completion is cut
    assert truncate([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 6) == ([2, 3, 4], [5, 6, 7])


# ----------------------------------------------------------------------------- trainer pieces
def make_trainer(model_dir: Path, tmp: Path, n: int = 16, **settings) -> PosttrainBCOTrainer:
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp),
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        per_device_train_batch_size=8,
        seed=0,
    )
    return PosttrainBCOTrainer(
        model=policy,
        args=args,
        train_dataset=build_dataset(demo_records(n)),
        processing_class=tok,
        bco=BCOHyperparameters(**settings),
        ref_model=ref,
    )


def first_batch(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(8)])


def test_step_zero_loss_is_ln2_on_a_real_batch(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert trainer.running.delta == 0.0


def _logits_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (tok * mask).sum(-1)


def test_loss_and_gradients_match_a_full_logits_computation(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, beta=0.5)
    # the logits path runs on a fresh, unpatched load of the same weights
    twin = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    for model in (trainer.model, twin):  # move the policy away from the reference: r != 0
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.running.update(torch.tensor([0.3, -0.1]))  # a δ with history: (0.2 + batch) / 10
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    pos = batch["label"]
    lp = _logits_logps(twin, batch)
    with torch.no_grad():
        lpref = _logits_logps(ref, batch)
    r = 0.5 * (lp - lpref)
    delta = (0.2 + r.detach().sum()) / (2 + r.numel())
    z = r - delta
    want = torch.where(pos, -torch.nn.functional.logsigmoid(z), -torch.nn.functional.logsigmoid(-z))
    want = want.mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert trainer.running.delta == pytest.approx(float(delta), rel=1e-5)
    for (name, p), q in zip(trainer.model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None, name
        # per tensor, relative to its norm: a few elements of the tied embedding's gradient
        # differ by ~4e-7 absolute (fp32 summation order), far below 1e-5 of its norm
        err = (p.grad - q.grad).norm() / q.grad.norm()
        assert err <= 1e-5, (name, float(err))


# ----------------------------------------------------------------------------- runs
def _plan(model_dir: Path, root: Path, training_type: str = "full", **hp) -> RunPlan:
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("\n".join(DEMO.read_text().splitlines()[:32]) + "\n")
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir),
            "training_file": "file-x",
            "seed": 3,
            "training_type": training_type,
            "method": {"type": "bco", "bco": {"hyperparameters": hp}},
        }
    )
    return RunPlan(
        job_id="j",
        spec=spec,
        training_path=train,
        output_dir=root / "out",
        data_dir=root,
        checkpoint_every_steps=4,
    )


def _logs(reporter: Reporter) -> list[dict]:
    return [m.metrics for m in reporter.sent if m.type == "log"]


@pytest.mark.parametrize("training_type", ["full", "lora"])
def test_full_and_lora_train_and_report_bco_metrics(model_dir, tmp_path, training_type):
    hp = {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "udm": True,
        "udm_prompt_sample_size": 16,
    }
    reporter = Reporter()
    result = run_method(METHOD, _plan(model_dir, tmp_path, training_type, **hp), reporter)
    logs = _logs(reporter)
    assert result.step == 12 and result.trained_tokens > 0
    assert {
        *BCO_METRICS,
        "udm_weight/min",
        "udm_weight/max",
        "udm/classifier_holdout_accuracy",
    } <= logs[-1].keys()
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    late = logs[-4:]
    assert sum(x["rewards/margins"] for x in late) / 4 > 0.2, late
    assert sum(x["loss"] for x in late) / 4 < logs[0]["loss"]


def test_delta_and_classifier_are_saved_and_restored_not_refitted(model_dir, tmp_path, monkeypatch):
    hp = {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "udm": True,
        "udm_prompt_sample_size": 16,
    }
    straight = Reporter()
    run_method(METHOD, _plan(model_dir, tmp_path / "a", **hp), straight)
    saved = json.loads((tmp_path / "a/out/checkpoint-4" / STATE_FILE).read_text())
    assert saved["running"]["count_all"] == pytest.approx(32.0)
    assert saved["classifier"]["weight"] and "holdout_accuracy" in saved["classifier"]["report"]
    final = json.loads((tmp_path / "a/out/checkpoint-8" / STATE_FILE).read_text())

    # resume a second run from the first run's step-4 checkpoint: the classifier is loaded
    plan = _plan(model_dir, tmp_path / "b", **hp)
    import shutil

    shutil.copytree(tmp_path / "a/out/checkpoint-4", plan.output_dir / "checkpoint-4")

    def refuse(*a, **k):
        raise AssertionError("the classifier was refitted on resume")

    monkeypatch.setattr(PromptClassifier, "fit", refuse)
    resumed = Reporter()
    result = run_method(METHOD, plan, resumed)
    assert result.step == 8
    again = json.loads((plan.output_dir / "checkpoint-8" / STATE_FILE).read_text())
    assert again["classifier"] == final["classifier"]
    assert again["running"] == pytest.approx(final["running"], abs=1e-9)
    tail_a = {m["epoch"]: m["loss"] for m in _logs(straight)[4:]}
    tail_b = {m["epoch"]: m["loss"] for m in _logs(resumed)}
    for k, v in tail_b.items():
        assert v == pytest.approx(tail_a[k], abs=1e-6)


def test_udm_with_a_local_embedding_model_fits_and_trains(model_dir, tmp_path):
    """``udm_embedding_model``: prompts embedded by a separate local encoder (here the
    tiny model's backbone loaded with ``AutoModel``) instead of the reference model."""
    hp = {
        "n_epochs": 1,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "udm": True,
        "udm_prompt_sample_size": 16,
        "udm_embedding_model": str(model_dir),
    }
    reporter = Reporter()
    result = run_method(METHOD, _plan(model_dir, tmp_path, "full", **hp), reporter)
    last = _logs(reporter)[-1]
    assert result.step > 0
    assert 0.0 <= last["udm/classifier_holdout_accuracy"] <= 1.0
    assert 0.5 <= last["udm_weight/min"] <= last["udm_weight/max"] <= 10.0
