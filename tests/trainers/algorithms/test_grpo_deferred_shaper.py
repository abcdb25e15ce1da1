"""XRPO's novelty shaper deferred to the loss's forward equals the extra no-grad forward.

When TRL generates for every optimizer step it computes no old log-probs, and the shaper
used to get them from one more forward of the rollout batch. With one process and the
generation batch one micro-batch, the loss's own forward sees the same rows with the same
weights, so the trainer shapes there instead (``PosttrainGRPOTrainer._defers``). Here one
XRPO rollout (seeded, ragged groups) is generated twice from the same planner state and
seed, once each way, and the shaped advantages, the sample's advantages, the shaper's
metrics, the loss and the gradients must agree; the extra forward must still run where
the loss would not see the whole step at once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer
from trl import GRPOConfig
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from tests.trainers.algorithms.test_grpo import (  # noqa: F401  (_one_thread: autouse)
    LENGTH,
    _one_thread,
    _tiny,
    config_dict,
    make_plan,
)
from trainers import fused_head
from trainers.algorithms.grpo import trainer as grpo_trainer
from trainers.algorithms.grpo.method import METHOD
from trainers.runner import read_data

# Rewards: the length penalty (in [-1, 0]) plus 2 on the rows whose answer is "yes". Those
# prompts score 1..2 (solved; "correct" for the shaper, which gives the unlikely ones a
# bonus), the others -1..0 (unsolved: the planner seeds them with solved exemplars).
SAYS_YES = {
    "type": "string_check",
    "name": "says_yes",
    "input": "{{item.answer}}",
    "reference": "yes",
    "operation": "eq",
}
ROWS = [
    {"prompt": [{"role": "user", "content": f"Count to {i}, please."}], "answer": a}
    for i, a in enumerate(["yes", "no", "yes", "no"])
]
HP = {
    "num_generations": 4,
    "max_completion_length": 12,
    "steps_per_generation": 1,
    "reward_weights": [1.0, 2.0],
}


class _Samples:
    """A sample recorder that keeps what it is sent."""

    rows = 8

    def __init__(self):
        self.sent: list[list[dict]] = []

    def due(self, step: int) -> bool:
        return True

    def send(self, step: int, rows: list[dict]) -> None:
        self.sent.append(rows)


def _xrpo(model_dir, tmp_path, hp: dict):
    plan = make_plan(tmp_path, "xrpo", hp, graders=[LENGTH, SAYS_YES], rows=ROWS)
    data = read_data(METHOD, plan)
    fields = config_dict(plan, data)
    fields["generation_kwargs"] = {"sequence_bias": {(1,): 5.0}}  # varied lengths
    trainer = METHOD.trainer_class(
        model=_tiny(model_dir),
        args=GRPOConfig(**fields),
        train_dataset=data.train,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **METHOD.trainer_kwargs(plan, None, data),
    )
    trainer.model.train()
    trainer.sample_recorder = _Samples()
    return trainer, data


def _rows(trainer, data, first: int) -> list[dict]:
    g = trainer.num_generations
    prompts = trainer.args.generation_batch_size // g
    return [data.train[(first + i) % len(data.train)] for i in range(prompts) for _ in range(g)]


def _loss_and_grads(trainer, inputs):
    """One micro-batch's loss and gradients, on the dict the loss is given (as TRL's
    buffered inputs: the deferred shaper writes the advantages into it)."""
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture
def extra_forwards(monkeypatch):
    calls = []
    original = grpo_trainer.PosttrainGRPOTrainer._old_logps

    def counted(self, out):
        calls.append(out["completion_mask"].shape[0])
        return original(self, out)

    monkeypatch.setattr(grpo_trainer.PosttrainGRPOTrainer, "_old_logps", counted)
    return calls


def test_the_deferred_shaper_gives_the_extra_forwards_advantages_loss_and_gradients(
    model_dir, tmp_path, extra_forwards, monkeypatch
):
    trainer, data = _xrpo(model_dir, tmp_path, HP)
    assert trainer.args.steps_per_generation == 1 and trainer.args.gradient_accumulation_steps == 1
    with fused_head.posttrain_kernel():
        # two rollouts over all four prompts: the planner has history, so the step under
        # test has ragged groups and (when a prompt stays unsolved) seeded prompts
        torch.manual_seed(0)
        for first in (0, 2):
            batch = trainer._generate_and_score_completions(_rows(trainer, data, first))
            _loss_and_grads(trainer, batch)  # the deferred shaping of that rollout
        planner = copy.deepcopy(trainer.pt_planner.state_dict())
        rng = torch.get_rng_state()
        runs = {}
        for defer in (True, False):
            monkeypatch.setattr(grpo_trainer, "DEFER_SHAPER", defer)
            trainer.pt_planner.load_state_dict(copy.deepcopy(planner))
            torch.set_rng_state(rng)
            calls = len(extra_forwards)
            trainer._metrics["train"].clear()
            out = trainer._generate_and_score_completions(_rows(trainer, data, 0))
            assert len(extra_forwards) == calls + (0 if defer else 1)
            assert ("pt_estimated" in out) == defer
            assert bool(out["advantages"].isnan().all()) == defer  # nothing before the loss
            torch.manual_seed(5)
            (shuffled,) = split_tensor_dict(shuffle_sequence_dict(out), 1)  # as TRL's does
            loss, grads = _loss_and_grads(trainer, shuffled)
            metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
            runs[defer] = (out, shuffled, loss, grads, metrics, trainer.sample_recorder.sent[-1])

    d_out, d_shuffled, d_loss, d_grads, d_metrics, d_sample = runs[True]
    e_out, e_shuffled, e_loss, e_grads, e_metrics, e_sample = runs[False]
    assert torch.equal(d_out["completion_ids"], e_out["completion_ids"])  # the same rollout
    sizes = d_out["pt_groups"].unique(return_counts=True)[1]
    assert sizes.unique().numel() > 1  # ragged groups
    assert d_out["prompt_mask"].sum(1).unique().numel() > 1  # a seeded prompt: length groups
    # the shaper mattered: some correct, unlikely rows got a bonus
    assert e_metrics["xrpo/bonus_frac"] > 0 and e_metrics["xrpo/bonus_mean"] > 0
    torch.testing.assert_close(d_shuffled["advantages"], e_shuffled["advantages"])
    torch.testing.assert_close(d_out["advantages"], e_out["advantages"])  # in rollout order
    assert [r["advantage"] for r in d_sample] == pytest.approx(
        [r["advantage"] for r in e_sample], rel=1e-6, abs=1e-7
    )
    for name in ("xrpo/bonus_mean", "xrpo/bonus_frac", "advantages/mean", "advantages/std"):
        assert d_metrics[name] == pytest.approx(e_metrics[name], rel=1e-6, abs=1e-7), name
    assert d_metrics["clip_ratio/region_mean"] == e_metrics["clip_ratio/region_mean"] == 0
    assert d_loss.item() != 0.0
    assert d_loss.item() == pytest.approx(e_loss.item(), rel=1e-6)
    assert d_grads.keys() == e_grads.keys() and len(d_grads) > 10
    for name, g in d_grads.items():
        scale = e_grads[name].abs().max().item()
        torch.testing.assert_close(g, e_grads[name], rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_the_extra_forward_still_runs_where_the_loss_sees_part_of_the_step(
    model_dir, tmp_path, extra_forwards
):
    # two accumulation steps per update, one generation per update: each micro-batch's
    # loss sees half of the step's groups, and TRL computes no old log-probs (aligned)
    trainer, data = _xrpo(model_dir, tmp_path, {**HP, "gradient_accumulation_steps": 2})
    assert trainer.args.steps_per_generation == 2
    torch.manual_seed(0)
    with fused_head.posttrain_kernel():
        batch = trainer._generate_and_score_completions(_rows(trainer, data, 0))
    assert "old_per_token_logps" not in batch
    assert "pt_estimated" not in batch and not batch["advantages"].isnan().any()
    assert extra_forwards == [batch["completion_mask"].shape[0]]
    assert trainer.sample_recorder.sent  # recorded at rollout time, as before


def test_the_shaper_reads_trls_old_log_probs_when_trl_computes_them(
    model_dir, tmp_path, extra_forwards
):
    # two updates per generation: TRL keeps the sampling policy's log-probs itself
    trainer, data = _xrpo(model_dir, tmp_path, {**HP, "steps_per_generation": 2})
    torch.manual_seed(0)
    with fused_head.posttrain_kernel():
        batch = trainer._generate_and_score_completions(_rows(trainer, data, 0))
    assert "old_per_token_logps" in batch and "pt_estimated" not in batch
    assert extra_forwards == []


def test_the_shaper_is_not_deferred_across_processes_or_with_tool_results(
    model_dir, tmp_path, monkeypatch
):
    trainer, _ = _xrpo(model_dir, tmp_path, HP)
    out = {"completion_mask": torch.ones(2, 3)}
    assert trainer._defers(out)
    assert not trainer._defers({**out, "tool_mask": torch.ones(2, 3)})
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    assert not trainer._defers(out)


def test_a_run_with_the_deferred_shaper_logs_and_samples_the_shaped_advantages(
    model_dir, tmp_path, extra_forwards, monkeypatch
):
    from trainers.reporting import Reporter
    from trainers.runner import run_method

    hp = {**HP, "batch_size": 8, "max_completion_length": 8, "max_steps": 3}
    plan = make_plan(
        tmp_path, "xrpo", hp, graders=[LENGTH, SAYS_YES], rows=ROWS, model=str(model_dir)
    )
    shaped = []
    original = grpo_trainer.PosttrainGRPOTrainer._shape_deferred
    monkeypatch.setattr(
        grpo_trainer.PosttrainGRPOTrainer,
        "_shape_deferred",
        lambda self, inputs, logps: (shaped.append(len(logps)), original(self, inputs, logps)),
    )
    reporter = Reporter()
    assert run_method(METHOD, plan, reporter).step == 3
    assert shaped == [8, 8, 8] and extra_forwards == []  # in the loss, never a forward more
    logs = [m for m in reporter.sent if m.type == "log"]
    assert [m.step for m in logs] == [1, 2, 3]
    for m in logs:  # the shaper's and the advantages' metrics, once a step, all finite
        for name in ("xrpo/bonus_frac", "advantages/std", "loss", "clip_ratio/high_max"):
            assert name in m.metrics and m.metrics[name] == m.metrics[name], (m.step, name)
    samples = [m for m in reporter.sent if m.type == "samples"]
    assert [m.step for m in samples] == [1, 2, 3]
    advantages = [r.advantage for m in samples for r in m.rows]
    assert advantages and all(a == a for a in advantages)  # never the NaN placeholder
    assert any(a != 0 for a in advantages)
