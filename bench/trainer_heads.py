"""Benchmark: TRL's SFT/DPO trainers with posttrain's fused head kernel vs TRL's own.

    python -m bench.trainer_heads                       # SFT + DPO, three runs each, ~4 min
    python -m bench.trainer_heads --methods sft --steps 4 --rounds 1   # quick look
    python -m bench.trainer_heads --methods dpo --kernels ours,ours-all  # the row skipping

Plain ``trl.SFTTrainer``/``DPOTrainer`` patch the model with
``add_fused_lm_head``; the ``ours`` rows call ``trainers.fused_head.
use_posttrain_kernel()`` first, so the same patched forward runs posttrain's
kernel, the ``trl`` rows call ``restore_trl_kernel()`` (TRL's
``ChunkedLogProbFunction``). The ``ours-all`` rows are ``ours`` with
``trainers.fused_head.SKIP_MASKED_ROWS = False``: posttrain's kernel given every
position, as TRL's forward does on CPU (below). Nothing else differs.

Model: a random Qwen2 built by ``trainers.tiny_model``'s config recipe, but
with ``--hidden`` (256), 2 layers and ``--vocab`` (32768) rows in the tied LM
head, so the head dominates the step; the 942-token tokenizer of
``build_tokenizer`` only serves DPO's text pipeline (its ids are all valid
rows). Data is random: SFT rows are ``--batch`` (8) x ``--tokens/--batch``
pre-tokenised ids drawn from the whole vocab; DPO rows are ``--batch`` pairs of
prompt/chosen/rejected texts of random single-token words sized so that the
policy forward (chosen + rejected, one concatenated batch) sees about
``--tokens`` (2048) tokens; the frozen reference model does one no-grad fused
forward of the same batch each step. Everything else is the configs' defaults
(fp32, AdamW, gradient checkpointing on).

Measured, every (method, kernel) in its own subprocess with
``OMP_NUM_THREADS=--threads`` (default 1): step time = ``on_step_begin`` ->
``on_step_end`` (forward, backward, optimiser step; not data loading), median
over the steps after ``--warmup``, as wall and as process CPU time; extra
memory = peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` at
``on_train_begin``, or a 2 ms sampler thread where that is not allowed) minus
the RSS at ``on_train_begin``. That includes what both kernels share: the
gradients and AdamW's two moments (3 x params x 4 B, created in the first
step), printed as ``common MB``. Rounds alternate the kernel order (ours/trl,
then trl/ours) and keep each variant's minimum over rounds.

Why one thread by default: on a shared 2-core box, two OpenMP threads per run
get descheduled whenever anything else runs, and every parallel region then
waits for the late thread. posttrain's kernel issues ~10 small ops per
1024 x 2048 tile, TRL's a few ops on one 2048 x 32768 tile, so oversubscription
slowed ours ~8x and TRL's ~2x in a kernel micro-benchmark (fwd 0.15 -> 1.2 s vs
0.67 -> 1.2 s) and made 2-thread trainer timings meaningless. ``--threads 2``
on an idle machine measures the parallel case.

On CPU, TRL's patched forward hands TRL's kernel every position (labels clamped,
``compact=False``): ``batch x (seq - 1)`` rows, prompt and padding included. With
posttrain's kernel bound it passes only the labelled rows (``_compact_rows``), so
``ours/trl`` includes that skipping and ``ours-all`` is the same kernel without it:
``skip x`` = ours-all s/step / ours s/step is the tokens/s gained by skipping (target
>= 1.4 for DPO, whose prompts are half of every row; SFT's random rows have no
prompt, so it has nothing to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.kernels import REPO, _status_kb

KERNELS = ("ours", "trl", "ours-all")
TARGETS = {"time": 1.0, "mem": 0.5, "skip": 1.4}


# --------------------------------------------------------------------------- model + data
def build_model(out_dir: str, hidden: int, vocab: int, layers: int = 2) -> int:
    """Write the wide random model + tokenizer to ``out_dir``; returns its parameter count."""
    import torch
    from transformers import Qwen2ForCausalLM

    from trainers.tiny_model import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, hidden, layers)
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def sft_dataset(n_rows: int, seq: int, vocab: int):
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (n_rows, seq), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def dpo_dataset(n_rows: int, seq: int, tokenizer):
    """Texts of random one-token words: prompt and each completion ~ ``seq / 2`` tokens."""
    import random

    rng = random.Random(0)
    words = [
        t[1:]
        for t in tokenizer.get_vocab()
        if t.startswith("Ġ") and t[1:].isalpha() and len(tokenizer(" " + t[1:]).input_ids) == 1
    ]

    def text(n: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(n))

    from datasets import Dataset

    half = seq // 2
    rows = [
        {"prompt": text(half), "chosen": text(half - 1), "rejected": text(half - 1)}
        for _ in range(n_rows)
    ]  # -1: the trainer appends <|end|> to each completion
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------- measuring
class _PeakSampler(threading.Thread):
    """Fallback peak-RSS probe where ``clear_refs`` cannot reset ``VmHWM``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _status_kb("VmRSS")
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _status_kb("VmRSS"))


