"""A vLLM server owned by one run: started before its trainer, stopped after it.

GRPO jobs with ``rollout_engine: vllm`` and ``vllm_mode: server`` generate on a
vLLM server instead of inside the training process. The worker starts that
server itself, next to the job's training process and for that run only, in its
own process group that dies with the worker (``PR_SET_PDEATHSIG``), waits for
its ``/health`` endpoint, hands its URL to the trainer through the run plan
(TRL's ``vllm_server_base_url``), and stops the whole group when the run ends
however it ends. The command is what TRL 1.16's ``trl vllm-serve`` would run:
``vllm serve MODEL --port P`` with NCCL weight transfer and processed log-probs,
so TRL's ``VLLMClient`` can push weights to it each step. A LoRA job with
``rollout_mode: "async"`` also gets ``--enable-lora`` (its rank rounded up to one vLLM
builds buffers for, and room for ``max_staleness + 2`` adapters: the versions requests may
still name, plus the next one loaded before the oldest is unloaded) and runtime adapter
loading, so TRL's AsyncGRPOTrainer syncs the adapter alone instead of merged weights.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from trainers.contract.hparams import RolloutEngine
from trainers.contract.spec import JobSpec
from workers.processes import die_with_parent, stop_group
from workers.settings import WorkerSettings


def rollout_engines(settings: WorkerSettings) -> list[str]:
    """What this worker's runs can sample with, for its fleet entry (the API refuses a job
    whose rollout_engine no live worker of its queue has): always ``transformers``;
    ``vllm`` where its runs can import vLLM (colocate); ``vllm-server`` where its
    ``vllm_command`` is installed (server mode, and ``rollout_mode: "async"``)."""
    engines = ["transformers"]
    if importlib.util.find_spec("vllm") is not None:
        engines.append("vllm")
    command = shlex.split(settings.vllm_command)
    if command and shutil.which(command[0]):
        engines.append("vllm-server")
    return engines


def wants_server(spec: JobSpec) -> bool:
    """Whether a job's rollouts run on a worker-owned vLLM server."""
    hp = spec.method.hyperparameters
    return isinstance(hp, RolloutEngine) and hp.wants_vllm_server


# The max_lora_rank values vLLM builds its stacked LoRA buffers for.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoraServing:
    max_lora_rank: int
    max_loras: int


def lora_serving(spec: JobSpec) -> LoraServing | None:
    """The adapter serving an async LoRA job's server needs (None: none)."""
    hp = spec.method.hyperparameters
    if spec.training_type != "lora" or getattr(hp, "rollout_mode", "sync") != "async":
        return None
    rank = next((r for r in VLLM_LORA_RANKS if r >= spec.lora.r), None)
    if rank is None:
        return None  # vLLM cannot serve it as an adapter; TRL then syncs merged weights
    return LoraServing(max_lora_rank=rank, max_loras=hp.max_staleness + 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    settings: WorkerSettings, model: str, port: int, lora: LoraServing | None = None
) -> list[str]:
    adapters = (
        [
            "--enable-lora",
            "--max-lora-rank",
            str(lora.max_lora_rank),
            "--max-loras",
            str(lora.max_loras),
        ]
        if lora is not None
        else []
    )
    return [
        *shlex.split(settings.vllm_command),
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--weight-transfer-config",
        '{"backend":"nccl"}',
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "-1",
        *adapters,
    ]


@dataclass
class VLLMServer:
    proc: subprocess.Popen
    url: str

    @classmethod
    def start(
        cls, settings: WorkerSettings, model: str, log: Path, lora: LoraServing | None = None
    ) -> VLLMServer:
        port = _free_port()
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        if lora is not None:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        if settings.vllm_server_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = settings.vllm_server_gpus
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                server_command(settings, model, port, lora),
                start_new_session=True,
                preexec_fn=die_with_parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = cls(proc, f"http://127.0.0.1:{port}")
        try:
            server.wait_healthy(settings.vllm_start_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the vLLM server did not answer /health within {timeout:.0f} s")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds."""
        stop_group(self.proc, grace)
