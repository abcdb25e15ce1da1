"""The GPU suite's dry run: every section runs on the CPU with tiny sizes and reports.

The suite itself is for a GPU host (``python -m bench.gpu_suite``); this keeps it from
rotting between the rare runs on one: a method that no longer trains through the
runner, a kernel that no longer runs, or a report field that went missing fails here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite import GRPO_PRESETS

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"supervised", "dpo", "bco", "oreo", "reinforcement", "egpo"} | {
    f"grpo:{v}" for v in GRPO_PRESETS
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-suite")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("gpu-suite-dry-*.json")
    assert path.with_suffix(".md").read_text().startswith("# GPU suite (dry run, CPU)")
    return json.loads(path.read_text())


def test_every_section_reports(report):
    assert set(report["sections"]) == {
        "env",
        "tests",
        "kernels",
        "methods",
        "inference",
        "packing",
        "sft_step",
    }
    assert report["sections"]["inference"]["skipped"] == "dry run"  # vLLM runs on GPU hosts only
    assert report["dry_run"] is True and "finished" in report
    env = report["sections"]["env"]
    assert env["device"] == "cpu" and env["torch"] and "import_errors" in env


def test_the_gpu_tests_are_collected_and_skip_on_cpu(report):
    tests = report["sections"]["tests"]
    assert tests["skipped"] >= 5 and tests["failed"] == tests["errors"] == 0


def test_the_kernel_rows_and_targets_are_measured(report):
    kernels = report["sections"]["kernels"]
    ours = [r for r in kernels["rows"] if r["method"] == "ours"]
    assert {r["mode"] for r in ours} == {"logp", "logp+ent"}
    assert all(r["full_ms"] > 0 and r["peak_mb"] >= 0 for r in ours), ours
    assert {t["mode"] for t in kernels["targets"]} == {"logp", "logp+ent"}
    assert all(t["best_rival"] == "trl" for t in kernels["targets"])  # TRL is installed


def test_every_method_trains_through_the_runner_with_finite_metrics(report):
    rows = report["sections"]["methods"]["rows"]
    assert set(rows) == METHODS
    for label, row in rows.items():
        assert row["ran"], (label, row.get("error"))
        assert row["steps"] >= 2 and row["finite_metrics"], label
        assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"]), label
        assert row["s_per_step"] > 0, label


def test_the_sft_step_compares_trls_head_with_ours(report):
    sft = report["sections"]["sft_step"]
    assert sft["rows"]["trl"]["s_per_step"] > 0 and sft["rows"]["ours"]["s_per_step"] > 0
    assert "not run" in sft["rows"]["liger"]["error"]  # no Liger kernels on a CPU
    assert sft["target"]["ours_over_trl"] > 0


def test_packed_sft_is_measured_against_padded_with_the_same_losses(report):
    packing = report["sections"]["packing"]
    assert packing["rows"]["padded"]["tokens_per_s"] > 0
    assert packing["rows"]["packed"]["tokens_per_s"] > 0
    assert packing["packed_over_padded"] > 0
    assert packing["loss_gap"] < 1e-4  # fp32 on the CPU: the same loss curve
