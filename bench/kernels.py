"""Benchmark: fused "linear -> token log-prob (+ entropy)" against the alternatives.

    python -m bench.kernels            # CPU: ~25 min, needs ~13 GB free RAM (naive, big shape)
    python -m bench.kernels --quick    # one small shape, smoke check (~1 min)
    OMP_NUM_THREADS=2 python -m bench.kernels > out.txt
    python -m bench.kernels --device cuda            # GPU: every shape, then the targets
    python -m bench.kernels --device cuda --perf-only  # only the Llama-3 / Qwen shapes

Methods (rows): (a) ``naive`` materialised fp32 logits (``trainers.kernels.reference``);
(b) ``trl`` = TRL 1.16 ``trl.kernels.ChunkedLogProbFunction`` (4096-token x
32768-vocab tiles, entropy supported); (c) Liger, when importable:
``liger-sce`` = ``LigerFusedLinearScaledCrossEntropyFunction`` (its CPU path
is a 512-token torch fallback; logp = -nll; on sm90 it needs Liger's CuTe DSL
kernels), ``liger-flce`` = Liger's fused linear cross-entropy
(``liger_fused_linear_cross_entropy``, ``reduction="none"``, logp = -loss; no
entropy) and ``liger-slp`` = the GRPO loss's ``_ChunkedSelectiveLogProbFunction``
(logp only); (d) ``ours`` = ``trainers.kernels.token_logprobs``.

What is measured, per (shape, mode, method): forward time, forward+backward
time (upstream grads are random per-token weights, as a GRPO loss would give),
and peak extra memory. On CPU every case runs in a fresh subprocess: peak =
peak RSS (``VmHWM``, what ``ru_maxrss`` reports, reset through
``/proc/self/clear_refs`` once the inputs are built so import-time peaks do
not hide it) minus the RSS at that point, over the first forward+backward
(later calls only add allocator retention); it includes the fp32 ``dh`` and
``dW`` themselves and MKL's ~10 MB of GEMM buffers. Times are the minimum over all
repetitions and rounds; rounds interleave the methods because this machine is
shared (ratios under ~1.2x are ties). On CUDA the cases run in-process (bf16,
the minimum of 5 repetitions, so Triton's first-call compile is not counted),
peak = ``max_memory_allocated`` delta, and a closing table covers the training
shapes (Llama-3-8B: N=16384 H=4096 V=128256; Qwen3-8B: V=151936; Qwen2.5-0.5B:
H=896 V=151936): every method's time, TFLOP/s and % of the bf16 peak
(``--peak-tflops``, default 989 dense for H100/H200 SXM), then the targets as
ratios from the same run: ours / the best of TRL and Liger (<= 1.0x), ours'
fraction of peak (>= 60%), ours' peak memory beyond the dh + dW outputs as a
fraction of them (<= 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

CPU_BIG = [(2048, 256, 32768), (4096, 896, 151936)]
CPU_SWEEP = [(n, 256, 32768) for n in (512, 1024, 4096, 8192)]
CUDA_PERF = [(16384, 4096, 128256), (16384, 4096, 151936), (16384, 896, 151936)]
SHAPE_NAMES = {
    (16384, 4096, 128256): "Llama-3-8B",
    (16384, 4096, 151936): "Qwen3-8B",
    (16384, 896, 151936): "Qwen2.5-0.5B",
}
MODES = ("logp", "logp+ent")
PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16
RIVALS = ("trl", "liger-sce", "liger-flce", "liger-slp")  # the ones ours must match or beat
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- methods
# Each loader imports its library (before the memory baseline is taken) and
# returns fn(hidden, weight, targets, want_entropy) -> (logp, entropy or None).
def _ours():
    from trainers.kernels import token_logprobs

    def fn(h, w, y, ent):
        return (
            token_logprobs(h, w, y, return_entropy=ent) if ent else (token_logprobs(h, w, y), None)
        )

    return fn


def _naive():
    from trainers.kernels.reference import naive_token_logprobs

    def fn(h, w, y, ent):
        out = naive_token_logprobs(h, w, y, return_entropy=ent)
        return out if ent else (out, None)

    return fn


def _trl():
    from trl.kernels import ChunkedLogProbFunction

    def fn(h, w, y, ent):
        out = ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, 32768, None, 1.0, ("entropy",) if ent else ()
        )
        return out[0], out[1]

    return fn


def _liger_sce():
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import (
        LigerFusedLinearScaledCrossEntropyFunction as sce,
    )

    def fn(h, w, y, ent):
        out = sce.apply(h, w, y, 1.0, -100, 1, ent)
        return (-out[0], out[1]) if ent else (-out, None)

    return fn


def _liger_flce():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce

    def fn(h, w, y, ent):
        return -flce(h, w, y, reduction="none"), None

    return fn


def _liger_slp():
    from liger_kernel.chunked_loss import fused_linear_ppo as ppo

    def fn(h, w, y, ent):
        chunk = ppo._SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE
        return ppo._ChunkedSelectiveLogProbFunction.apply(h, w, y, None, 1.0, chunk), None

    return fn


METHODS = {
    "naive": (_naive, True),
    "trl": (_trl, True),
    "liger-sce": (_liger_sce, True),
    "liger-flce": (_liger_flce, False),
    "liger-slp": (_liger_slp, False),
    "ours": (_ours, True),
}


def available_methods() -> list[str]:
    names = ["naive"]
    for name, module in (
        ("trl", "trl.kernels"),
        ("liger-sce", "liger_kernel.ops"),
        ("liger-flce", "liger_kernel.transformers.functional"),
        ("liger-slp", "liger_kernel.chunked_loss"),
    ):
        try:
            __import__(module)
            names.append(name)
        except Exception:  # any import failure just drops the row
            pass
    return [*names, "ours"]


# --------------------------------------------------------------------------- one case
def _inputs(n, hdim, vocab, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, hdim, generator=gen).to(device, dtype).requires_grad_()
    w = torch.randn(vocab, hdim, generator=gen).mul_(hdim**-0.5).to(device, dtype)
    y = torch.randint(0, vocab, (n,), generator=gen).to(device)
    g = torch.randn(2, n, generator=gen).to(device)
    return h, w.requires_grad_(), y, g


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Current RSS in kB, after resetting the peak (imports can peak above it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the high-water mark that ru_maxrss reports
        return _status_kb("VmRSS")
    except OSError:  # not Linux: fall back to the (never reset) ru_maxrss
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kb() -> int:
    try:
        return _status_kb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(method, n, hdim, vocab, mode, reps, device="cpu", dtype=torch.float32) -> dict:
    """Times one method; returns fwd/full seconds (min) and peak extra MB."""
    fn = METHODS[method][0]()
    h, w, y, g = _inputs(n, hdim, vocab, dtype, device)
    ent = mode == "logp+ent"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = _reset_peak_rss()
    fwd, full = [], []
    for _ in range(reps):
        h.grad = w.grad = None
        _sync(device)
        t0 = time.perf_counter()
        logp, entropy = fn(h, w, y, ent)
        _sync(device)
        t1 = time.perf_counter()
        loss = (logp * g[0]).sum() + ((entropy * g[1]).sum() if ent else 0.0)
        loss.backward()
        _sync(device)
        fwd.append(t1 - t0)
        full.append(time.perf_counter() - t0)
        del logp, entropy, loss
        if len(fwd) == 1:  # peak of the first call (later ones add allocator retention)
            # Linux syncs per-thread RSS counters lazily (up to 64 pages per thread
            # off), so at tiny sizes the CPU peak can read a little below the base.
            peak_mb = max(
                0.0,
                (torch.cuda.max_memory_allocated() - base) / 2**20
                if device == "cuda"
                else (_peak_rss_kb() - base) / 1024,
            )
    return {"fwd": min(fwd), "full": min(full), "peak_mb": peak_mb}


def _subprocess_case(method, shape, mode, reps) -> dict:
    spec = json.dumps({"method": method, "shape": shape, "mode": mode, "reps": reps})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--worker", spec],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- tables
def _fmt_ratio(x, ref):
    return f"{x / ref:6.2f}" if ref and x is not None else "   n/a"


def print_table(shape, mode, results: dict, elem: int = 4) -> None:
    """One table; ``beyond`` = peak minus the dh and dW outputs every method must return
    (``elem`` bytes each), i.e. the memory a method adds on top of the gradients."""
    n, hdim, vocab = shape
    grads_mb = (n + vocab) * hdim * elem / 2**20
    print(f"\n## N={n} H={hdim} V={vocab}  [{mode}]  (dh + dW outputs: {grads_mb:.0f} MB)")
    print(
        f"{'method':<10} {'fwd s':>8} {'fwd+bwd s':>10} {'peak MB':>9} {'beyond':>7} | "
        f"{'t/naive':>7} {'t/trl':>6} {'mem/naive':>9} {'mem/trl':>7} {'beyond/naive':>12}"
    )
    ref_a, ref_b = results.get("naive", {}), results.get("trl", {})
    naive_beyond = ref_a["peak_mb"] - grads_mb if "peak_mb" in ref_a else None
    for name, r in results.items():
        if "error" in r or "skip" in r:
            print(f"{name:<10} {r.get('skip') or 'failed: ' + r['error']}")
            continue
        beyond = max(0.0, r["peak_mb"] - grads_mb)
        print(
            f"{name:<10} {r['fwd']:8.3f} {r['full']:10.3f} {r['peak_mb']:9.0f} {beyond:7.0f} | "
            f"{_fmt_ratio(r['full'], ref_a.get('full'))} {_fmt_ratio(r['full'], ref_b.get('full'))}"
            f" {_fmt_ratio(r['peak_mb'], ref_a.get('peak_mb')):>9}"
            f" {_fmt_ratio(r['peak_mb'], ref_b.get('peak_mb')):>7}"
            f" {_fmt_ratio(beyond, naive_beyond):>12}"
        )


def _merge_min(old: dict | None, new: dict) -> dict:
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    return {k: min(old[k], new[k]) for k in ("fwd", "full", "peak_mb")}


def bench_cpu(shapes, methods, rounds, reps) -> None:
    for shape in shapes:
        for mode in MODES:
            results: dict[str, dict] = {}
            for _ in range(rounds):
                for name in methods:
                    if mode == "logp+ent" and not METHODS[name][1]:
                        results[name] = {"skip": "n/a: no entropy output"}
                        continue
                    results[name] = _merge_min(
                        results.get(name), _subprocess_case(name, shape, mode, reps)
                    )
            print_table(shape, mode, results)
            sys.stdout.flush()


def bench_cuda(shapes, methods, reps) -> dict:
    """Every (shape, mode, method) on the GPU; returns the results for the targets table."""
    out: dict = {}
    for shape in shapes:
        for mode in MODES:
            results = {}
            for name in methods:
                if mode == "logp+ent" and not METHODS[name][1]:
                    results[name] = {"skip": "n/a: no entropy output"}
                    continue
                try:
                    results[name] = run_case(name, *shape, mode, reps, "cuda", torch.bfloat16)
                except Exception as exc:  # e.g. OOM of the naive path, a missing Liger backend
                    results[name] = {"error": repr(exc)[:80]}
                torch.cuda.empty_cache()
            print_table(shape, mode, results, elem=2)
            sys.stdout.flush()
            out[(tuple(shape), mode)] = results
    return out


def _tflops(shape, r: dict) -> tuple[float, float]:
    """(forward, forward+backward) TFLOP/s: 2NHV forward, 8NHV with the recompute."""
    n, hdim, vocab = shape
    f = 2.0 * n * hdim * vocab
    return f / r["fwd"] / 1e12, 4 * f / r["full"] / 1e12


def cuda_targets(results: dict, peak: float) -> None:
    """The training shapes: each method's throughput, then ours against the targets."""
    print(f"\n## CUDA training shapes (bf16); % of {peak:.0f} TF/s dense bf16 peak")
    print(
        f"{'shape':<28} {'mode':<9} {'method':<10} {'fwd ms':>8} {'TF/s':>6} {'%pk':>5} "
        f"{'full ms':>8} {'TF/s':>6} {'%pk':>5} {'peak MB':>8}"
    )
    targets = []
    for (shape, mode), rows in results.items():
        if shape not in SHAPE_NAMES:
            continue
        label = f"{SHAPE_NAMES[shape]} {shape[0]}x{shape[1]}x{shape[2]}"
        for name, r in rows.items():
            if "fwd" not in r:
                print(f"{label:<28} {mode:<9} {name:<10} {r.get('skip') or r.get('error')}")
                continue
            tf_f, tf_b = _tflops(shape, r)
            print(
                f"{label:<28} {mode:<9} {name:<10} {r['fwd'] * 1e3:8.2f} {tf_f:6.0f} "
                f"{100 * tf_f / peak:5.1f} {r['full'] * 1e3:8.2f} {tf_b:6.0f} "
                f"{100 * tf_b / peak:5.1f} {r['peak_mb']:8.0f}"
            )
        ours = rows.get("ours", {})
        rivals = {k: v["full"] for k, v in rows.items() if k in RIVALS and "full" in v}
        if "full" in ours:
            grads_mb = (shape[0] + shape[2]) * shape[1] * 2 / 2**20
            best = min(rivals, key=rivals.get) if rivals else None
            targets.append(
                (
                    label,
                    mode,
                    f"{ours['full'] / rivals[best]:.2f}x {best}" if best else "n/a (no rival ran)",
                    100 * _tflops(shape, ours)[1] / peak,
                    100 * max(0.0, ours["peak_mb"] - grads_mb) / grads_mb,
                )
            )
    print("\n## Targets (fwd+bwd): ours/best rival <= 1.0x, >= 60% of peak, extra mem <= 10%")
    print(f"{'shape':<28} {'mode':<9} {'ours/best':>18} {'%peak':>6} {'extra/grads %':>14}")
    for label, mode, ratio, pct, extra in targets:
        print(f"{label:<28} {mode:<9} {ratio:>18} {pct:6.1f} {extra:14.1f}")


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in part.split(",")) for part in text.split(";")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only N=2048 H=256 V=32768")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (CPU)")
    ap.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--shapes", help="N,H,V;N,H,V;... instead of the default shape lists")
    ap.add_argument("--perf-only", action="store_true", help="CUDA: only the training shapes")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_case(spec["method"], *spec["shape"], spec["mode"], spec["reps"])))
        return
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    methods = available_methods()
    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in methods if m in wanted]
    print(
        f"# bench.kernels  device={device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} methods={','.join(methods)}"
    )
    if device == "cuda":
        print(f"# {torch.cuda.get_device_name()}  peak {args.peak_tflops:.0f} TF/s bf16")
        shapes = CPU_BIG[:1] if args.quick else CPU_BIG + CPU_SWEEP + CUDA_PERF
        if args.perf_only:
            shapes = CUDA_PERF
        if args.shapes:
            shapes = _parse_shapes(args.shapes)
        cuda_targets(bench_cuda(shapes, methods, reps=5), args.peak_tflops)
        return
    if args.shapes:
        bench_cpu(_parse_shapes(args.shapes), methods, rounds=args.rounds, reps=2)
        return
    bench_cpu(CPU_BIG[:1], methods, rounds=args.rounds, reps=2)
    if not args.quick:
        bench_cpu(CPU_SWEEP, methods, rounds=args.rounds, reps=2)
        bench_cpu(CPU_BIG[1:], methods, rounds=1, reps=1)


if __name__ == "__main__":
    main()
