"""Benchmark: each offline method's step time relative to SFT on the same rows, one run.

    python -m bench.method_step_times                   # sft and bco (and oreo once it lands)
    python -m bench.method_step_times --methods sft,bco --steps 30 --rounds 2

The cost of a method's extra machinery (BCO's frozen reference forward and its UDM
classifier, OREO's reference and value model) shows as the ratio of its median step
time to SFT's on the same rows, batch size, sequence lengths and threads. Every
method runs through posttrain's own runner (``trainers.runner.run_method``) in its
own subprocess, alternating rounds; step time is the callback's on_step_begin ->
on_step_end wall time, median after two warm-up steps. Rows come from
``trainers/assets/demo_bco.jsonl`` (thumbs-up/down answers): SFT trains on the
same prompts and answers as prompt/completion pairs.
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
from importlib import resources
from pathlib import Path

ROWS = resources.files("trainers") / "assets" / "demo_bco.jsonl"


def _rows_for(method: str, work: Path) -> Path:
    rows = [json.loads(x) for x in ROWS.read_text().splitlines() if x.strip()]
    out = work / f"{method}.jsonl"
    if method == "sft":
        rows = [{"prompt": r["input"]["messages"], "completion": r["output"]} for r in rows]
    elif method == "oreo":  # the thumbs-up/down label is the trajectory's reward
        rows = [
            {
                "prompt": r["input"]["messages"][-1]["content"],
                "response": r["output"][0]["content"],
                "reward": float(r["label"]),
            }
            for r in rows
        ]
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def _worker(method: str, model: str, data: str, steps: int, threads: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from trainers import registry, runner
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.reporting import Reporter

    torch.set_num_threads(threads)
    times: list[float] = []

    class Timer(runner.ReportingCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self._t)
            return super().on_step_end(args, state, control, **kwargs)

    assert issubclass(Timer, TrainerCallback)
    runner.ReportingCallback = Timer
    hp = {"batch_size": 8, "learning_rate": 1e-3, "max_steps": steps}
    spec = JobSpec.model_validate(
        {
            "model": model,
            "training_file": "f",
            "method": {"type": method, method: {"hyperparameters": hp}},
        }
    )
    work = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
    plan = RunPlan(
        job_id="bench",
        spec=spec,
        training_path=Path(data),
        output_dir=work / "out",
        data_dir=work,
        checkpoint_every_steps=10**9,
        threads=threads,
    )
    runner.run_method(registry.resolve(spec.method_type), plan, Reporter(), None)
    return {"method": method, "times": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.method_step_times")
    p.add_argument("--methods", default="sft,bco")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(**json.loads(a.worker))))
        return 0
    from trainers.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    model = str(build_tiny_model(work / "model", seed=0))
    methods = a.methods.split(",")
    times: dict[str, list[float]] = {m: [] for m in methods}
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    for r in range(a.rounds):
        for m in methods if r % 2 == 0 else reversed(methods):
            job = {
                "method": m,
                "model": model,
                "data": str(_rows_for(m, work)),
                "steps": a.steps,
                "threads": a.threads,
            }
            out = subprocess.run(
                [sys.executable, "-m", "bench.method_step_times", "--worker", json.dumps(job)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[m] += res["times"][2:]
            print(f"  round {r + 1} {m:5s} median {statistics.median(res['times'][2:]):.4f} s/step")
    base = statistics.median(times["sft"]) if "sft" in times else None
    print(f"\n# tiny model, batch 8, {a.steps} steps x {a.rounds} rounds, {a.threads} thread(s)")
    print(f"{'method':8s} {'s/step':>8s} {'x SFT':>7s}")
    for m in methods:
        med = statistics.median(times[m])
        print(f"{m:8s} {med:8.4f} {med / base if base else float('nan'):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
