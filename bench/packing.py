"""Benchmark: padding-free (packed) vs padded batches, SFT and DPO, tokens/s on CPU.

    python -m bench.packing                              # SFT + DPO, 3 rounds, ~5 min on 2 cores
    python -m bench.packing --methods sft --rounds 1     # quick look
    python -m bench.packing --out bench/results/packing-cpu-$(date -u +%Y%m%d).md

What runs is what a job runs: posttrain's ``PosttrainSFTTrainer`` /
``PosttrainDPOTrainer`` (TRL's trainers on posttrain's fused head), configured as
``trainers.runner`` configures them on CPU (fp32, AdamW, no gradient checkpointing,
assistant-only loss for chat rows), and for the packed arm
``trainers.packing.install_on_trainer``, which the runner calls when ``packing`` is
``auto`` (the default). Both arms see the same rows in the same order, so the loss
curves must agree (printed side by side with their largest relative difference).

Data, made here (no download): chat rows whose length (template included) is drawn
from ``--min-len``..``--max-len`` tokens (16..512), uniformly or (``--lengths
loguniform``) log-uniformly, i.e. many short rows and a few long ones, each a short user turn
and an assistant answer cut from the tiny model's corpus; DPO pairs draw prompt and
answer lengths from the same range split in three. Model: the tiny model's recipe
(``trainers.tiny_model``) at ``--hidden`` (256) and ``--layers`` (4), its ~660-token
tokenizer. tokens/s = real (non-padding) tokens the policy forward saw, per second of
``on_step_begin`` -> ``on_step_end`` (forward, backward, optimiser step), over the steps
after ``--warmup``, as wall time and as this process's CPU time (the steadier of the two
on a shared machine: with one thread, time spent descheduled is not counted); each arm
keeps its best round by CPU time, rounds alternate the arm order, and the wall-time
ratio of each round's back-to-back pair is printed too.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def _torch_setup(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def _length(rng: random.Random, lo: int, hi: int, dist: str) -> int:
    if dist == "loguniform":  # many short rows, a few long ones, as chat data tends to be
        return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return rng.randint(lo, hi)


def _chat_rows(tokenizer, n: int, lo: int, hi: int, seed: int, dist: str = "uniform") -> list[dict]:
    from trainers.tiny_model import _corpus_lines

    rng = random.Random(seed)
    stream = tokenizer(" ".join(_corpus_lines() * 4))["input_ids"]
    overhead = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            tokenize=True,
        )
    )

    def text(k: int) -> str:
        start = rng.randrange(0, len(stream) - k)
        return tokenizer.decode(stream[start : start + max(1, k)])

    rows = []
    for _ in range(n):
        total = _length(rng, lo, hi, dist) - overhead
        user = min(max(1, total // 4), 24)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": text(user)},
                    {"role": "assistant", "content": text(max(1, total - user))},
                ]
            }
        )
    return rows


def _dpo_rows(tokenizer, n: int, lo: int, hi: int, seed: int, dist: str) -> list[dict]:
    chats = _chat_rows(tokenizer, 3 * n, max(8, lo // 3), max(16, hi // 3), seed, dist)
    return [
        {
            "prompt": [chats[3 * i]["messages"][0]],
            "chosen": [chats[3 * i + 1]["messages"][1]],
            "rejected": [chats[3 * i + 2]["messages"][1]],
        }
        for i in range(n)
    ]


def _timer(warmup: int, cuda: bool):
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.tokens: list[int] = []
            self._seen = 0

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)
            seen = int(state.num_input_tokens_seen)
            self.tokens.append(seen - self._seen)
            self._seen = seen

        def result(self) -> dict:
            t, c, k = self.times[warmup:], self.cpu[warmup:], self.tokens[warmup:]
            return {
                "tokens_per_s": sum(k) / sum(t),
                "tokens_per_cpu_s": sum(k) / sum(c),
                "step_s": statistics.median(t),
                "tokens": k,
            }

    return Timer()


def run_arm(
    method: str,
    packed: bool,
    model_dir: str,
    rows: list,
    *,
    steps: int,
    batch: int,
    max_len: int,
    warmup: int,
    cuda: bool = False,
) -> dict:
    """Train ``steps`` steps of ``method`` (sft/dpo) on ``rows``, padded or packed, the way
    the runner configures the trainer on this device; tokens/s, step time, losses."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, SFTConfig

    from trainers.algorithms.dpo.method import PosttrainDPOTrainer
    from trainers.algorithms.sft.method import PosttrainSFTTrainer
    from trainers.packing import install_on_trainer

    torch.manual_seed(0)
    common = {
        "output_dir": tempfile.mkdtemp(),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        # the tiny model needs a large rate to move; a 0.5B-shaped one in bf16 would diverge
        "learning_rate": 1e-5 if cuda else 2e-3 if method == "sft" else 1e-4,
        "max_length": max_len,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not cuda,
        "bf16": cuda,
        "gradient_checkpointing": cuda,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    if method == "sft":
        cls, args = PosttrainSFTTrainer, SFTConfig(assistant_only_loss=True, **common)
    else:
        cls, args = PosttrainDPOTrainer, DPOConfig(beta=0.1, **common)
    timer = _timer(warmup, cuda)
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[timer],
    )
    # positions a padded batch computes vs real tokens, over one pass of the same loader
    shapes = [b["attention_mask"] for b in trainer.get_train_dataloader()]
    padded_share = sum(m.numel() for m in shapes) / sum(int(m.sum()) for m in shapes)
    if packed:
        install_on_trainer(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**timer.result(), "losses": losses, "padded_over_real": padded_share}


