"""OREO's trainer: step-0 losses, critic-before-policy order, checkpoints/resume, LoRA/full,
step-level data checks, and the beam-search script on a trained checkpoint."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from trainers.algorithms.oreo import search as oreo_search
from trainers.algorithms.oreo.method import METHOD
from trainers.algorithms.oreo.method import records as oreo_records
from trainers.algorithms.oreo.trainer import PosttrainOREOTrainer
from trainers.algorithms.oreo.value import CRITIC_STATE, HEAD_FILE, VALUE_DIR, ValueModel
from trainers.contract.errors import JobError
from trainers.contract.methods.oreo import OREOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.contract.rows import ScoredRow
from trainers.contract.spec import JobSpec
from trainers.records import build_dataset
from trainers.reporting import Reporter
from trainers.runner import run_method

DEMO = resources.files("trainers") / "assets" / "demo_oreo.jsonl"


def demo_rows(n: int) -> list[ScoredRow]:
    return [ScoredRow.model_validate_json(x) for x in DEMO.read_text().splitlines()[:n]]


def make_trainer(model_dir: Path, tmp: Path, n: int = 8, **settings) -> PosttrainOREOTrainer:
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(tmp), use_cpu=True, report_to="none", remove_unused_columns=False,
        per_device_train_batch_size=8, seed=0, max_steps=4,
    )  # fmt: skip
    trainer = PosttrainOREOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=build_dataset(oreo_records(demo_rows(n))),
        processing_class=tok,
        oreo=OREOHyperparameters(**settings),
        value_model=ValueModel.from_causal_lm(AutoModelForCausalLM.from_pretrained(model_dir)),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
    )
    trainer.state.max_steps = 4
    trainer.model.train()
    return trainer


def batch(trainer, rows) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


# ----------------------------------------------------------------------------- step 0
@pytest.mark.parametrize("row", [0, 1])  # row 0 has reward 1, row 1 reward 0
def test_step_zero_value_loss_is_r_squared_and_kl_is_zero(model_dir, tmp_path, row):
    trainer = make_trainer(model_dir, tmp_path, beta=0.1, alpha=0.5)
    inputs = batch(trainer, [row])
    reward = float(inputs["reward"][0])
    trainer._critic_update(trainer.model, inputs)
    assert trainer._metrics["train"]["value_loss"][0] == pytest.approx(reward**2, abs=1e-7)
    loss, out = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    assert float(out["metrics"]["kl"]) == pytest.approx(0.0, abs=1e-6)  # πθ = πref, exact KL
    assert loss.item() == pytest.approx(reward**2, abs=1e-6)


def test_critic_steps_first_and_the_policy_loss_uses_pre_update_values(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path)
    inputs = batch(trainer, range(8))
    with torch.no_grad():
        before = trainer._values(inputs).clone()
    policy_before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer._critic_update(trainer.model, inputs)
    assert torch.equal(trainer._stash["values"], before)  # the pre-update V, detached
    with torch.no_grad():
        after = trainer._values(inputs)
    assert not torch.allclose(after, before)  # the critic has stepped ...
    for p, q in zip(trainer.model.parameters(), policy_before, strict=True):
        assert torch.equal(p, q)  # ... the policy not yet
    # the policy loss equals the value loss computed with the same (pre-update) V
    _, out = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    vloss = trainer._metrics["train"]["value_loss"][0]
    assert float(out["metrics"]["policy_loss"]) == pytest.approx(vloss, rel=1e-5)


# ----------------------------------------------------------------------------- runs
def _plan(model_dir: Path, root: Path, training_type: str = "full", rows=None, **hp) -> RunPlan:
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("\n".join(rows or DEMO.read_text().splitlines()[:32]) + "\n")
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir), "training_file": "file-x", "seed": 3,
            "training_type": training_type,
            "method": {"type": "oreo", "oreo": {"hyperparameters": hp}},
        }
    )  # fmt: skip
    return RunPlan(
        job_id="j", spec=spec, training_path=train, output_dir=root / "out", data_dir=root,
        checkpoint_every_steps=4,
    )  # fmt: skip


def _logs(reporter: Reporter) -> list[dict]:
    return [m.metrics for m in reporter.sent if m.type == "log" and "value_loss" in m.metrics]


HP = {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-3}


@pytest.mark.parametrize("training_type", ["full", "lora"])
def test_full_and_lora_train_save_both_models_and_search(model_dir, tmp_path, training_type):
    reporter = Reporter()
    result = run_method(METHOD, _plan(model_dir, tmp_path, training_type, **HP), reporter)
    logs = _logs(reporter)
    assert result.step == 8
    assert {"value_loss", "policy_loss", "kl", "residual_mean", "value/start", "value/end"} <= (
        logs[-1].keys()
    )
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["value/start"] == 0.0  # zero-initialised head
    ckpt = tmp_path / "out" / "checkpoint-8"
    weights = "adapter_model.safetensors" if training_type == "lora" else "model.safetensors"
    assert (ckpt / weights).is_file()
    for name in ("model.safetensors", HEAD_FILE, CRITIC_STATE, "config.json"):
        assert (ckpt / VALUE_DIR / name).is_file(), name
    assert load_file(str(ckpt / VALUE_DIR / HEAD_FILE))["linear.weight"].abs().sum() > 0
    answer = oreo_search.main(
        ["--checkpoint", str(ckpt), "--prompt", "Question: Hi?\nAnswer: ", "--beam", "2",
         "--max-steps", "2", "--max-step-tokens", "6"]
    )  # fmt: skip
    assert isinstance(answer, str) and answer
    # the search is bounded: never more than max_new_tokens in the answer
    policy, value_model, tok = oreo_search.load(ckpt)
    for budget in (3, 10):
        best = oreo_search.search(
            policy, value_model, tok, "Question: Hi?\nAnswer: ", beam=2, max_steps=50,
            max_step_tokens=4, max_new_tokens=budget,
        )  # fmt: skip
        assert 0 < len(best.ids) <= budget


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_restores_both_models_and_both_optimizers(model_dir, tmp_path):
    straight = Reporter()
    run_method(METHOD, _plan(model_dir, tmp_path / "a", **HP), straight)
    plan = _plan(model_dir, tmp_path / "b", **HP)
    shutil.copytree(tmp_path / "a/out/checkpoint-4", plan.output_dir / "checkpoint-4")
    resumed = Reporter()
    assert run_method(METHOD, plan, resumed).step == 8
    tail_a = {m["epoch"]: m for m in _logs(straight)[4:]}
    tail_b = {m["epoch"]: m for m in _logs(resumed)}
    assert tail_b.keys() == tail_a.keys()
    for epoch, m in tail_b.items():
        for key in ("loss", "value_loss", "policy_loss", "kl"):
            assert m[key] == pytest.approx(tail_a[epoch][key], abs=1e-6), (epoch, key)
    a, b = tmp_path / "a/out/checkpoint-8", plan.output_dir / "checkpoint-8"
    for sub, name in (("", "model.safetensors"), (VALUE_DIR, "model.safetensors"),
                      (VALUE_DIR, HEAD_FILE)):  # fmt: skip
        wa, wb = load_file(str(a / sub / name)), load_file(str(b / sub / name))
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6), (sub, name, k)
    sa = torch.load(a / VALUE_DIR / CRITIC_STATE, weights_only=False)
    sb = torch.load(b / VALUE_DIR / CRITIC_STATE, weights_only=False)
    assert sa["scheduler"] == sb["scheduler"]
    for k, st in sa["optimizer"]["state"].items():
        assert torch.allclose(
            st["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"], atol=1e-9
        )


# ----------------------------------------------------------------------------- data checks
def test_step_variant_refuses_a_response_without_a_delimiter_naming_the_line(model_dir, tmp_path):
    rows = DEMO.read_text().splitlines()[:4]
    rows.insert(2, json.dumps({"prompt": "Q: ", "response": "one line only", "reward": 1}))
    plan = _plan(model_dir, tmp_path, rows=rows, variant="step", **HP)
    with pytest.raises(JobError, match="line 3: the response has no step delimiter"):
        run_method(METHOD, plan, Reporter())


def test_a_run_diverged_by_a_huge_reward_scale_names_the_scale(model_dir, tmp_path):
    """R = reward x 1000 with a reward of 1e36: R's square overflows float32 at the step
    that trains on it. The failure names reward_scale, not the learning rate."""
    rows = [json.loads(x) for x in DEMO.read_text().splitlines()[:8]]
    rows[0]["reward"] = 1e36
    plan = _plan(
        model_dir, tmp_path, rows=[json.dumps(r) for r in rows],
        n_epochs=1, batch_size=8, reward_scale=1000.0,
    )  # fmt: skip
    with pytest.raises(JobError) as err:
        run_method(METHOD, plan, Reporter())
    assert err.value.code == "training_diverged"
    assert err.value.param == "method.oreo.hyperparameters.reward_scale"
    assert "R = reward x 1000 + 0" in err.value.message


@pytest.mark.parametrize("field", ["reward_scale", "reward_offset"])
def test_reward_transforms_past_their_bounds_are_refused(field):
    with pytest.raises(ValueError, match="less than or equal to 1000"):
        OREOHyperparameters(**{field: 1e300})
