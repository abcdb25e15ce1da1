"""The GPU suite: one command that proves every method and the kernel on CUDA, and reports.

    python -m bench.gpu_suite --out DIR              # on a GPU host (README: "The GPU suite")
    python -m bench.gpu_suite --dry-run --out DIR    # the same sections on CPU, tiny sizes

Sections, each in its own child process with a time allowance (what a section did
not finish is reported as such, and the report is rewritten after every section, so
a run cut short still leaves one):

1. ``env``: versions of python, torch, CUDA, triton, transformers, trl, liger; the device.
2. ``tests``: ``pytest -m gpu`` over the kernel tests (``--noconftest``: the suite's Redis
   fixtures are not needed, and the GPU host has no Redis).
3. ``kernels``: the fused log-prob kernel (``ours``) against TRL's chunked kernel and
   Liger's fused kernels at the Llama-3-8B (16384 x 4096 x 128256) and Qwen (151936
   vocab) shapes, bf16, forward and forward+backward, logp and logp+entropy: ms,
   TFLOP/s and % of the bf16 dense peak, peak memory beyond the gradients; then the
   targets (``bench.kernels``).
4. ``methods``: every method (SFT, DPO, BCO, OREO, each GRPO preset, reinforcement,
   EGPO) through the real runner (``trainers.runner.run_method``) in bf16 on a random
   model of Qwen2.5-0.5B's shape: ran or not, steps, first and last loss, whether every
   metric was finite, peak memory, seconds per step.
5. ``inference``: where vLLM is installed (not in the dry run), ``posttrain inference``'s
   front over its vLLM engine, in this process: the Qwen-shaped model served by vLLM
   with LoRA on, a greedy chat answer and its tokens/s, then a LoRA adapter of it
   loaded at runtime and asked the same; otherwise the reason it was skipped.
6. ``packing``: SFT on variable-length chat rows (16..1024 tokens; ``bench.packing``) on
   the Qwen2.5-0.5B-shaped model, padded batches vs padding-free ones (``packing: auto``,
   ``trainers.packing``), in one process: tokens/s of each, the ratio, and the largest
   relative difference between the two loss curves.
7. ``sft_step``: a trainer-level SFT step on that model with TRL's own fused head,
   posttrain's kernel behind it, and Liger (``use_liger_kernel``, which patches model
   classes process-wide, so every variant runs in a process of its own): step time and
   peak memory.

The dry run does all of it on the CPU with the tiny offline model and tiny kernel
shapes (CI runs it, so the suite cannot rot); its numbers mean nothing.

Output: ``DIR/gpu-suite-<device>-<UTC time>.json`` and the same tables as Markdown
(``.md``) beside it. Reports of GPU runs are committed under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_SHAPES = [(16384, 4096, 128256), (16384, 4096, 151936)]
DRY_KERNEL_SHAPES = [(256, 64, 2048)]
# Qwen2.5-0.5B's shape (its config.json), randomly initialised.
QWEN_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
GRPO_PRESETS = ("grpo", "dapo", "dr_grpo", "ngrpo", "xrpo", "hapo")
# Seconds each section may take on a GPU (12.75 minutes in all at most; sections usually
# end well before their allowance).
BUDGET = {
    "env": 20,
    "tests": 60,
    "kernels": 120,
    "methods": 170,
    "inference": 240,
    "packing": 75,
    "sft_step": 80,
}
# Modules the sections import, checked (and their import errors reported) first.
IMPORTS = ("torch", "triton", "transformers", "trl", "datasets", "pydantic", "liger_kernel")


# --------------------------------------------------------------------------- sections
def section_env(dry: bool) -> dict:
    import importlib
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "dry_run": dry}
    for pkg in ("transformers", "trl", "accelerate", "peft", "datasets", "pyarrow", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    broken = {}
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a missing wheel, a version the host's pyarrow refuses
            broken[module] = f"{type(exc).__name__}: {exc}"[:200]
    out["import_errors"] = broken
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            device=props.name,
            cuda=torch.version.cuda,
            memory_gb=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
        )
    else:
        out["device"] = "cpu"
    return out


def section_tests(dry: bool) -> dict:
    """``pytest -m gpu`` over the kernel tests; counts from its JUnit report."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-q",
            "-m", "gpu", "tests/trainers/kernels", f"--junitxml={junit}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        failures = []
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                kinds = {child.tag for child in case}
                if "failure" in kinds or "error" in kinds:
                    counts["failed" if "failure" in kinds else "errors"] += 1
                    failures.append(case.get("name"))
                elif "skipped" in kinds:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
    return {
        **counts,
        "exit_code": proc.returncode,
        "failures": failures,
        "tail": proc.stdout[-800:],
    }