def sft_rows(model_dir: str, n: int, lo: int, hi: int) -> list[dict]:
    """The benchmark's variable-length chat rows for ``model_dir``'s tokenizer."""
    from transformers import AutoTokenizer

    return _chat_rows(AutoTokenizer.from_pretrained(model_dir), n, lo, hi, seed=1)


def loss_gap(packed: list[float], padded: list[float]) -> float:
    """Largest relative difference between two loss curves."""
    return max(abs(p - q) / max(abs(q), 1e-12) for p, q in zip(packed, padded, strict=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="sft,dpo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument(
        "--lengths",
        choices=["uniform", "loguniform"],
        default="uniform",
        help="how row lengths spread over --min-len..--max-len",
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the tables as markdown here")
    a = ap.parse_args(argv)
    _torch_setup(a.threads)
    from transformers import AutoTokenizer

    from trainers.tiny_model import build_tiny_model

    model_dir = str(
        build_tiny_model(Path(tempfile.mkdtemp()) / "m", hidden_size=a.hidden, num_layers=a.layers)
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    n = a.steps * a.batch
    data = {
        "sft": _chat_rows(tok, n, a.min_len, a.max_len, seed=1, dist=a.lengths),
        "dpo": _dpo_rows(tok, n, a.min_len, a.max_len, seed=2, dist=a.lengths),
    }
    results: dict[str, dict] = {}
    for method in a.methods.split(","):
        best: dict[str, dict] = {}
        ratios: list[float] = []
        for r in range(a.rounds):
            this: dict[str, dict] = {}
            for arm in ("padded", "packed") if r % 2 == 0 else ("packed", "padded"):
                out = run_arm(
                    method,
                    arm == "packed",
                    model_dir,
                    data[method],
                    steps=a.steps,
                    batch=a.batch,
                    max_len=a.max_len,
                    warmup=a.warmup,
                )
                this[arm] = out
                if arm not in best or out["tokens_per_cpu_s"] > best[arm]["tokens_per_cpu_s"]:
                    best[arm] = out
                print(
                    f"  {method} {arm} round {r}: {out['tokens_per_s']:.0f} tokens/s, "
                    f"{out['tokens_per_cpu_s']:.0f} tokens/CPU-s",
                    flush=True,
                )
            ratios.append(this["packed"]["tokens_per_s"] / this["padded"]["tokens_per_s"])
        results[method] = {"arms": best, "round_ratios": ratios}
    text = render(results, a)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def render(results: dict, a) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# bench.packing on CPU, {when}",
        "",
        f"`python -m bench.packing {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Model: tiny-model recipe, hidden {a.hidden}, {a.layers} layers, fp32, "
        f"{a.threads} thread(s); batch {a.batch} rows, row lengths {a.lengths} over "
        f"{a.min_len}..{a.max_len} tokens; {a.steps} steps, the first {a.warmup} untimed; "
        f"best of {a.rounds} round(s).",
        "",
        "| method | arm | tokens/CPU-s | vs padded | tokens/s (wall) | vs padded | "
        "median step s | real tokens/step |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for method, res in results.items():
        arms = res["arms"]
        cpu, wall = arms["padded"]["tokens_per_cpu_s"], arms["padded"]["tokens_per_s"]
        for arm, r in arms.items():
            rc, rw = (
                ("-", "-")
                if arm == "padded"
                else (f"{r['tokens_per_cpu_s'] / cpu:.2f}x", f"{r['tokens_per_s'] / wall:.2f}x")
            )
            lines.append(
                f"| {method} | {arm} | {r['tokens_per_cpu_s']:.0f} | {rc} | "
                f"{r['tokens_per_s']:.0f} | {rw} | {r['step_s']:.3f} | "
                f"{statistics.mean(r['tokens']):.0f} |"
            )
    lines.append("")
    for method, res in results.items():
        each = ", ".join(f"{x:.2f}x" for x in res["round_ratios"])
        share = res["arms"]["padded"]["padded_over_real"]
        lines.append(
            f"- {method}: packed / padded wall tokens/s within each round: {each}; a padded "
            f"batch computes {share:.2f}x the positions of its real tokens"
        )
    for method, res in results.items():
        pad, pack = res["arms"]["padded"]["losses"], res["arms"]["packed"]["losses"]
        worst = loss_gap(pack, pad)
        lines += [
            "",
            f"{method} loss per step (largest relative difference {worst:.1e}):",
            "",
            "| step | padded | packed |",
            "|--:|--:|--:|",
        ]
        lines += [
            f"| {i + 1} | {q:.5f} | {p:.5f} |"
            for i, (p, q) in enumerate(zip(pack, pad, strict=True))
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
