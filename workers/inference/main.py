"""``posttrain inference``: one inference worker (an engine and its front).

It starts its engine, registers in Redis (``registry``) once the engine answers, serves
the front with uvicorn, and on SIGTERM/SIGINT withdraws and stops the engine; the engine
is also sent SIGTERM by the kernel if the worker dies any other way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from workers.inference.engines import Engine, TransformersEngine, VllmEngine
from workers.inference.front import create_front
from workers.inference.process import free_port
from workers.inference.registry import Advertiser
from workers.inference.settings import InferenceSettings
from workers.placement import worker_devices
from workers.redis_client import make_redis

log = logging.getLogger(__name__)


def build_engine(s: InferenceSettings) -> Engine:
    cache = s.cache_path()
    logs = cache / "logs"
    if s.inference_engine == "vllm":
        return VllmEngine(
            command=s.vllm_command,
            idle_seconds=s.inference_idle_seconds,
            log_dir=logs,
            start_timeout=max(s.inference_start_timeout, s.vllm_start_timeout),
            max_engines=s.inference_max_engines,
            max_loras=s.inference_max_loras,
            max_lora_rank=s.inference_max_lora_rank,
            gpu_budget=s.inference_gpu_budget,
            gpus=s.inference_gpus,
        )
    env = {"CUDA_VISIBLE_DEVICES": s.inference_gpus} if s.inference_gpus is not None else {}
    return TransformersEngine(
        device=s.inference_device,
        idle_seconds=s.inference_idle_seconds,
        log_dir=logs,
        cache_dir=cache,
        start_timeout=s.inference_start_timeout,
        continuous_batching=s.inference_continuous_batching,
        env=env,
    )


def run(s: InferenceSettings | None = None) -> int:
    s = s or InferenceSettings()
    port = s.inference_port or free_port(s.inference_host)
    host_name = socket.gethostname()
    name = s.inference_name or f"inference@{host_name}-{os.getpid()}"
    shown = host_name if s.inference_host in ("0.0.0.0", "::") else s.inference_host
    url = s.inference_advertise_url or f"http://{shown}:{port}"
    engine = build_engine(s)
    devices = worker_devices(s.inference_gpus) if s.inference_engine == "vllm" else []
    client = make_redis(s)

    def info() -> dict:
        return {
            "name": name,
            "url": url,
            "engine": engine.kind,
            "devices": devices or [s.inference_device],
            "models": engine.loaded(),
            "pid": os.getpid(),
            "engine_pids": [p.pid for p in engine.processes() if p.alive()],
        }

    advertiser = Advertiser(
        client,
        s.key_prefix,
        s.inference_queue,
        info,
        s.inference_heartbeat_seconds,
        ttl=max(3 * s.inference_heartbeat_seconds, 6.0),
    )
    front = create_front(
        engine,
        load_wait=s.inference_load_wait_seconds,
        max_tokens=s.inference_max_tokens,
        token=s.inference_token,
    )
    inner = front.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            advertiser.start()  # only once the engine answers
            log.info("inference worker %s (%s) serving at %s", name, engine.kind, url)
            try:
                yield
            finally:
                advertiser.stop()

    front.router.lifespan_context = lifespan
    uvicorn.run(front, host=s.inference_host, port=port, log_level="warning")
    return 0