def section_kernels(dry: bool) -> dict:
    import torch

    from bench import kernels as kb

    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    shapes = DRY_KERNEL_SHAPES if dry else KERNEL_SHAPES
    methods = [m for m in kb.available_methods() if m != "naive"]
    rows = []
    for shape in shapes:
        for mode in kb.MODES:
            for name in methods:
                row = {"shape": list(shape), "mode": mode, "method": name}
                if mode == "logp+ent" and not kb.METHODS[name][1]:
                    rows.append({**row, "skip": "no entropy output"})
                    continue
                try:
                    r = kb.run_case(name, *shape, mode, 2 if dry else 5, device, dtype)
                except Exception as exc:  # a missing Liger backend, an OOM
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                finally:
                    if not dry:
                        torch.cuda.empty_cache()
                fwd_tf, full_tf = kb._tflops(shape, r)
                rows.append(
                    {
                        **row,
                        "fwd_ms": r["fwd"] * 1e3,
                        "full_ms": r["full"] * 1e3,
                        "fwd_tflops": fwd_tf,
                        "full_tflops": full_tf,
                        "fwd_pct_peak": 100 * fwd_tf / kb.PEAK_TFLOPS,
                        "full_pct_peak": 100 * full_tf / kb.PEAK_TFLOPS,
                        "peak_mb": r["peak_mb"],
                    }
                )
    return {"rows": rows, "targets": kernel_targets(rows), "peak_tflops": kb.PEAK_TFLOPS}


def kernel_targets(rows: list[dict]) -> list[dict]:
    """Per (shape, mode): ours / the best rival (<= 1.0), ours' % of peak (>= 60), ours'
    memory beyond the bf16 dh + dW outputs as a % of them (<= 10)."""
    from bench.kernels import RIVALS

    out = []
    keys = sorted({(tuple(r["shape"]), r["mode"]) for r in rows})
    for shape, mode in keys:
        here = {r["method"]: r for r in rows if tuple(r["shape"]) == shape and r["mode"] == mode}
        ours = here.get("ours", {})
        rivals = {k: v["full_ms"] for k, v in here.items() if k in RIVALS and "full_ms" in v}
        if "full_ms" not in ours:
            continue
        grads_mb = (shape[0] + shape[2]) * shape[1] * 2 / 2**20
        best = min(rivals, key=rivals.get) if rivals else None
        ratio = ours["full_ms"] / rivals[best] if best else None
        extra = 100 * max(0.0, ours["peak_mb"] - grads_mb) / grads_mb
        out.append(
            {
                "shape": list(shape),
                "mode": mode,
                "best_rival": best,
                "ours_over_best": ratio,
                "pct_peak": ours["full_pct_peak"],
                "extra_over_grads_pct": extra,
                "met": {
                    "speed": ratio is not None and ratio <= 1.0,
                    "peak": ours["full_pct_peak"] >= 60.0,
                    "memory": extra <= 10.0,
                },
            }
        )
    return out


# --------------------------------------------------------------------------- methods
def _method_cases() -> list[tuple[str, dict]]:
    """(label, method block) for every method and GRPO preset."""
    grader = {
        "type": "length_penalty",
        "name": "short",
        "input": "{{sample.output_text}}",
        "max_length": 8,
    }
    judge = {
        "type": "pattern_table",
        "classes": [
            {"name": "a", "pattern": "^[a-mA-M]"},
            {"name": "b", "pattern": "^[^a-mA-M]"},
        ],
        "preferences": [[0.5, 0.7, 0.9], [0.3, 0.5, 0.9], [0.1, 0.1, 0.5]],  # + "other"
    }
    grpo_hp = {"num_generations": 4, "batch_size": 8, "max_completion_length": 16}
    cases = [
        ("supervised", {"type": "supervised"}),
        ("dpo", {"type": "dpo"}),
        ("bco", {"type": "bco"}),
        ("oreo", {"type": "oreo"}),
    ]
    for variant in GRPO_PRESETS:
        block = {"variant": variant, "graders": [grader], "hyperparameters": dict(grpo_hp)}
        cases.append((f"grpo:{variant}", {"type": "grpo", "grpo": block}))
    rl = {"grader": grader, "hyperparameters": dict(grpo_hp)}
    cases.append(("reinforcement", {"type": "reinforcement", "reinforcement": rl}))
    egpo = {"judge": judge, "max_new_tokens": 16, "batch_size": 4}
    cases.append(("egpo", {"type": "egpo", "egpo": {"hyperparameters": egpo}}))
    return cases


