"""Kernel tests. ``run_python`` runs code in a fresh interpreter at the repo root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run_python(*args: str, timeout: float = 300) -> str:
    """Run ``python ARGS`` from the repo root; assert it exits 0 and return its stdout."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
