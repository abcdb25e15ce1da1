"""EGPO's trainer on the tiny model with a rule judge (a cyclic pattern table).

The half/full step protocol (snapshot restored bit for bit right before the full step's
backward), the reduction to online IPO with the extrapolation off (bit-identical to a
plain online-IPO loop under the same seeds), pauses that wait for the iteration's end,
and checkpoint/resume that continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from trainers.algorithms.egpo.method import METHOD
from trainers.algorithms.egpo.rollout import TransformersSampler
from trainers.algorithms.egpo.trainer import (
    EGPOCollator,
    EGPOTrainingArguments,
    PosttrainEGPOTrainer,
)
from trainers.algorithms.tokens import prompt_ids as prompt_token_ids
from trainers.contract.judges.spec import parse_judge
from trainers.contract.messages import Log
from trainers.contract.methods.egpo import EGPOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.core.egpo import egpo_loss, sequence_logps
from trainers.judges.registry import build_judge
from trainers.logprobs import causal_lm_logprobs
from trainers.records import build_dataset
from trainers.reporting import PauseRequest, Reporter
from trainers.runner import run_method

# Cyclic preferences over three styles, by the completion's first character; anything
# else ("other") loses to all three.
JUDGE = {
    "type": "pattern_table",
    "classes": [
        {"name": "a", "pattern": "^[a-hA-H]"},
        {"name": "b", "pattern": "^[i-pI-P]"},
        {"name": "c", "pattern": "^[q-zQ-Z]"},
    ],
    "preferences": [
        [0.5, 0.8, 0.2, 0.9],
        [0.2, 0.5, 0.8, 0.9],
        [0.8, 0.2, 0.5, 0.9],
        [0.1, 0.1, 0.1, 0.5],
    ],
}
SETTINGS = {"max_new_tokens": 8, "max_seq_length": 64}


def prompts(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Say something about thing {i}."}]}
            for i in range(n)]  # fmt: skip


def make_trainer(model_dir, tmp, *, lora=False, steps=4, lr=1e-2, cls=PosttrainEGPOTrainer,
                 **settings) -> PosttrainEGPOTrainer:  # fmt: skip
    args = EGPOTrainingArguments(
        output_dir=str(tmp), use_cpu=True, report_to="none", remove_unused_columns=False,
        per_device_train_batch_size=4, max_steps=steps, learning_rate=lr, save_strategy="no",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, seed=0,
        logging_steps=1, disable_tqdm=True,
        steps_per_iteration=2 if settings.get("extragradient", True) else 1,
    )  # fmt: skip
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir)  # noqa: E731
    return cls(
        model=load(),
        args=args,
        train_dataset=build_dataset(prompts(16)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        egpo=EGPOHyperparameters(judge=JUDGE, **{**SETTINGS, **settings}),
        judge=build_judge(parse_judge(JUDGE), seed=0),
        ref_model=None if lora else load(),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if lora else None,
    )


def state_of(trainer) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    opt = trainer._optimizer()
    order = [p for g in opt.param_groups for p in g["params"]]
    states = [{k: v.clone() for k, v in opt.state.get(p, {}).items()} for p in order]
    return params, states


def assert_same(a, b) -> None:
    (pa, sa), (pb, sb) = a, b
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


class Watched(PosttrainEGPOTrainer):
    """Records θ_t before each half step and checks it right before the full step's backward."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step % 2 == 0:
            self.theta_t = state_of(self)
        else:
            self.theta_half = state_of(self)  # after the half step, before the restore
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step % 2 == 1:
            assert_same(state_of(self), self.theta_t)  # restored, bit for bit
            self.checked = getattr(self, "checked", 0) + 1
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_full_step_starts_from_the_half_step_snapshot_bit_for_bit(model_dir, tmp_path, lora):
    trainer = make_trainer(model_dir, tmp_path, lora=lora, steps=4, cls=Watched)
    trainer.train()
    assert trainer.checked == 2  # both iterations' full steps were checked
    # the half step had really moved the weights and filled the optimizer state...
    params_half, states_half = trainer.theta_half
    params_t, states_t = trainer.theta_t
    assert any(not torch.equal(params_half[n], params_t[n]) for n in params_t)
    assert any(s for s in states_t)  # iteration 2: Adam's moments from iteration 1's full step
    assert any(
        not torch.equal(x[k], y[k]) for x, y in zip(states_half, states_t, strict=True) for k in x
    )
    logs = [h for h in trainer.state.log_history if "egpo_half" in h]
    assert [h["egpo_half"] for h in logs] == [0.0, 1.0, 0.0, 1.0]
    # the first half step moved the weights, yet the full step's loss is taken at θ_0 = the
    # reference: its log-ratio is exactly 0
    assert logs[0]["grad_norm"] > 0 and logs[1]["kl"] == 0.0
    assert {"loss", "win_rate_y", "win_rate_y_prime", "kl", "completion_length"} <= logs[0].keys()