_FILES = {  # method type -> demo file of the format it trains on
    "supervised": "demo_sft.jsonl",
    "dpo": "demo_dpo.jsonl",
    "bco": "demo_bco.jsonl",
    "oreo": "demo_oreo.jsonl",
    "grpo": "demo_grpo.jsonl",
    "reinforcement": "demo_grpo.jsonl",
    "egpo": "demo_grpo.jsonl",
}


def build_model(out: Path, dry: bool) -> Path:
    """The tiny offline model, or one of Qwen2.5-0.5B's shape with the tiny tokenizer
    (every id the tokenizer gives is a valid row of the bigger vocabulary)."""
    from trainers.tiny_model import build_tiny_model, build_tokenizer

    if dry:
        return build_tiny_model(out, seed=0)
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    config = Qwen2Config(
        **QWEN_05B,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


class _TimedReporter:
    """A ``trainers.reporting.Reporter`` that also notes when each step's log arrived."""

    def __new__(cls):
        from trainers.reporting import Reporter

        class Timed(Reporter):
            def __init__(self):
                super().__init__(None)
                self.step_times: list[float] = []

            def log(self, *args, **kwargs):
                self.step_times.append(time.perf_counter())
                return super().log(*args, **kwargs)

        return Timed()


def run_method_case(label: str, method: dict, model: Path, work: Path, dry: bool) -> dict:
    import math
    from importlib import resources

    import torch

    from trainers import registry
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.runner import run_method

    mtype = method["type"]
    block = method.get(mtype, {})
    hp = dict(block.get("hyperparameters", {}))
    hp.setdefault("max_steps", 2 if dry else 4)
    hp.setdefault("learning_rate", 1e-4)
    hp.setdefault("max_seq_length", 256)
    if mtype == "egpo":
        hp["max_steps"] += hp["max_steps"] % 2  # an EGPO iteration is two steps
    method = {**method, mtype: {**block, "hyperparameters": hp}}
    data = resources.files("trainers") / "assets" / _FILES[mtype]
    out = work / label.replace(":", "-")
    spec = JobSpec.model_validate({"model": str(model), "training_file": "f", "method": method})
    plan = RunPlan(
        job_id=label,
        spec=spec,
        training_path=Path(str(data)),
        output_dir=out / "output",
        data_dir=work,
        checkpoint_every_steps=1000,
    )
    reporter = _TimedReporter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_method(registry.resolve(mtype), plan, reporter)
    wall = time.perf_counter() - start
    logs = [m for m in reporter.sent if m.type == "log"]
    losses = [m.metrics.get("loss") for m in logs if m.metrics.get("loss") is not None]
    values = [v for m in logs for v in m.metrics.values()]
    gaps = [b - a for a, b in zip(reporter.step_times, reporter.step_times[1:], strict=False)]
    return {
        "ran": True,
        "steps": result.step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "finite_metrics": all(v is not None and math.isfinite(v) for v in values) and bool(logs),
        "peak_mem_gb": (
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        ),
        "s_per_step": statistics.median(gaps) if gaps else wall / max(1, result.step),
        "wall_s": wall,
    }


def section_methods(dry: bool) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "model", dry)
        for label, method in _method_cases():
            try:
                rows[label] = run_method_case(label, method, model, work, dry)
            except Exception as exc:
                traceback.print_exc()
                rows[label] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            _write_partial({"methods": rows})
    return {"model": "tiny" if dry else "Qwen2.5-0.5B shape, random, bf16", "rows": rows}


