"""How often each GRPO preset's clip binds: its recipe's update schedule vs one update.

    python -m bench.grpo_clip              # every preset, both schedules, ~1 min on 2 cores
    python -m bench.grpo_clip --steps 8 --presets dapo,hapo

A preset's update schedule (``steps_per_generation`` x ``num_iterations`` policy updates
per generated batch, ``docs/algorithms/grpo.md``) decides whether its clipping ever
acts: with one update per batch the policy that sampled is the one being trained, the
ratio is 1 and no clip binds. This runs each preset on the tiny offline model through
the real runner (64 prompts, 4 completions each, 2 prompts per step, 8 new tokens,
lr 5e-3), once with its recipe's schedule ("recipe") and once with one update per
generated batch ("1 update"), and prints the mean over steps of the fraction of
completion tokens whose ratio was clipped (``clip_ratio/region_mean``, low and high).
DAPO keeps its truncated completions here: a random tiny model rarely ends one within 8
tokens, and masking them all would leave nothing to clip.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

PRESETS = ("grpo", "dapo", "dr_grpo", "ngrpo", "xrpo", "hapo")
GRADER = {
    "type": "length_penalty",
    "name": "short",
    "input": "{{sample.output_text}}",
    "max_length": 40,
    "target_length": 8,
    "unit": "characters",
}
HP = {"num_generations": 4, "batch_size": 8, "max_completion_length": 8, "learning_rate": 5e-3}


def prompts(n: int = 64) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Tell me about {i}."}]} for i in range(n)]


def run(variant: str, model: Path, work: Path, steps: int, one_update: bool) -> list[dict]:
    """The per-step metrics of one short run of ``variant``."""
    import json

    from trainers import registry
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.reporting import Reporter
    from trainers.runner import run_method

    hp = {**HP, "max_steps": steps, "mask_truncated_completions": False}
    if one_update:
        hp["steps_per_generation"] = 1
    block = {"variant": variant, "graders": [GRADER], "hyperparameters": hp}
    spec = JobSpec.model_validate(
        {"model": str(model), "training_file": "f", "method": {"type": "grpo", "grpo": block}}
    )
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in prompts()) + "\n")
    plan = RunPlan(
        job_id=variant,
        spec=spec,
        training_path=data,
        output_dir=work / "out",
        data_dir=work,
        checkpoint_every_steps=1000,
    )
    reporter = Reporter()
    run_method(registry.resolve("grpo"), plan, reporter)
    return [m.metrics for m in reporter.sent if m.type == "log"]


def clip_fractions(logs: list[dict]) -> dict[str, float]:
    """Mean over steps of each clip ratio the run logged."""
    keys = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
    return {
        k.split("/")[1].removesuffix("_mean"): statistics.fmean(m.get(k) or 0.0 for m in logs)
        for k in keys
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args(argv)
    import torch

    from trainers.tiny_model import build_tiny_model

    torch.set_num_threads(1)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", seed=0)
        for variant in args.presets.split(","):
            for label, one in (("1 update", True), ("recipe", False)):
                torch.manual_seed(0)
                logs = run(variant, model, Path(tmp) / f"{variant}-{one}", args.steps, one)
                out[(variant, label)] = clip_fractions(logs)
    print(f"\nclip fractions over {args.steps} steps (low / high / region, mean of steps)")
    print(f"{'preset':<9}{'1 update per batch':>26}{'recipe schedule':>26}")
    for variant in args.presets.split(","):
        cells = [
            " / ".join(f"{out[(variant, label)][k]:.3f}" for k in ("low", "high", "region"))
            for label in ("1 update", "recipe")
        ]
        print(f"{variant:<9}{cells[0]:>26}{cells[1]:>26}")
    return out


if __name__ == "__main__":
    main()
