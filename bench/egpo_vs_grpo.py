"""Benchmark: EGPO's step time relative to GRPO, and EGPO's win-rate curve vs online IPO.

    python -m bench.egpo_vs_grpo                  # step time, EGPO / GRPO, one run
    python -m bench.egpo_vs_grpo --curve          # win-rate per iteration, EGPO vs online IPO
    python -m bench.egpo_vs_grpo --curve --seed 2 # the same, another job seed

Step time: both methods through posttrain's runner (``trainers.runner.run_method``) on
the tiny model, each in its own subprocess, alternating rounds, same threads, same
prompts (``bench/egpo_task.py``), the same number of completions per prompt (EGPO
samples y, y' and y''; GRPO gets ``num_generations`` 3) and the same completion
length. GRPO is scored by a regex grader, EGPO by the task's pattern-table judge. Step
time is on_step_begin -> on_step_end, median after two warm-up steps. EGPO's two kinds
of step are reported apart too: the full step also restores the snapshot.

Curve: EGPO and online IPO (``extragradient: false``) with the end-to-end test's
settings (``bench/egpo_task.py``) and the same seed, a checkpoint after every iteration
(two EGPO steps; two online-IPO steps, so both have seen the same prompt batches). Each
checkpoint's exact style mix is judged against the base model's (exact win-rate, 0.5 =
the base) and compared with the regularised equilibrium of the base's mix (mean total
variation over the prompts). ``--seed`` picks the job seed (data order, sampling).
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

from bench import egpo_task as task

NEW_TOKENS = 16


def _spec(method: str, model: str, steps: int, **extra) -> dict:
    if method == "egpo":
        hp = {"judge": task.JUDGE, "batch_size": 8, "learning_rate": 1e-3, "max_steps": steps,
              "max_new_tokens": NEW_TOKENS, "max_seq_length": 128, **extra}  # fmt: skip
        block = {"hyperparameters": hp}
    else:
        grader = {"type": "regex", "name": "style", "input": "{{sample.output_text}}",
                  "pattern": "^[a-hA-H]"}  # fmt: skip
        hp = {"batch_size": 24, "num_generations": 3, "learning_rate": 1e-3,
              "max_steps": steps, "max_completion_length": NEW_TOKENS, "max_seq_length": 128,
              "rollout_engine": "transformers"}  # fmt: skip
        block = {"graders": [grader], "hyperparameters": hp}
    return {"model": model, "training_file": "f", "seed": 1,
            "method": {"type": method, method: block}}  # fmt: skip


def _worker(method: str, model: str, data: str, steps: int, threads: int) -> dict:
    import torch

    from trainers import registry, runner
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.reporting import Reporter

    torch.set_num_threads(threads)
    times: list[tuple[int, float]] = []

    class Timer(runner.ReportingCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append((state.global_step, time.perf_counter() - self._t))
            return super().on_step_end(args, state, control, **kwargs)

    runner.ReportingCallback = Timer
    spec = JobSpec.model_validate(_spec(method, model, steps))
    work = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    plan = RunPlan(job_id="bench", spec=spec, training_path=Path(data), output_dir=work / "out",
                   data_dir=work, checkpoint_every_steps=10**9, threads=threads)  # fmt: skip
    runner.run_method(registry.resolve(spec.method_type), plan, Reporter(), None)
    return {"method": method, "times": times}


def step_times(a) -> None:
    from trainers.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-egpo-"))
    model = str(build_tiny_model(work / "model", seed=0))
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task.prompt_rows(32)))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    times: dict[str, list[tuple[int, float]]] = {"grpo": [], "egpo": []}
    for r in range(a.rounds):
        for m in ("grpo", "egpo") if r % 2 == 0 else ("egpo", "grpo"):
            job = {"method": m, "model": model, "data": str(data), "steps": a.steps,
                   "threads": a.threads}  # fmt: skip
            out = subprocess.run(
                [sys.executable, "-m", "bench.egpo_vs_grpo", "--worker", json.dumps(job)],
                capture_output=True, text=True, env=env, check=True,
            )  # fmt: skip
            res = [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])["times"]]
            times[m] += res[2:]
            med = statistics.median(t for _, t in res[2:])
            print(f"  round {r + 1} {m} median {med:.4f} s/step")
    grpo = statistics.median(t for _, t in times["grpo"])
    egpo = statistics.median(t for _, t in times["egpo"])
    half = statistics.median(t for s, t in times["egpo"] if s % 2 == 1)  # steps 1, 3, ...
    full = statistics.median(t for s, t in times["egpo"] if s % 2 == 0)
    print(f"\n# tiny model, 8 prompts x 3 completions of <= {NEW_TOKENS} tokens per step, "
          f"{a.steps} steps x {a.rounds} rounds, {a.threads} thread(s)")  # fmt: skip
    print(f"{'method':12s} {'s/step':>8s} {'x GRPO':>7s}")
    for name, med in (("grpo", grpo), ("egpo", egpo), ("egpo half", half), ("egpo full", full)):
        print(f"{name:12s} {med:8.4f} {med / grpo:7.2f}")


def curve(a) -> None:
    import torch

    from trainers.algorithms.egpo.method import METHOD
    from trainers.contract.checkpoints import checkpoint_dir
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.reporting import Reporter
    from trainers.runner import run_method
    from trainers.tiny_model import build_tiny_model

    HP = task.HYPERPARAMETERS
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-egpo-curve-"))
    model = build_tiny_model(work / "model", seed=0)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task.prompt_rows(task.PROMPTS)))
    base = task.style_probabilities(model)
    star = task.equilibrium(base)
    win_star = task.win_rate(star, base)
    print(f"style mix a/b/c: base {task.mean_mix(base)}, equilibrium (beta {task.BETA}) "
          f"{task.mean_mix(star)}, whose win-rate vs the base is {win_star:.3f}")  # fmt: skip
    print(f"{HP['max_steps']} steps x {task.PROMPTS} prompts, lr {HP['learning_rate']} "
          f"({HP['lr_scheduler_type']}), seed {a.seed}, {a.threads} thread(s)")  # fmt: skip
    rows: dict[str, list[tuple[float, float, list[float]]]] = {}
    seconds: dict[str, float] = {}
    for name, eg in (("egpo", True), ("online_ipo", False)):
        spec = JobSpec.model_validate({
            "model": str(model), "training_file": "f", "seed": a.seed,
            "method": {"type": "egpo", "egpo": {"hyperparameters": {**HP, "extragradient": eg}}},
        })  # fmt: skip
        plan = RunPlan(job_id=name, spec=spec, training_path=data, output_dir=work / name,
                       data_dir=work, checkpoint_every_steps=2, threads=a.threads)  # fmt: skip
        t0 = time.perf_counter()
        run_method(METHOD, plan, Reporter())
        seconds[name] = time.perf_counter() - t0
        rows[name] = []
        for step in range(2, HP["max_steps"] + 1, 2):
            pi = task.style_probabilities(checkpoint_dir(plan.output_dir, step))
            rows[name].append((task.win_rate(pi, base), task.tv(pi, star), task.mean_mix(pi)))
    print(f"\n{'iter':>4s} {'EGPO win':>9s} {'EGPO TV*':>9s} {'EGPO mix':>20s} "
          f"{'OIPO win':>9s} {'OIPO TV*':>9s} {'OIPO mix':>20s}")  # fmt: skip
    for i, (e, o) in enumerate(zip(rows["egpo"], rows["online_ipo"], strict=True)):
        if (i + 1) % a.every and i + 1 != len(rows["egpo"]):
            continue
        print(f"{i + 1:4d} {e[0]:9.3f} {e[1]:9.3f} {e[2]!s:>20s} "
              f"{o[0]:9.3f} {o[1]:9.3f} {o[2]!s:>20s}")  # fmt: skip
    print(
        f"(win = exact judged win-rate vs the base, 0.5 = the base itself; TV* = mean total "
        f"variation of the style mix to the equilibrium, base {task.tv(base, star):.3f}; "
        f"training {seconds['egpo']:.1f} s EGPO, {seconds['online_ipo']:.1f} s online IPO)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.egpo_vs_grpo")
    p.add_argument("--curve", action="store_true", help="win-rate curve, EGPO vs online IPO")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1, help="--curve: the job seed")
    p.add_argument("--every", type=int, default=1, help="--curve: print every Nth iteration")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(**json.loads(a.worker))))
    elif a.curve:
        curve(a)
    else:
        step_times(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