# --------------------------------------------------------------------------- packing
def section_packing(dry: bool) -> dict:
    """Padded vs padding-free SFT on the suite's model: tokens/s and the loss curves."""
    import torch

    from bench.packing import loss_gap, run_arm, sft_rows

    cuda = torch.cuda.is_available()
    steps, batch, hi = (3, 4, 128) if dry else (8, 8, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_model(Path(tmp) / "model", dry))
        rows = sft_rows(model, steps * batch, 16, hi)
        arms = {}
        for arm in ("padded", "packed"):
            arms[arm] = run_arm(
                "sft", arm == "packed", model, rows,
                steps=steps, batch=batch, max_len=hi, warmup=1, cuda=cuda,
            )  # fmt: skip
            _write_partial({"rows": arms})
    return {
        "rows": arms,
        "packed_over_padded": arms["packed"]["tokens_per_s"] / arms["padded"]["tokens_per_s"],
        "loss_gap": loss_gap(arms["packed"]["losses"], arms["padded"]["losses"]),
        "lengths": [16, hi],
    }


def _packing_lines(pk: dict) -> list[str]:
    if "packed_over_padded" not in pk:
        return ["", f"## Packing (SFT): {pk.get('error')}"]
    rows = [
        [arm, _f(r["tokens_per_s"], "{:.0f}"), _f(r["step_s"], "{:.3f}")]
        for arm, r in pk["rows"].items()
    ]
    lo, hi = pk["lengths"]
    return [
        "",
        f"## Packing (SFT, rows of {lo}..{hi} tokens)",
        "",
        *_table(["batches", "tokens/s", "s/step"], rows),
        "",
        f"packed / padded tokens/s: {_f(pk['packed_over_padded'], '{:.2f}')}; largest relative "
        f"loss difference {_f(pk['loss_gap'], '{:.1e}')}",
    ]


# --------------------------------------------------------------------------- SFT step
SFT_VARIANTS = ("trl", "ours", "liger")


