"""Benchmark: a 2-process CPU DDP job (gloo) against a 1-process job on the same global batch.

    OMP_NUM_THREADS=1 python -m bench.ddp_cpu              # ~4 min on 2 idle cores
    python -m bench.ddp_cpu --steps 24 --hidden 384

Both jobs run exactly as a worker runs them (``workers.launch``: the same
placement, accelerate config, environment and report channel; one thread per
process), an SFT job on a tiny Qwen2 (``trainers.tiny_model``) with prompt /
completion rows of corpus text, the same seed, global batch and step count. The
2-process job goes through ``accelerate launch`` (DDP, gloo); the 1-process job
runs ``trainers.run`` directly.

Reported: the max |Δ| between the two runs' final parameters (the tolerance is
stated with the result), and throughput = trained tokens / the trainer's own
``train_runtime`` (so process start-up and model loading are not counted), with
the 2-process/1-process ratio. The machine may be shared: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# fp32, AdamW: DDP all-reduces two half-batch gradients (sum / 2, each already scaled
# by the global token count), one process sums them in one go, so the gradients
# differ in summation order only (a few ulp). Adam's update divides by sqrt(v), which
# can turn ulp-level differences of near-zero gradients into ~1e-6 relative steps;
# over a few dozen steps at lr 1e-3 that stays well below 1e-4 absolute.
TOLERANCE = 1e-4


def _rows(n: int, words: int, seed: int) -> list[dict]:
    text = (REPO / "trainers" / "assets" / "corpus.txt").read_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(text) - words)
        chunk = text[start : start + words]
        cut = len(chunk) // 4
        out.append({"prompt": " ".join(chunk[:cut]), "completion": " " + " ".join(chunk[cut:])})
    return out


def run_job(root: Path, model: Path, data: Path, processes: int, args) -> dict:
    """One job through ``workers.launch``; returns its reports and final parameters."""
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from workers import launch
    from workers.placement import available_strategies, place

    hp = {"n_epochs": 1, "batch_size": args.batch, "learning_rate": args.lr}
    spec = JobSpec.model_validate(
        {
            "model": str(model),
            "training_file": "file-bench",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "resources": {"gpus": 0, "processes": processes},
        }
    )
    out = root / f"p{processes}"
    plan = RunPlan(
        job_id=f"bench-p{processes}",
        spec=spec,
        training_path=data,
        output_dir=out / "output",
        data_dir=root,
        checkpoint_every_steps=10_000,  # only the final checkpoint
        threads=1,
        processes=processes,
        pause_path=out / "pause",
    )
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(plan.model_dump_json())
    placement = place(spec.resources, [], available_strategies())
    config = (
        launch.write_accelerate_config(placement, out / "accelerate.json")
        if placement.launched
        else None
    )
    channel = launch.ReportChannel(placement.launched)
    env = launch.training_env(dict(os.environ), placement, threads=1)
    with open(out / "train.log", "wb") as log:
        proc = subprocess.Popen(
            launch.training_command(placement, plan_path, channel.args, config),
            pass_fds=channel.pass_fds,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    channel.started()
    lines = _read_reports(proc, channel.read_fd)
    channel.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process job failed ({proc.returncode}); see {out}")
    result = next(m for m in lines if m["type"] == "result")
    summary = next(
        m for m in lines if m["type"] == "event" and "train_runtime" in (m["data"] or {})
    )
    from safetensors.torch import load_file

    from trainers.contract.checkpoints import checkpoint_dir

    params = load_file(checkpoint_dir(out / "output", result["step"]) / "model.safetensors")
    return {
        "steps": result["step"],
        "tokens": result["trained_tokens"],
        "runtime": summary["data"]["train_runtime"],
        "losses": [m["metrics"]["loss"] for m in lines if m["type"] == "log"],
        "params": params,
        "log_steps": [m["step"] for m in lines if m["type"] == "log"],
    }


def _read_reports(proc: subprocess.Popen, fd: int) -> list[dict]:
    buf = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], 0.25)
            chunk = pipe.read(65536) if ready else b""
            buf += chunk
            if ready and not chunk:  # EOF of an inherited pipe
                break
            if proc.poll() is not None and not ready:
                break
    proc.wait()
    return [json.loads(line) for line in buf.decode().splitlines() if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps of each job")
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    ap.add_argument("--words", type=int, default=160, help="words of corpus text per row")
    ap.add_argument("--hidden", type=int, default=256, help="tiny model hidden size")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved runs of each; the best tokens/s counts"
    )
    args = ap.parse_args(argv)

    import torch

    from trainers.tiny_model import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    model = build_tiny_model(
        root / "model", seed=0, hidden_size=args.hidden, num_layers=args.layers
    )
    data = root / "rows.jsonl"
    rows = _rows(args.steps * args.batch, args.words, seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = sum(t.numel() for t in build_params(model).values())
    print(
        f"# bench.ddp_cpu  torch={torch.__version__} cores={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.2f}  model: hidden {args.hidden}, {args.layers} layers, "
        f"{params / 1e6:.2f}M params; {args.steps} steps x global batch {args.batch} rows"
    )
    runs: dict[int, dict] = {}
    best: dict[int, float] = {}
    for rnd in range(args.rounds):  # interleaved: a busy spell of a shared machine hits both
        for processes in (1, 2):
            t0 = time.perf_counter()
            r = run_job(root / f"round{rnd}", model, data, processes, args)
            runs.setdefault(processes, r)
            best[processes] = max(best.get(processes, 0.0), r["tokens"] / r["runtime"])
            print(
                f"round {rnd + 1}, {processes} process(es): {r['steps']} steps, "
                f"{r['tokens']} tokens, train_runtime {r['runtime']:.2f} s -> "
                f"{r['tokens'] / r['runtime']:.0f} tokens/s (wall incl. start-up "
                f"{time.perf_counter() - t0:.1f} s); loss {r['losses'][0]:.4f} -> "
                f"{r['losses'][-1]:.4f}; load {os.getloadavg()[0]:.2f}"
            )
    one, two = runs[1], runs[2]
    assert one["steps"] == two["steps"] and one["tokens"] == two["tokens"], "not the same run"
    assert two["log_steps"] == list(range(1, two["steps"] + 1)), "duplicate or missing reports"
    diff = max((one["params"][k] - two["params"][k]).abs().max().item() for k in one["params"])
    moved = max(
        (one["params"][k] - init).abs().max().item() for k, init in build_params(model).items()
    )
    ratio = best[2] / best[1]
    loss_diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
    print(
        f"parameters: max |2proc - 1proc| = {diff:.2e} (tolerance {TOLERANCE:.0e}: "
        f"{'ok' if diff <= TOLERANCE else 'EXCEEDED'}); max |trained - initial| = {moved:.2e}; "
        f"max per-step loss difference {loss_diff:.2e}"
    )
    print(
        f"throughput (best of {args.rounds} each) 2 processes / 1 process = {ratio:.2f}x "
        f"({best[2]:.0f} / {best[1]:.0f} tokens/s; target >= 1.6x)  "
        f"load={os.getloadavg()[0]:.2f}"
    )


def build_params(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model / "model.safetensors")


if __name__ == "__main__":
    main()