def online_ipo_loop(model_dir, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Online IPO written out plainly: sample, judge, loss at θ, AdamW step; no Trainer."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    set_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    s = EGPOHyperparameters(judge=JUDGE, **SETTINGS)
    judge = build_judge(parse_judge(JUDGE), seed=0)
    sampler = TransformersSampler(tok, s.max_new_tokens)
    rows = build_dataset(prompts(16)).map(
        lambda r: {"prompt_ids": prompt_token_ids(tok, r["prompt"])}
    )
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=EGPOCollator())
    # the Trainer's default optimizer on this torch: AdamW, fused
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0, fused=True)
    policy.train()
    for _, batch in zip(range(steps), loader, strict=False):
        pair = sampler.sample(policy, batch["prompt_ids"], 2, s.temperature, s.top_k)
        opp = sampler.sample(policy, batch["prompt_ids"], 1, s.opponent_temperature, 0)
        y, yp = pair[0::2], pair[1::2]
        text = lambda ids: [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]  # noqa: E731
        n = len(y)
        probs = judge.prefer(
            batch["prompt"] * 2, text(y) + text(yp), text(opp) * 2, batch["items"] * 2
        )
        seqs = [p + c for p, c in zip(batch["prompt_ids"] * 2, y + yp, strict=True)]
        width = max(map(len, seqs))
        ids = torch.full((2 * n, width), tok.pad_token_id)
        labels = torch.full((2 * n, width), -100)
        mask = torch.zeros((2 * n, width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(batch["prompt_ids"] * 2, y + yp, strict=True)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
            mask[i, : len(p) + len(c)] = 1
        out = causal_lm_logprobs(policy, ids, labels, attention_mask=mask)
        lp = sequence_logps(out.logp, out.mask, normalize=True)
        with torch.no_grad():
            r = causal_lm_logprobs(ref, ids, labels, attention_mask=mask)
            lr_ = sequence_logps(r.logp, r.mask, normalize=True)
        loss, _ = egpo_loss(lp[:n], lp[n:], lr_[:n], lr_[n:], torch.tensor(probs[:n]),
                            torch.tensor(probs[n:]), beta=s.beta)  # fmt: skip
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in policy.named_parameters()}


def test_extrapolation_off_is_online_ipo_bit_for_bit(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, steps=3, lr=1e-2, extragradient=False)
    trainer.train()
    assert trainer.snapshot is None
    assert [h["egpo_half"] for h in trainer.state.log_history if "egpo_half" in h] == [0.0] * 3
    plain = online_ipo_loop(model_dir, steps=3, lr=1e-2)
    trained = dict(trainer.model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(p, plain[n]) for n, p in base.named_parameters())  # it learned
    for name, p in plain.items():
        assert torch.equal(trained[name].detach(), p), name


# ----------------------------------------------------------------------------- runner
HP = {"learning_rate": 1e-2, "batch_size": 4, "max_new_tokens": 8, "max_seq_length": 64,
      "lr_scheduler_type": "linear", "judge": JUDGE}  # fmt: skip


def plan_for(model_dir, root: Path, every: int, **hp) -> RunPlan:
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in prompts(12)))
    spec = JobSpec.model_validate({
        "model": str(model_dir), "training_file": "file-x", "seed": 3,
        "method": {"type": "egpo", "egpo": {"hyperparameters": {**HP, **hp}}},
    })  # fmt: skip
    return RunPlan(job_id="j", spec=spec, training_path=train, output_dir=root / "out",
                   data_dir=root, checkpoint_every_steps=every)  # fmt: skip


