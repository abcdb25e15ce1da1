"""Benchmark: step time of every posttrain GRPO variant vs plain TRL ``GRPOTrainer``.

    python -m bench.grpo_variants                     # all six variants, 2 rounds, ~6 min
    python -m bench.grpo_variants --variants xrpo,hapo --rounds 1       # quicker look
    python -m bench.grpo_variants --variants xrpo --set xrpo_exemplars=0  # a piece off
    python -m bench.grpo_variants --variants hapo --rounds 1 --profile  # cProfile by function

Per variant V (``grpo dapo dr_grpo ngrpo xrpo hapo``) three runs, each in its own
subprocess:

- ``posttrain``: a ``JobSpec`` with method ``{"type": "grpo", "grpo": {"variant": V,
  "graders": [...], "hyperparameters": {...}}}`` run in-process through posttrain's
  own runner, ``trainers.runner.run_method(trainers.registry.resolve("grpo"), plan,
  Reporter())``: ``PosttrainGRPOTrainer`` with the config, data mapping, reward
  functions, pieces and ``ReportingCallback`` the service uses, on posttrain's kernel;
- ``trl``: plain ``trl.GRPOTrainer`` + ``GRPOConfig`` on TRL's own fused-head kernel
  (``restore_trl_kernel()``);
- ``trl+pk``: the same plain TRL run after ``use_posttrain_kernel()``.

``--score-all`` runs every kind with ``trainers.fused_head.SKIP_MASKED_ROWS = False``:
posttrain's kernel scores every position on CPU, prompt and padding included, as it did
before the forward passed it only the labelled ones (the baseline of that change).
``--one-group`` runs posttrain's trainer with ``trainers.algorithms.grpo.padding.
LENGTH_GROUPS = False``: its log-prob forwards score the batch as one block left-padded
to the longest prompt, as TRL does, instead of in length groups (XRPO's seeded prompts).
``--extra-forward`` runs posttrain's trainer with ``trainers.algorithms.grpo.trainer.
DEFER_SHAPER = False``: XRPO's novelty shaper gets the sampling policy's log-probs from
one more no-grad forward of the rollout batch, as before, instead of from the loss's own
forward (only where TRL computes none: ``--set steps_per_generation=1``).

``x TRL`` = posttrain / trl is what the targets are set on (<= 1.05 for ``grpo``,
``dapo``, ``dr_grpo``, which posttrain hands to TRL unchanged; <= 1.10 for ``xrpo``
and ``hapo``; ``ngrpo`` is reported only). It includes the kernel swap, so
``x TRL+pk`` = posttrain / trl+pk is printed too: the variant's own cost with the
kernel held equal (the ``own`` column applies the same target to it), and
``trl+pk / trl`` is the kernel's effect alone.

The baseline is written out here, not derived from posttrain: every shared field is
what posttrain's ``common_config`` sets on CPU (fp32, seed/data_seed 42, lr 1e-6
linear, no gradient checkpointing, logging every step, ...), the variant's TRL fields
come from ``TRL_MATCH``: the preset's loss_type / epsilon / epsilon_high / beta /
scale_rewards / mask_truncated_completions for ``grpo``/``dapo``/``dr_grpo``, and for
``ngrpo``/``xrpo``/``hapo`` the same rollout count, loss_type, clip widths and beta
(their estimators, planner, objective and temperature rule have no TRL equivalent),
and for every variant the preset's update schedule (``steps_per_generation``) fitted to
``--prompts`` as posttrain fits it (``schedule``; ``--set steps_per_generation=N``
changes both runs). The ``GRPOConfig`` posttrain actually built is then diffed against
the baseline's and every unexpected difference is printed, so a mismatch cannot hide.

Same in every run: model, data, rollouts (``num_generations`` 8, 16 completions =
2 prompts per step, ``max_completion_length`` 32, temperature 1), the reward
function (posttrain's ``build_reward_function`` of one ``regex`` grader in all
runs, so reward cost is equal), seed, fp32 on CPU, ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` = ``--threads`` (default 1, as in ``bench.trainer_heads``:
on a shared 2-core box two threads per run get descheduled and time noise).

Model: a random Qwen2 with ``--hidden`` (256), ``--layers`` (2), ``--vocab`` (32768)
rows in the tied head, and the 942-token tokenizer of ``trainers.tiny_model``
(ids it does not know decode to nothing). A random model over 32768 ids almost never
samples ``<|end|>``, so every completion runs the full 32 tokens in every run.
Prompts: the first ``--prompts`` (4) rows of ``trainers/assets/demo_grpo.jsonl``, so
each is revisited every other step, which is what exercises XRPO's allocator
(ragged groups) and its in-context seeding (an unsolved prompt gets K=2 solved
exemplars as earlier chat turns: a longer prompt). The grader scores 1 when the
decoded completion matches ``--pattern`` (default ``o``: ~15% of completions, so
many groups stay unsolved and XRPO seeds; ``\\w`` gives ~40% and hardly any seeding).

Measured: step time = ``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback``
(generation, reward, advantages, the loss forward/backward, clipping, AdamW step),
as wall time and as the process's CPU time (``cpu s``; with one thread it is the step's
compute, which other processes on a loaded machine inflate far less than the wall time).
The baseline adds the probe as a callback. posttrain's runner builds its callbacks
itself, so the worker replaces ``trainers.runner.ReportingCallback`` with a subclass
that times the same two hooks and is otherwise the service's callback (its
``on_step_end`` runs inside the timed window). Outside it: logging (``on_log`` ->
``Reporter``), data loading, checkpoint saves (posttrain forces one after the last
step); ``gap`` is the median ``on_step_end`` -> next ``on_step_begin``, which holds
the first two. TRL's own ``step_time`` metric (``training_step`` only, no optimiser
step) is printed as a cross-check. Median over the steps after ``--warmup`` (2:
step 1 pays one-time costs, and with 4 prompts at 2 a step, steps 1-2 are every
prompt's first visit, so XRPO's steady state starts at step 3); rounds alternate the
run order (posttrain, trl, trl+pk / reversed) and keep each run's lowest median.
``tok/step`` is TRL's count of non-pad prompt + completion tokens per step; the
batch is left-padded to its longest prompt, so padded positions grow faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("grpo", "dapo", "dr_grpo", "ngrpo", "xrpo", "hapo")
KINDS = ("posttrain", "trl", "trl+pk")
# posttrain / plain TRL, per variant (None: reported only)
TARGETS = {"grpo": 1.05, "dapo": 1.05, "dr_grpo": 1.05, "ngrpo": None, "xrpo": 1.10, "hapo": 1.10}
SEED = 42  # JobSpec's default seed, which posttrain's common_config passes to seed/data_seed
NUM_GENERATIONS, BATCH = 8, 16

# The TRL GRPOConfig fields each posttrain preset is compared against (grpo_presets.PRESETS,
# as TRL names them). grpo/dapo/dr_grpo: exactly what posttrain hands TRL. ngrpo/xrpo/hapo:
# same loss_type, clip widths and beta; their estimator/planner/objective/temperature rule
# have no TRL equivalent.
TRL_MATCH: dict[str, dict] = {
    "grpo": {"loss_type": "grpo", "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.2},
    "dapo": {
        "loss_type": "dapo",
        "beta": 0.0,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "mask_truncated_completions": True,
    },
    "dr_grpo": {
        "loss_type": "dr_grpo",
        "beta": 0.0,
        "epsilon": 0.2,
        "epsilon_high": 0.2,
        "scale_rewards": "none",
    },
    "ngrpo": {"loss_type": "bnpo", "beta": 0.0, "epsilon": 0.16, "epsilon_high": 0.24},
    "xrpo": {"loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.2},
    "hapo": {"loss_type": "bnpo", "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28},
}


def schedule(variant: str, overrides: dict, prompts: int) -> int:
    """The preset's optimizer steps per generated batch, fitted to the prompts as posttrain
    fits it (``trainers.algorithms.grpo.method.updates_per_generation``), for the baseline."""
    from trainers.contract.methods.grpo import PIECE_DEFAULTS, PRESETS

    wanted = overrides.get("steps_per_generation") or PRESETS[variant].get(
        "steps_per_generation", PIECE_DEFAULTS["steps_per_generation"]
    )
    return max(1, min(int(wanted), prompts // (BATCH // NUM_GENERATIONS)))


# Config fields that may differ between posttrain's GRPOConfig and the baseline's.
EXPECTED_DIFF = {"output_dir", "logging_dir", "run_name", "save_strategy", "save_steps"}


# --------------------------------------------------------------------------- model + data
def build_model(out_dir: str, hidden: int, vocab: int, layers: int) -> int:
    """Write the wide random model + tiny tokenizer to ``out_dir``; returns its parameter count."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from trainers.tiny_model import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, hidden, layers)
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def write_prompts(path: Path, n: int) -> None:
    """The first ``n`` rows of the demo GRPO file (chat ``messages`` + ``answer``)."""
    rows = (REPO / "trainers/assets/demo_grpo.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(rows) + "\n")


def grader(pattern: str) -> dict:
    return {"type": "regex", "name": "match", "input": "{{sample.output_text}}", "pattern": pattern}


# --------------------------------------------------------------------------- measuring
def _probe_class(base):
    """``base`` (a TrainerCallback class) that also records step times and logged metrics."""

    class StepProbe(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.logs: list[dict] = []
            self.args_dict: dict = {}
            self.kernel = ""

        def on_train_begin(self, args, state, control, **kw):
            from trainers.fused_head import posttrain_kernel_active

            self.args_dict = json.loads(json.dumps(args.to_dict(), default=str))
            self.kernel = "posttrain" if posttrain_kernel_active() else "trl"
            return super().on_train_begin(args, state, control, **kw)

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append(time.perf_counter())
            self._cpu0 = time.process_time()
            return super().on_step_begin(args, state, control, **kw)

        def on_step_end(self, args, state, control, **kw):
            out = super().on_step_end(args, state, control, **kw)
            self.ends.append(time.perf_counter())
            self.times.append(self.ends[-1] - self.begins[-1])
            self.cpu.append(time.process_time() - self._cpu0)
            return out

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "train_runtime" not in logs:
                self.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            return super().on_log(args, state, control, logs=logs, **kw)

        def result(self) -> dict:
            def series(key: str) -> list[float]:
                return [round(float(entry[key]), 4) for entry in self.logs if key in entry]

            tokens = series("num_tokens")
            return {
                "times": [round(t, 4) for t in self.times],
                "cpu": [round(t, 4) for t in self.cpu],
                # step i's end -> step i+1's begin: logging, callbacks, data (not the last step)
                "gap": [round(b - a, 4) for a, b in zip(self.ends, self.begins[1:], strict=False)],
                "trl_step_time": series("step_time"),
                "tokens": [b - a for a, b in zip([0.0, *tokens], tokens, strict=False)],
                "seeded": series("rollout/seeded_prompts"),
                "reward": series("reward"),
                "kernel": self.kernel,
                "args": self.args_dict,
            }

    return StepProbe


def run_posttrain(spec: dict, work: Path) -> dict:
    """posttrain's runner, in-process, with a timing subclass of its ReportingCallback."""
    import trainers.runner as runner
    from trainers import registry
    from trainers.callbacks import ReportingCallback
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.reporting import Reporter

    probes = []

    class ProbedReportingCallback(_probe_class(ReportingCallback)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probes.append(self)

    runner.ReportingCallback = ProbedReportingCallback
    hp = {
        "num_generations": NUM_GENERATIONS,
        "batch_size": BATCH,
        "max_completion_length": spec["max_completion_length"],
        "temperature": 1.0,
        "max_steps": spec["steps"],
        "rollout_engine": "transformers",
        **spec.get("overrides", {}),
    }
    job = JobSpec.model_validate(
        {
            "model": spec["model"],
            "training_file": "file-bench",
            "seed": SEED,
            "method": {
                "type": "grpo",
                "grpo": {
                    "variant": spec["variant"],
                    "graders": [spec["grader"]],
                    "hyperparameters": hp,
                },
            },
        }
    )
    plan = RunPlan(
        job_id="bench",
        spec=job,
        training_path=Path(spec["data"]),
        output_dir=work / "out",
        data_dir=work,
        checkpoint_every_steps=10**6,  # only the forced final save (after the last step)
        threads=spec["threads"],
    )
    runner.run_method(registry.resolve("grpo"), plan, Reporter(), None)
    return probes[0].result()


def run_trl(spec: dict, work: Path) -> dict:
    """Plain ``trl.GRPOTrainer`` on TRL's kernel or, with kind ``trl+pk``, posttrain's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainers.fused_head import restore_trl_kernel, use_posttrain_kernel
    from trainers.graders.reward import build_reward_function

    (use_posttrain_kernel if spec["kind"] == "trl+pk" else restore_trl_kernel)()
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line]
    train = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(
        output_dir=str(work / "out"),
        seed=SEED,
        data_seed=SEED,
        num_train_epochs=3,
        max_steps=spec["steps"],
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        warmup_steps=0.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="no",
        num_generations=NUM_GENERATIONS,
        num_generations_eval=1,
        max_completion_length=spec["max_completion_length"],
        temperature=1.0,
        log_completions=False,
        use_vllm=False,
        steps_per_generation=spec["steps_per_generation"],
        logging_nan_inf_filter=False,  # as posttrain's runner sets it
        **TRL_MATCH[spec["variant"]],
    )
    probe = _probe_class(TrainerCallback)()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32),
        reward_funcs=[build_reward_function(spec["grader"])],
        args=args,
        train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=[probe],
    )
    trainer.train()
    return probe.result()


def run_worker(spec: dict) -> dict:
    import torch

    from trainers import fused_head
    from trainers.algorithms.grpo import padding
    from trainers.algorithms.grpo import trainer as grpo_trainer

    torch.set_num_threads(spec["threads"])
    fused_head.SKIP_MASKED_ROWS = not spec.get("score_all")  # read at each forward
    padding.LENGTH_GROUPS = not spec.get("one_group")
    grpo_trainer.DEFER_SHAPER = not spec.get("extra_forward")
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        run = run_posttrain if spec["kind"] == "posttrain" else run_trl
        if not spec.get("profile"):
            return run(spec, Path(tmp))
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(run, spec, Path(tmp))
        stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative")
        print(f"=== cProfile {spec['variant']} {spec['kind']} (cumulative) ===", file=sys.stderr)
        stats.print_stats(r"trainers/|trl/trainer|generation/utils", 40)
        return result


def _subprocess(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.grpo_variants",
                "--worker",
                json.dumps(spec),
                "--out",
                out,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if spec.get("profile"):
            print(proc.stderr[proc.stderr.find("=== cProfile") :], flush=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


# --------------------------------------------------------------------------- summarising
def _median(xs: list[float], warmup: int) -> float:
    xs = xs[warmup:] or xs
    return statistics.median(xs) if xs else float("nan")


def summarise(r: dict, warmup: int) -> dict:
    if "error" in r:
        return r
    return {
        "s_step": _median(r["times"], warmup),
        "cpu_step": _median(r["cpu"], warmup),
        "gap": _median(r["gap"], warmup),
        "trl_step": _median(r["trl_step_time"], warmup),
        "tokens": _median(r["tokens"], warmup),
        "seeded": statistics.mean(r["seeded"][warmup:] or r["seeded"]) if r["seeded"] else None,
        "reward": statistics.mean(r["reward"]) if r["reward"] else float("nan"),
        "kernel": r["kernel"],
        "times": r["times"],
        "args": r["args"],
    }


def merge(old: dict | None, new: dict) -> dict:
    """Keep the minimum median per timing over rounds; concatenate the raw step times."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    out = dict(old)
    for key in ("s_step", "cpu_step", "gap", "trl_step"):
        out[key] = min(old[key], new[key])
    out["times"] = old["times"] + new["times"]
    return out


def config_diff(posttrain_args: dict, trl_args: dict) -> list[str]:
    keys = sorted((set(posttrain_args) | set(trl_args)) - EXPECTED_DIFF)
    return [
        f"{k}: posttrain={posttrain_args.get(k)!r} trl={trl_args.get(k)!r}"
        for k in keys
        if posttrain_args.get(k) != trl_args.get(k)
    ]


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print(
        f"\n{'variant':<9}{'s/step':>8}  {'x TRL':>6}  {'x TRL+pk':>8}  {'target':>6}  {'ok':<5}"
        f"{'own':<5}"
        f"{'gap s':>7}{'TRL gap':>8}{'tok/step':>10}{'seeded':>8}{'reward':>8}"
        f"{'cpu s':>7}{'cpu x TRL+pk':>13}"
    )
    for variant, by_kind in results.items():
        pt, trl, pk = (by_kind.get(k, {"error": "not run"}) for k in KINDS)
        if "error" in pt:
            print(f"{variant:<9} failed: {pt['error']}")
            continue
        r_trl = pt["s_step"] / trl["s_step"] if "s_step" in trl else float("nan")
        r_pk = pt["s_step"] / pk["s_step"] if "s_step" in pk else float("nan")
        target = TARGETS[variant]
        ok, own = (
            "-" if target is None or r != r else ("ok" if r <= target else "MISS")
            for r in (r_trl, r_pk)
        )
        seeded = "-" if pt["seeded"] is None else f"{pt['seeded']:.2f}"
        print(
            f"{variant:<9}{pt['s_step']:8.3f}  {r_trl:6.3f}  {r_pk:8.3f}  "
            f"{'-' if target is None else f'{target:.2f}':>6}  {ok:<5}{own:<5}"
            f"{pt['gap']:7.3f}{trl.get('gap', float('nan')):8.3f}{pt['tokens']:10.0f}{seeded:>8}"
            f"{pt['reward']:8.3f}{pt['cpu_step']:7.3f}"
            f"{pt['cpu_step'] / pk['cpu_step'] if 'cpu_step' in pk else float('nan'):13.3f}"
        )
    print(
        f"\nbaselines (kernel effect = trl+pk / trl):\n"
        f"{'variant':<9}{'kind':<10}{'kernel':<10}{'s/step':>8}{'gap s':>7}"
        f"{'TRL step_time':>14}{'tok/step':>10}{'reward':>8}"
    )
    for variant, by_kind in results.items():
        for kind in KINDS:
            r = by_kind.get(kind)
            if r is None:
                continue
            if "error" in r:
                print(f"{variant:<9}{kind:<10} failed: {r['error']}")
                continue
            extra = ""
            if kind == "trl+pk" and "s_step" in by_kind.get("trl", {}):
                extra = f"   kernel effect {r['s_step'] / by_kind['trl']['s_step']:.3f}"
            print(
                f"{variant:<9}{kind:<10}{r['kernel']:<10}{r['s_step']:8.3f}{r['gap']:7.3f}"
                f"{r['trl_step']:14.3f}{r['tokens']:10.0f}{r['reward']:8.3f}{extra}"
            )
    diffs, compared = [], []
    for variant, by_kind in results.items():
        pt = by_kind.get("posttrain", {})
        base = next((by_kind[k] for k in KINDS[1:] if "args" in by_kind.get(k, {})), {})
        if "args" in pt and base:
            compared.append(variant)
            diffs += [f"  {variant}: {d}" for d in config_diff(pt["args"], base["args"])]
    verdict = "not compared" if not compared else "DIFFERS" if diffs else "identical"
    print(
        f"\nGRPOConfig posttrain vs baseline ({', '.join(compared) or '-'}; "
        f"{', '.join(sorted(EXPECTED_DIFF))} may differ): {verdict}"
    )
    for line in diffs:
        print(line)
    print("\nper-step wall times (s), all rounds, warm-up included:")
    for variant, by_kind in results.items():
        for kind, r in by_kind.items():
            print(f"  {variant:<8}{kind:<10}{r.get('times', r.get('error'))}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--kinds", default=",".join(KINDS), help="runs per variant")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating the run order")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each run")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--completion-length", type=int, default=32, help="max_completion_length")
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts (2 per step)")
    ap.add_argument("--pattern", default="o", help="regex grader pattern (reward 1 on match)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a posttrain hyperparameter (diagnosis), e.g. --set xrpo_exemplars=0",
    )
    ap.add_argument(
        "--score-all",
        action="store_true",
        help="posttrain's kernel scores every position on CPU, prompt and padding included "
        "(as before it skipped them): the baseline of the masked-row skipping",
    )
    ap.add_argument(
        "--one-group",
        action="store_true",
        help="posttrain's GRPO trainer scores the batch as one left-padded block, as TRL "
        "does (no length groups): the baseline of trainers/algorithms/grpo/padding.py",
    )
    ap.add_argument(
        "--extra-forward",
        action="store_true",
        help="XRPO's novelty shaper reads its log-probs from a no-grad forward of its own, as "
        "before, not from the loss's forward: the baseline of the deferred shaper",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the posttrain + trl+pk runs (times inflated)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        Path(args.out).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return
    variants, kinds = args.variants.split(","), args.kinds.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    if args.profile:
        kinds = [k for k in kinds if k != "trl"]
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grpo-model-") as tmp:
        n_params = build_model(tmp, args.hidden, args.vocab, args.layers)
        data = Path(tmp) / "train.jsonl"
        write_prompts(data, args.prompts)
        print(
            f"# bench.grpo_variants  hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
            f"params={n_params / 1e6:.1f}M  G={NUM_GENERATIONS} completions/step={BATCH} "
            f"max_completion_length={args.completion_length} prompts={args.prompts} "
            f"grader=regex {args.pattern!r}  steps={args.steps} (warm-up {args.warmup}) "
            f"rounds={args.rounds} threads={args.threads}"
            + (f"  posttrain overrides {overrides}" if overrides else "")
            + ("  score-all (masked rows scored)" if args.score_all else "")
            + ("  one-group (no length groups)" if args.one_group else "")
            + ("  extra-forward (shaper not deferred)" if args.extra_forward else ""),
            flush=True,
        )
        results: dict[str, dict[str, dict]] = {v: {} for v in variants}
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for variant in variants:
                for kind in order:
                    spec = {
                        "variant": variant,
                        "kind": kind,
                        "model": tmp,
                        "data": str(data),
                        "grader": grader(args.pattern),
                        "steps": args.steps,
                        "threads": args.threads,
                        "max_completion_length": args.completion_length,
                        "profile": args.profile,
                        "score_all": args.score_all,
                        "one_group": args.one_group,
                        "extra_forward": args.extra_forward,
                        "steps_per_generation": schedule(variant, overrides, args.prompts),
                        "overrides": overrides,
                    }
                    t0 = time.perf_counter()
                    r = summarise(_subprocess(spec, args.threads), args.warmup)
                    results[variant][kind] = merge(results[variant].get(kind), r)
                    print(
                        f"  round {rnd + 1} {variant:<8}{kind:<10}"
                        + (
                            f"{r['s_step']:.3f} s/step  gap {r['gap']:.3f}  "
                            f"{r['tokens']:.0f} tok/step"
                            if "error" not in r
                            else f"failed: {r['error']}"
                        )
                        + f"  ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
        for by_kind in results.values():  # fixed row order
            for k in [k for k in KINDS if k in by_kind]:
                by_kind[k] = by_kind.pop(k)
    print_table(results)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
