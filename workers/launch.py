"""How a worker starts one run's training processes: accelerate, report pipe, signals.

Where a run goes (its ``Placement`` on this worker's devices) is ``workers.placement``;
every training process started here sees exactly the placement's devices
(``CUDA_VISIBLE_DEVICES``, empty on a CPU-only worker).

One process on at most one device runs ``python -m trainers.run`` directly, as
always. Anything more (several processes, a GPU job on a multi-device worker, or
a strategy other than DDP) runs under ``accelerate launch`` with a config file
in accelerate's own format (``ClusterConfig``'s fields, the file ``accelerate
config`` writes), saved beside the run plan: DDP, FSDP2 or DeepSpeed ZeRO-2/3,
a free rendezvous port (``main_process_port: 0``), and nothing read from the
host's default accelerate config. A CPU job's ranks come up as accelerate's
MULTI_CPU with gloo because the trainer sets ``use_cpu``.

torch's launcher starts each rank in its own session and closes inherited file
descriptors, so for launched runs the report channel is a named pipe only rank
0 opens (``--report-path``), pause is a flag file every rank checks at the step
boundary and agrees on (``plan.pause_path``), and stopping a run also stops the
ranks' own process groups. This module never imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.placement import Placement
from workers.processes import alive, stop_group


# --------------------------------------------------------------------------- accelerate
def accelerate_config(p: Placement) -> dict:
    """The run's accelerate config, in ``ClusterConfig``'s fields (what ``accelerate
    config`` writes). DDP uses accelerate's torchrun launcher (``MULTI_GPU``) on CPU
    too: the ranks come up MULTI_CPU with gloo because the trainer sets ``use_cpu``."""
    cfg: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_processes": p.processes,
        "num_machines": 1,
        "machine_rank": 0,
        "main_process_port": 0,  # accelerate picks a free port
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",  # CUDA_VISIBLE_DEVICES already holds exactly the worker's devices
        "mixed_precision": "no",  # the trainer's bf16 setting decides
        "use_cpu": False,  # True would select accelerate's single-process launcher
        "debug": False,
        "downcast_bf16": "no",
        "enable_cpu_affinity": False,
        "main_training_function": "main",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if p.strategy == "fsdp2":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # checkpoints stay plain HF files
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,
        }
    elif p.strategy.startswith("deepspeed_zero"):
        stage = int(p.strategy[-1])
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": stage,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": stage == 3,
            "zero3_save_16bit_model": stage == 3,  # a plain HF checkpoint, not ZeRO shards
        }
    return cfg


def write_accelerate_config(p: Placement, path: Path) -> Path:
    path.write_text(json.dumps(accelerate_config(p), indent=2))
    return path


def training_command(
    p: Placement,
    plan_path: Path,
    report_args: list[str],
    config: Path | None,
    module: str = "trainers.run",
) -> list[str]:
    """argv of the run: the trainer, or accelerate launching it once per rank."""
    script = ["-m", module, "--plan", str(plan_path), *report_args]
    if not p.launched:
        return [sys.executable, *script]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return [*accelerate, "--config_file", str(config), *script]


def training_env(base: dict[str, str], p: Placement, threads: int) -> dict[str, str]:
    return {
        **base,
        "CUDA_VISIBLE_DEVICES": p.visible_devices,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


# --------------------------------------------------------------------------- report channel
class ReportChannel:
    """Where the trainer's report lines arrive: an inherited pipe for one process, a
    named pipe (opened by rank 0 only) for a launched run."""

    def __init__(self, launched: bool):
        self._dir: str | None = None
        self._hold: int | None = None
        self.pass_fds: tuple[int, ...] = ()
        if not launched:
            self.read_fd, self._child_fd = os.pipe()
            self.args = ["--report-fd", str(self._child_fd)]
            self.pass_fds = (self._child_fd,)
            return
        self._dir = tempfile.mkdtemp(prefix="posttrain-report-")
        path = os.path.join(self._dir, "report.fifo")
        os.mkfifo(path, 0o600)
        self.read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Held open for the run, so the reader never sees EOF before rank 0 opens the
        # pipe (or between attempts of it to write); the run's end is the launcher's exit.
        self._hold = os.open(path, os.O_WRONLY)
        os.set_blocking(self.read_fd, True)
        self._child_fd = None
        self.args = ["--report-path", path]

    def started(self) -> None:
        """After the child started: close our copy of its end."""
        if self._child_fd is not None:
            os.close(self._child_fd)
            self._child_fd = None

    def close(self) -> None:
        """After the run: release the held end and the named pipe (the reader closes its fd)."""
        self.started()
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --------------------------------------------------------------------------- signals
def request_pause(proc: subprocess.Popen, p: Placement | None, pause_path: Path | None) -> None:
    """Ask the run to pause at its next step boundary: the flag file every rank reads
    (the ranks agree on it, so all stop at the same step), and SIGUSR1 for a lone
    trainer (``p`` None or not launched). A launcher is never sent SIGUSR1: torch's
    launcher would die of it."""
    if pause_path is not None:
        pause_path.touch()
    if p is None or not p.launched:
        os.kill(proc.pid, signal.SIGUSR1)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def stop_run(proc: subprocess.Popen, grace: float) -> None:
    """Stop the run and everything it started: SIGTERM its group (torch's launcher passes
    that on to every rank), SIGKILL after ``grace``; then SIGKILL what is left of the
    ranks' own groups (they run in sessions of their own)."""
    ranks = descendants(proc.pid)
    stop_group(proc, grace)
    for pid in ranks:
        for kill in (os.killpg, os.kill):  # a rank leads its group; its helpers may not
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in ranks):
        time.sleep(0.05)