class PauseOnceLogged(PauseRequest):
    """A pause that becomes requested as soon as step ``after`` has been reported."""

    def __init__(self, reporter: Reporter, after: int):
        super().__init__()
        self.reporter, self.after = reporter, after

    @property
    def requested(self) -> bool:
        return any(isinstance(m, Log) and m.step >= self.after for m in self.reporter.sent)

    @requested.setter
    def requested(self, value) -> None:
        pass


def checkpoints(plan: RunPlan) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in plan.output_dir.glob("checkpoint-*"))


def test_pause_waits_for_the_full_step_and_resume_continues_exactly(model_dir, tmp_path):
    straight = plan_for(model_dir, tmp_path / "a", every=5, max_steps=8)
    done = run_method(METHOD, straight, Reporter())
    assert done.step == 8 and checkpoints(straight) == [6, 8]  # save_steps 5 -> 6

    plan = plan_for(model_dir, tmp_path / "b", every=5, max_steps=8)
    reporter = Reporter()
    # requested once step 2 is logged, i.e. seen at the end of step 3 (a half step): ignored
    # there, honoured at the end of step 4 (the full step)
    paused = run_method(METHOD, plan, reporter, PauseOnceLogged(reporter, after=2))
    assert paused.paused and paused.step == 4 and checkpoints(plan) == [4]
    steps = [m.step for m in reporter.sent if isinstance(m, Log)]
    assert steps == [1, 2, 3, 4]
    resumed = run_method(METHOD, plan, Reporter())
    assert resumed.step == 8 and not resumed.paused and checkpoints(plan) == [4, 6, 8]

    a, b = straight.output_dir / "checkpoint-8", plan.output_dir / "checkpoint-8"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][pid][k]), (pid, k)
    assert json.loads((a / "posttrain_egpo_state.json").read_text()) == json.loads(
        (b / "posttrain_egpo_state.json").read_text()
    )


# ---- a python grader as the judge, run through the training process's entry point
PY_JUDGE = {
    "type": "grader",
    "grader": {  # prefers completions with more letters 'e': a pointwise score per sample
        "type": "python",
        "name": "letters",
        "source": "def grade(sample, item):\n    return float(sample['output_text'].count('e'))\n",
    },
}


def test_a_python_grader_judge_runs_in_the_plans_sandbox(model_dir, tmp_path):
    """``trainers.run.execute`` runs every python grader of the process under the plan's
    sandbox settings: with the sandbox on, an EGPO job judged by a python grader trains and
    reports; with it off (a plan from a server that has it off), the judge cannot run and
    the job fails naming the grader."""
    from trainers.contract.messages import Error, Result
    from trainers.contract.sandbox import SandboxPolicy, probe
    from trainers.run import execute

    policy = SandboxPolicy(mode="bwrap")
    if probe(policy):
        pytest.skip(f"no working bubblewrap sandbox: {probe(policy)}")
    plan = plan_for(model_dir, tmp_path / "on", every=10, max_steps=2, judge=PY_JUDGE)
    reporter = Reporter()
    assert execute(plan.model_copy(update={"python_graders": policy}), reporter) == 0
    assert [m.step for m in reporter.sent if isinstance(m, Result)] == [2]
    assert [m.step for m in reporter.sent if isinstance(m, Log)] == [1, 2]

    off = plan_for(model_dir, tmp_path / "off", every=10, max_steps=2, judge=PY_JUDGE)
    reporter = Reporter()
    assert execute(off, reporter) != 0  # the plan's default: the python grader is off
    (error,) = [m for m in reporter.sent if isinstance(m, Error)]
    assert "python grader 'letters' cannot run" in error.message