def sft_step_variant(variant: str, dry: bool) -> dict:
    """One SFT run with ``variant``'s head, in this process; step time and peak memory."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainers.fused_head import restore_trl_kernel, use_posttrain_kernel

    (use_posttrain_kernel if variant == "ours" else restore_trl_kernel)()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", dry)
        tok = AutoTokenizer.from_pretrained(model)
        steps, batch, seq = (3, 2, 32) if dry else (8, 8, 1024)
        vocab = tok.vocab_size
        gen = torch.Generator().manual_seed(0)
        rows = torch.randint(0, vocab, (steps * batch, seq), generator=gen)
        data = Dataset.from_list([{"input_ids": r.tolist()} for r in rows])
        times: list[float] = []

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t0)

        cuda = torch.cuda.is_available()
        args = SFTConfig(
            output_dir=str(Path(tmp) / "out"),
            max_steps=steps,
            per_device_train_batch_size=batch,
            max_length=seq,
            learning_rate=1e-5,
            logging_steps=steps,
            save_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            bf16=cuda,
            gradient_checkpointing=cuda,
            use_liger_kernel=variant == "liger",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = SFTTrainer(
            model=str(model),
            args=args,
            train_dataset=data,
            processing_class=tok,
            callbacks=[Timer()],
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        measured = times[1:] or times
        return {
            "s_per_step": statistics.median(measured),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "tokens_per_step": batch * seq,
        }


def section_sft_step(dry: bool, deadline: float) -> dict:
    import importlib.util

    rows = {}
    for variant in SFT_VARIANTS:
        left = deadline - time.monotonic()
        if variant == "liger" and importlib.util.find_spec("liger_kernel") is None:
            rows[variant] = {"error": "not run: liger-kernel is not installed"}
            continue
        if variant == "liger" and dry:
            rows[variant] = {"error": "not run: Liger's kernels need a GPU"}
            continue
        if left < 10:
            rows[variant] = {"error": "not run: the section's time was used up"}
            continue
        rows[variant] = _child("sft_variant", dry, left, variant=variant)
    ours, trl = rows.get("ours", {}), rows.get("trl", {})
    ratio = None
    if "s_per_step" in ours and "s_per_step" in trl:
        ratio = ours["s_per_step"] / trl["s_per_step"]
    mem_ok = None
    if ours.get("peak_mem_gb") is not None and trl.get("peak_mem_gb") is not None:
        mem_ok = ours["peak_mem_gb"] <= trl["peak_mem_gb"]
    target = {"ours_over_trl": ratio, "met": {"speed": ratio is not None and ratio <= 0.9}}
    target["met"]["memory"] = mem_ok
    return {"rows": rows, "target": target}


# --------------------------------------------------------------------------- running
def _lora_adapter(base: Path, out: Path) -> Path:
    """A rank-8 LoRA adapter of ``base`` with non-zero B (so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def section_inference(dry: bool) -> dict:
    import importlib.util

    if dry or importlib.util.find_spec("vllm") is None:
        why = "dry run" if dry else "vllm is not installed on this host"
        return {"skipped": why}
    import asyncio
    import threading

    import httpx
    import uvicorn

    from workers.inference.engines import VllmEngine
    from workers.inference.front import MODEL_HEADER, create_front
    from workers.inference.process import free_port

    work = Path(tempfile.mkdtemp(prefix="gpu-suite-inference-"))
    base = build_model(work / "base", dry)
    adapter = _lora_adapter(base, work / "adapter")
    engine = VllmEngine(
        command="vllm", idle_seconds=600, log_dir=work / "logs", start_timeout=600, max_loras=2
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_front(engine, load_wait=600, max_tokens=256),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    out: dict = {"model": "Qwen2.5-0.5B shape, random weights, bf16", "rows": {}}
    body = {
        "messages": [{"role": "user", "content": "Say hello to Alice."}],
        "temperature": 0,
        "max_tokens": 128,
    }
    try:
        while not server.started:
            time.sleep(0.1)
        refs = {
            "base": {"name": "base", "path": str(base), "base": None},
            "lora": {"name": "lora", "path": str(adapter), "base": str(base)},
        }
        for label, ref in refs.items():
            headers = {MODEL_HEADER: json.dumps(ref)}
            row: dict = {}
            for attempt in ("cold", "warm"):
                start = time.perf_counter()
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json=body,
                    headers=headers,
                    timeout=900,
                )
                seconds = time.perf_counter() - start
                if r.status_code != 200:
                    row = {"error": f"{r.status_code}: {r.text[:300]}"}
                    break
                tokens = r.json()["usage"]["completion_tokens"]
                row[f"{attempt}_s"] = round(seconds, 3)
                row["tokens"] = tokens
                row["text"] = r.json()["choices"][0]["message"]["content"][:60]
                if attempt == "warm":
                    row["tokens_per_s"] = round(tokens / seconds, 1)
            out["rows"][label] = row
            _write_partial(out)
        rows = out["rows"]
        out["adapter_changes_answer"] = rows.get("base", {}).get("text") != rows.get(
            "lora", {}
        ).get("text")
    except Exception:
        out["error"] = traceback.format_exc()[-1500:]
    finally:
        server.should_exit = True
        thread.join(120)
    return out


SECTIONS = {
    "env": section_env,
    "tests": section_tests,
    "kernels": section_kernels,
    "methods": section_methods,
    "inference": section_inference,
    "packing": section_packing,
}
_PARTIAL: Path | None = None


def _write_partial(data: dict) -> None:
    """A section child's progress so far (read back if the section runs out of time)."""
    if _PARTIAL is not None:
        _PARTIAL.write_text(json.dumps(data, default=str))


def _child(section: str, dry: bool, timeout: float, **extra) -> dict:
    """Run one section (or SFT variant) in a child process within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        result, partial = Path(tmp) / "result.json", Path(tmp) / "partial.json"
        cmd = [
            sys.executable, "-m", "bench.gpu_suite", "--child", section,
            "--child-result", str(result), "--child-partial", str(partial),
            *(["--dry-run"] if dry else []), *(f"--{k}={v}" for k, v in extra.items()),
        ]  # fmt: skip
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
            )
            code, tail = proc.returncode, (proc.stderr or proc.stdout)[-1500:]
        except subprocess.TimeoutExpired as exc:
            code = "timeout"
            tail = (exc.stderr or b"")[-1500:].decode(errors="replace")
        seconds = round(time.monotonic() - start, 1)
        if result.exists():
            return {**json.loads(result.read_text()), "seconds": seconds}
        done = json.loads(partial.read_text()) if partial.exists() else {}
        return {
            **done,
            "error": f"section ended without a result (exit {code}) after {seconds} s",
            "log_tail": tail,
            "seconds": seconds,
        }


def child_main(args: argparse.Namespace) -> int:
    global _PARTIAL
    _PARTIAL = Path(args.child_partial)
    if args.child == "sft_variant":
        out = sft_step_variant(args.variant, args.dry_run)
    else:
        out = SECTIONS[args.child](args.dry_run)
    Path(args.child_result).write_text(json.dumps(out, default=str))
    return 0


def run_suite(out_dir: Path, dry: bool, only: list[str] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report: dict = {"started": stamp, "dry_run": dry, "sections": {}}
    path = out_dir / f"gpu-suite-{'dry' if dry else 'cuda'}-{stamp}.json"
    scale = 4 if dry else 1  # CPU steps are slower; the dry run's sizes are tiny
    for name in [*SECTIONS, "sft_step"]:
        if only and name not in only:
            continue
        allowance = BUDGET[name] * scale
        print(f"== {name} (up to {allowance} s)", flush=True)
        if name == "sft_step":
            start = time.monotonic()
            result = section_sft_step(dry, time.monotonic() + allowance)
            result["seconds"] = round(time.monotonic() - start, 1)
        else:
            result = _child(name, dry, allowance)
        report["sections"][name] = result
        path.write_text(json.dumps(report, indent=2, default=str))
        path.with_suffix(".md").write_text(render(report))
    report["finished"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path.write_text(json.dumps(report, indent=2, default=str))
    path.with_suffix(".md").write_text(render(report))
    print(render(report))
    return path


# --------------------------------------------------------------------------- tables
def _f(x, fmt="{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x) if isinstance(x, float | int) else str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row] + [""] * (len(header) - len(row))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _kernel_lines(k: dict, dry: bool) -> list[str]:
    where = "fp32 on the CPU, tiny shape" if dry else "bf16 on CUDA"
    rows = []
    for r in k.get("rows", []):
        head = ["x".join(map(str, r["shape"])), r["mode"], r["method"]]
        if "full_ms" not in r:
            rows.append([*head, r.get("skip") or r.get("error")])
            continue
        rows.append(
            [
                *head,
                _f(r["fwd_ms"], "{:.2f}"),
                _f(r["fwd_pct_peak"], "{:.1f}"),
                _f(r["full_ms"], "{:.2f}"),
                _f(r["full_tflops"], "{:.0f}"),
                _f(r["full_pct_peak"], "{:.1f}"),
                _f(r["peak_mb"], "{:.0f}"),
            ]
        )
    header = ["shape", "mode", "method", "fwd ms", "fwd % peak", "fwd+bwd ms", "TF/s"]
    lines = ["", f"## Kernel ({where})", "", *_table([*header, "% peak", "peak MB"], rows)]
    targets = [
        [
            "x".join(map(str, r["shape"])),
            r["mode"],
            f"{_f(r['ours_over_best'], '{:.2f}')} ({r['best_rival']})",
            _f(r["pct_peak"], "{:.1f}"),
            _f(r["extra_over_grads_pct"], "{:.1f}"),
            ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in r["met"].items()),
        ]
        for r in k.get("targets", [])
    ]
    header = ["shape", "mode", "ours / best rival", "% peak", "extra / grads %", "met"]
    lines += ["", "Targets (fwd+bwd): <= 1.0x, >= 60% of peak, <= 10% extra memory", ""]
    lines += _table(header, targets)
    return lines + ([f"\nkernels: {k['error']}"] if k.get("error") else [])


def _method_lines(m: dict) -> list[str]:
    rows = []
    for label, r in (m.get("rows") or {}).items():
        if not r.get("ran"):
            rows.append([label, f"no: {r.get('error')}"])
            continue
        rows.append(
            [
                label,
                "yes",
                r["steps"],
                _f(r["first_loss"], "{:.4f}"),
                _f(r["last_loss"], "{:.4f}"),
                r["finite_metrics"],
                _f(r["peak_mem_gb"], "{:.2f}"),
                _f(r["s_per_step"], "{:.3f}"),
            ]
        )
    header = ["method", "ran", "steps", "first loss", "last loss", "finite", "peak GB", "s/step"]
    lines = ["", f"## Methods ({m.get('model', '')})", "", *_table(header, rows)]
    return lines + ([f"\nmethods: {m['error']}"] if m.get("error") else [])


def _sft_lines(st: dict) -> list[str]:
    rows = []
    for variant, r in st.get("rows", {}).items():
        if "s_per_step" in r:
            rows.append([variant, _f(r["s_per_step"], "{:.3f}"), _f(r["peak_mem_gb"], "{:.2f}")])
        else:
            rows.append([variant, r.get("error")])
    tgt = st.get("target", {})
    ratio = _f(tgt.get("ours_over_trl"), "{:.2f}")
    return [
        "",
        "## SFT trainer step",
        "",
        *_table(["head", "s/step", "peak GB"], rows),
        "",
        f"ours / trl: {ratio} (target <= 0.9 at no more memory): {tgt.get('met')}",
    ]


def render(report: dict) -> str:
    s, dry = report["sections"], report["dry_run"]
    lines = [f"# GPU suite ({'dry run, CPU' if dry else 'CUDA'}) {report['started']}"]
    env = {k: v for k, v in s.get("env", {}).items() if k != "seconds"}
    if env:
        lines += ["", ", ".join(f"{k}: {v}" for k, v in env.items())]
    t = s.get("tests")
    if t:
        failures = f"; failures: {t['failures']}" if t.get("failures") else ""
        lines += [
            "",
            "## CUDA tests (pytest -m gpu)",
            "",
            f"passed {t.get('passed')}, failed {t.get('failed')}, errors {t.get('errors')}, "
            f"skipped {t.get('skipped')}{failures}",
        ]
    if s.get("kernels"):
        lines += _kernel_lines(s["kernels"], dry)
    if s.get("methods"):
        lines += _method_lines(s["methods"])
    if s.get("inference"):
        lines += _inference_lines(s["inference"])
    if s.get("packing"):
        lines += _packing_lines(s["packing"])
    if s.get("sft_step"):
        lines += _sft_lines(s["sft_step"])
    return "\n".join(lines) + "\n"


def _inference_lines(inf: dict) -> list[str]:
    if inf.get("skipped"):
        return ["", f"## Inference (vLLM): skipped, {inf['skipped']}"]
    rows = []
    for label, r in (inf.get("rows") or {}).items():
        if "error" in r:
            rows.append([label, r["error"]])
            continue
        rows.append(
            [
                label,
                _f(r.get("cold_s")),
                _f(r.get("warm_s")),
                r.get("tokens"),
                _f(r.get("tokens_per_s")),
                repr(r.get("text")),
            ]
        )
    header = ["model", "first (s)", "again (s)", "tokens", "tokens/s", "answer"]
    lines = ["", f"## Inference (vLLM, {inf.get('model', '')})", "", *_table(header, rows)]
    lines.append(f"\nthe adapter changes the answer: {inf.get('adapter_changes_answer')}")
    return lines + ([f"\ninference: {inf['error']}"] if inf.get("error") else [])


def use_wheels(folder: Path) -> None:
    """Unpack the wheels in ``folder`` (the packages the GPU host lacks: README, "The GPU
    suite") into a scratch directory and re-run this command with it first on the path.
    A wheel is a zip of its packages, so no installer (and no registry) is needed."""
    import zipfile

    site = Path(tempfile.mkdtemp(prefix="gpu-suite-site-"))
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    print(f"unpacked {len(wheels)} wheels from {folder} into {site}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    argv, rest = [], iter(sys.argv[1:])
    for a in rest:
        if a == "--wheels":
            next(rest, None)
        elif not a.startswith("--wheels="):
            argv.append(a)
    os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_suite", *argv], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (what CI runs)")
    ap.add_argument(
        "--only",
        help="comma-separated sections: env,tests,kernels,methods,inference,packing,sft_step",
    )
    ap.add_argument("--wheels", type=Path, help="a folder of wheels to unpack first (GPU host)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    ap.add_argument("--child-partial", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.wheels is not None:
        use_wheels(args.wheels)  # does not return
    if args.child:
        return child_main(args)
    path = run_suite(args.out, args.dry_run, args.only.split(",") if args.only else None)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
