"""Where a job runs on a worker: its ``resources`` against the worker's devices (pure).

A worker owns a set of devices (``posttrain worker --gpus 0,1``, or
``POSTTRAIN_WORKER_GPUS``; unset: what ``nvidia-smi`` lists). ``place`` turns a job's
``resources`` into a ``Placement`` on such a worker, or says why it cannot run there
(``PlacementError``, naming the resources field). The API calls it at job creation
against the live workers of the job's queue (``workers.fleet``); the supervisor calls it
before it starts a run, and ``workers.launch`` starts the processes it describes.
Nothing here starts a process.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass

from trainers.contract.resources import STRATEGIES, Resources


class PlacementError(Exception):
    """The job cannot run on this worker (too few devices, strategy not installed);
    ``field`` is the resources field at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@functools.cache
def detect_gpus() -> tuple[str, ...]:
    """Indices of the GPUs ``nvidia-smi`` lists, once per process; none without it (the
    worker never touches CUDA itself)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def parse_devices(text: str | None) -> list[str] | None:
    """'0,1' -> ['0', '1']; '' -> [] (CPU-only); None -> None (not configured)."""
    if text is None:
        return None
    return [d.strip() for d in text.split(",") if d.strip()]


def worker_devices(configured: str | None) -> list[str]:
    devices = parse_devices(configured)
    return list(detect_gpus()) if devices is None else devices


def available_strategies() -> list[str]:
    """The strategies this host can run: DeepSpeed's only where it is installed."""
    have_ds = importlib.util.find_spec("deepspeed") is not None
    return [s for s in STRATEGIES if have_ds or not s.startswith("deepspeed")]


@dataclass(frozen=True)
class Placement:
    """How one job runs on this worker."""

    gpus: int  # GPUs the job uses (0 = CPU)
    processes: int  # training processes (ranks)
    strategy: str
    devices: tuple[str, ...]  # the worker's devices: every process's CUDA_VISIBLE_DEVICES

    @property
    def launched(self) -> bool:
        """Under ``accelerate launch``: several ranks, a strategy, or a device to pin."""
        return (
            self.processes > 1
            or self.strategy != "ddp"
            or (self.gpus > 0 and len(self.devices) > 1)
        )

    @property
    def visible_devices(self) -> str:
        return ",".join(self.devices)

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "CPU"
        how = f", {self.strategy} under accelerate" if self.launched else ""
        devs = self.visible_devices or "none"
        return f"{self.processes} process(es) on {where}{how}; CUDA_VISIBLE_DEVICES={devs}"

    def as_record(self) -> dict:
        return {
            "gpus": self.gpus,
            "processes": self.processes,
            "strategy": self.strategy,
            "devices": self.visible_devices,
        }


def place(res: Resources, devices: list[str], strategies: list[str]) -> Placement:
    """The job's resources on a worker with ``devices``; ``PlacementError`` if they do not fit."""
    gpus = res.gpus if res.gpus is not None else (1 if devices else 0)
    if gpus > len(devices):
        have = f"{len(devices)} ({','.join(devices)})" if devices else "none (CPU-only)"
        raise PlacementError(
            f"the job needs {gpus} GPU(s), but this worker's devices are {have}; "
            "run it on a queue whose workers have enough GPUs",
            "gpus",
        )
    if gpus == 0 and res.strategy != "ddp":
        raise PlacementError(
            f"strategy '{res.strategy}' needs GPUs, and this job runs on CPU "
            "(accelerate runs DDP over gloo there); use 'ddp' or a GPU queue",
            "strategy",
        )
    if res.strategy not in strategies:
        raise PlacementError(
            f"strategy '{res.strategy}' is not available on this worker "
            f"(available: {', '.join(strategies)}); install deepspeed on the worker",
            "strategy",
        )
    processes = gpus if gpus else (res.processes or 1)
    return Placement(gpus, processes, res.strategy, tuple(devices))


def fits(res: Resources, devices: list[str], strategies: list[str]) -> bool:
    try:
        place(res, devices, strategies)
    except PlacementError:
        return False
    return True