def _timer_callback(warmup: int):
    from transformers import TrainerCallback

    class StepProbe(TrainerCallback):
        """Step wall time and peak RSS over the training loop."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.base_kb = self.peak_kb = 0
            self.sampler: _PeakSampler | None = None

        def on_train_begin(self, args, state, control, **kw):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self.sampler = _PeakSampler()
                self.sampler.start()
            self.base_kb = _status_kb("VmRSS")

        def on_step_begin(self, args, state, control, **kw):
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)
            self.cpu.append(time.process_time() - self._c0)

        def on_train_end(self, args, state, control, **kw):
            if self.sampler is None:
                self.peak_kb = _status_kb("VmHWM")
            else:
                self.sampler.stop.set()
                self.sampler.join()
                self.peak_kb = self.sampler.peak

        def result(self) -> dict:
            measured = self.times[warmup:] or self.times
            return {
                "s_step": statistics.median(measured),
                "cpu_step": statistics.median(self.cpu[warmup:] or self.cpu),
                "extra_mb": (self.peak_kb - self.base_kb) / 1024,
                "times": [round(t, 3) for t in self.times],
            }

    return StepProbe()


def run_variant(spec: dict) -> dict:
    """One trainer run in this process (the ``--worker`` side)."""
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trainers import fused_head
    from trainers.fused_head import restore_trl_kernel, use_posttrain_kernel

    # imported in every variant, so all memory baselines hold the same modules
    (restore_trl_kernel if spec["kernel"] == "trl" else use_posttrain_kernel)()
    fused_head.SKIP_MASKED_ROWS = spec["kernel"] != "ours-all"  # read at each forward
    torch.manual_seed(0)
    model_dir, steps, batch, tokens = spec["model"], spec["steps"], spec["batch"], spec["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = {
        "output_dir": tempfile.mkdtemp(prefix="bench-heads-"),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "learning_rate": 1e-5,
        "logging_steps": steps,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    probe = _timer_callback(spec["warmup"])
    if spec["method"] == "sft":
        seq = tokens // batch
        trainer = SFTTrainer(
            model=model_dir,
            args=SFTConfig(max_length=seq, **common),
            train_dataset=sft_dataset(batch * steps, seq, spec["vocab"]),
            processing_class=tokenizer,
            callbacks=[probe],
        )
    else:
        trainer = DPOTrainer(
            model=model_dir,
            args=DPOConfig(max_length=tokens // batch, **common),
            train_dataset=dpo_dataset(batch * steps, tokens // (2 * batch), tokenizer),
            processing_class=tokenizer,
            callbacks=[probe],
        )
    trainer.train()
    return probe.result()


def _subprocess(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.trainer_heads", "--worker", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- table
def _merge(old: dict | None, new: dict) -> dict:
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    return {
        "s_step": min(old["s_step"], new["s_step"]),
        "cpu_step": min(old["cpu_step"], new["cpu_step"]),
        "extra_mb": min(old["extra_mb"], new["extra_mb"]),
        "times": old["times"] + new["times"],
    }


def print_table(results: dict, common_mb: float, tokens: int) -> None:
    """One row per (method, kernel); the ``ours`` row carries the ratios."""
    print(
        f"\n{'method':<7}{'kernel':<9}{'s/step':>8}{'tok/s':>8}{'cpu s':>8}{'extra MB':>10}"
        f"{'common MB':>11}  {'time ours/trl (<=1.0)':<22}{'cpu':>6}  "
        f"{'mem ours/trl (<=0.5)':<22}{'skip x (dpo >=1.4)':<18}"
    )
    for method, by_kernel in results.items():
        ours, trl, full = (by_kernel.get(k, {}) for k in ("ours", "trl", "ours-all"))
        for kernel, r in by_kernel.items():
            if "error" in r:
                print(f"{method:<7}{kernel:<9} failed: {r['error']}")
                continue
            ratios = ""
            if kernel == "ours" and "s_step" in ours and "s_step" in trl:
                t = ours["s_step"] / trl["s_step"]
                c = ours["cpu_step"] / trl["cpu_step"]
                m = ours["extra_mb"] / trl["extra_mb"]
                ratios = (
                    f"{t:6.2f} {'ok' if t <= TARGETS['time'] else 'MISS':<15}{c:6.2f}"
                    f"  {m:6.2f} {'ok' if m <= TARGETS['mem'] else 'MISS':<15}"
                )
            if kernel == "ours" and "s_step" in ours and "s_step" in full:
                x = full["s_step"] / ours["s_step"]  # tokens/s with skipping / without
                verdict = "" if method != "dpo" else ("ok" if x >= TARGETS["skip"] else "MISS")
                ratios = f"{ratios or ' ' * 44}  {x:6.2f} {verdict}"
            print(
                f"{method:<7}{kernel:<9}{r['s_step']:8.3f}{tokens / r['s_step']:8.0f}"
                f"{r['cpu_step']:8.3f}{r['extra_mb']:10.0f}{common_mb:11.0f}  {ratios}"
            )
    print("\nper-step wall times (s), all rounds, warm-up included:")
    for method, by_kernel in results.items():
        for kernel, r in by_kernel.items():
            print(f"  {method} {kernel}: {r.get('times', r.get('error'))}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="leading steps left out of the median")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per optimizer step")
    ap.add_argument("--batch", type=int, default=8, help="rows (SFT) or pairs (DPO) per step")
    ap.add_argument("--methods", default="sft,dpo")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(json.loads(args.worker))))
        return
    methods, kernels = args.methods.split(","), args.kernels.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-heads-model-") as model_dir:
        n_params = build_model(model_dir, args.hidden, args.vocab)
        common_mb = 3 * n_params * 4 / 2**20
        print(
            f"# bench.trainer_heads  hidden={args.hidden} vocab={args.vocab} layers=2 "
            f"params={n_params / 1e6:.1f}M tokens/step={args.tokens} batch={args.batch} "
            f"steps={args.steps} (warm-up {args.warmup}) rounds={args.rounds} "
            f"threads={args.threads}"
        )
        results: dict[str, dict[str, dict]] = {m: {} for m in methods}
        for rnd in range(args.rounds):
            order = kernels if rnd % 2 == 0 else kernels[::-1]
            for method in methods:
                for kernel in order:
                    spec = {
                        "method": method,
                        "kernel": kernel,
                        "model": model_dir,
                        "vocab": args.vocab,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "batch": args.batch,
                        "tokens": args.tokens,
                    }
                    t0 = time.perf_counter()
                    r = _subprocess(spec, args.threads)
                    results[method][kernel] = _merge(results[method].get(kernel), r)
                    print(
                        f"  round {rnd + 1} {method} {kernel}: "
                        f"{r.get('s_step', r.get('error'))} s/step "
                        f"(cpu {r.get('cpu_step', 0):.3f}), "
                        f"{r.get('extra_mb', 0):.0f} MB extra ({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
        for by_kernel in results.values():  # fixed row order: ours, then trl
            for k in sorted(by_kernel, key=lambda k: KERNELS.index(k) if k in KERNELS else 9):
                by_kernel[k] = by_kernel.pop(k)
    print_table(results, common_mb, args.tokens)


if __name__ == "__main__":
    main()
