"""Settings of ``posttrain inference`` (environment ``POSTTRAIN_INFERENCE_*``, plus the
shared ones: Redis, key prefix, the inference queue, token and request bounds)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from workers.settings import WorkerSettings


class InferenceSettings(WorkerSettings):
    inference_engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers = `transformers serve` (CPU hosts, tests, the demo); "
        "vllm = vLLM's OpenAI-compatible server (GPU hosts).",
    )
    inference_host: str = Field("127.0.0.1", description="Address the worker's front binds.")
    inference_port: int = Field(8100, ge=0, le=65535, description="Port of the front; 0 = any.")
    inference_advertise_url: str | None = Field(
        None,
        description="URL the API reaches this worker at; default http://<host>:<port> (the "
        "machine's hostname when binding 0.0.0.0).",
    )
    inference_name: str | None = Field(None, description="Worker name; default host-pid.")
    inference_device: str = Field(
        "auto", description="Device of `transformers serve` (auto, cpu, cuda:0...)."
    )
    inference_gpus: str | None = Field(
        None, description="CUDA_VISIBLE_DEVICES of the engines; default = inherited."
    )
    inference_idle_seconds: float = Field(
        300.0, gt=0, description="A model (or vLLM server) unused this long is unloaded."
    )
    inference_load_wait_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest a request waits for its model to load before a 503 with "
        "Retry-After (the load goes on).",
    )
    inference_start_timeout: float = Field(
        180.0, gt=0, description="Seconds an engine may take to answer its health check."
    )
    inference_continuous_batching: bool = Field(
        False, description="Run `transformers serve` with continuous batching."
    )
    inference_max_engines: int = Field(
        1, ge=1, description="vLLM servers (base models) at once; each gets an equal share."
    )
    inference_max_loras: int = Field(4, ge=1, description="LoRA adapters per vLLM server.")
    inference_max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank vLLM serves.")
    inference_gpu_budget: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory all vLLM servers share."
    )
    inference_cache_dir: Path | None = Field(
        None, description="Writable scratch (adapter views, engine logs); default a temp dir."
    )
    inference_heartbeat_seconds: float = Field(
        2.0, gt=0, description="How often the worker rewrites its registry entry."
    )

    def cache_path(self) -> Path:
        if self.inference_cache_dir is not None:
            return Path(self.inference_cache_dir)
        return Path(tempfile.gettempdir()) / "posttrain-inference"
