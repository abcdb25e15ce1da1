"""The engines an inference worker runs, and how a caller's model is made ready on them.

``TransformersEngine`` (CPU hosts, tests, the demo): one ``transformers serve`` process.
It loads a model directory on demand (``POST /load_model``) and unloads it after
``idle_seconds`` unused. A LoRA fine-tune is served through its adapter: the worker
builds a *view* directory (the base's files linked in, the adapter's files beside them,
``adapter_config.json`` naming the base's directory), which transformers loads as the
base with the adapter attached.

``VllmEngine`` (GPU hosts): vLLM's OpenAI-compatible server, one process per base model,
with LoRA enabled. An adapter is loaded into its base's server at runtime the first
time it is asked for (``POST /v1/load_lora_adapter``; the server runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and unloaded least-recently-used beyond
``max_loras``; a full fine-tune is its own base. At most ``max_engines`` servers run at
once (each gets ``gpu_budget / max_engines`` of the GPU's memory); the least recently
used idle one is stopped to make room.

Both share the lifecycle: concurrent requests for a model that is loading wait on the
same load; a load that fails is reported naming the model and forgotten, so a later
request tries again; a dead engine process is restarted by ``check()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from workers.inference.process import EngineFailed, EngineProcess, free_port

log = logging.getLogger(__name__)

# Files of a checkpoint that belong to the adapter or its tokenizer, not to the base.
_ADAPTER_FILES = ("adapter_", "tokenizer", "chat_template", "special_tokens_map", "added_tokens")


class LoadFailed(RuntimeError):
    """The engine could not load a model (the message is safe to show its caller)."""


@dataclass(frozen=True)
class ModelRef:
    """A model as the API resolved it for one caller."""

    name: str  # what the caller wrote; answers carry it
    path: str  # a full model's directory, or a LoRA adapter's
    base: str | None = None  # an adapter's base model directory

    @property
    def adapter(self) -> bool:
        return self.base is not None

    @property
    def key(self) -> str:
        return self.path

    @classmethod
    def from_header(cls, raw: str) -> ModelRef:
        data = json.loads(raw)
        return cls(str(data["name"]), str(data["path"]), data.get("base") or None)

    def header(self) -> str:
        return json.dumps({"name": self.name, "path": self.path, "base": self.base})


@dataclass(frozen=True)
class Target:
    """Where one request goes: an engine's URL and the model name that engine knows."""

    url: str
    model: str
    engine: EngineProcess


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class Engine:
    kind = "engine"
    # OpenAI parameters the engine implements itself (the front adapts the rest or refuses)
    native: frozenset[str] = frozenset()
    # the engine neither checks a prompt against the model's context nor cuts a stop
    # sequence from its text: the front does both for it
    checks_context = True
    cuts_stop_text = True

    def __init__(self, *, idle_seconds: float, log_dir: Path):
        self.idle_seconds, self.log_dir = idle_seconds, log_dir
        self._loads: dict[str, asyncio.Task] = {}
        self._used: dict[str, float] = {}  # model key -> last use (monotonic)
        self._targets: dict[str, Target] = {}  # model key -> where it was loaded
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))

    # ---- what the registry advertises
    def loaded(self) -> list[str]:
        now = time.monotonic()
        warm = [k for k, t in self._used.items() if now - t < self.idle_seconds]
        return sorted({*warm, *self._loads})

    def processes(self) -> list[EngineProcess]:
        raise NotImplementedError

    # ---- lifecycle
    async def start(self) -> None:
        raise NotImplementedError

    async def check(self) -> None:
        """Restart what died; unload what has been idle too long."""
        raise NotImplementedError

    async def stop(self) -> None:
        for task in self._loads.values():
            task.cancel()
        for proc in self.processes():
            await asyncio.to_thread(proc.stop)
        await self.client.aclose()

    async def ensure(self, ref: ModelRef, wait: float) -> Target:
        """The model ready on an engine. Waits at most ``wait`` s for a load (which goes on
        for later requests: ``TimeoutError``); ``LoadFailed`` names a model that cannot
        load; ``EngineFailed`` when the engine itself is down."""
        task = self._loads.get(ref.key)
        if task is None:
            task = asyncio.create_task(self._load(ref))
            self._loads[ref.key] = task
            task.add_done_callback(lambda t, key=ref.key: self._loaded(key, t))
        target = await asyncio.wait_for(asyncio.shield(task), wait)
        self._used[ref.key] = time.monotonic()
        return target

    def _loaded(self, key: str, task: asyncio.Task) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        if not task.cancelled() and task.exception() is None:
            self._used[key] = time.monotonic()
            self._targets[key] = task.result()

    def warm_target(self, ref: ModelRef) -> Target | None:
        """The target of a model loaded and used recently, without asking the engine."""
        target = self._targets.get(ref.key)
        used = self._used.get(ref.key)
        if target is None or used is None or not target.engine.alive():
            return None
        if time.monotonic() - used > self.idle_seconds * 0.8:
            return None
        self._used[ref.key] = time.monotonic()
        return target

    def server_of(self, target: Target) -> _VllmServer | None:
        """The server process a target runs on, where the engine counts requests in flight
        per server (so a busy one is never stopped to make room)."""
        return None

    def engine_down(self) -> None:
        """A request saw the engine fail (the next check restarts what it must)."""
        return None

    def forget(self, keys: list[str] | None = None) -> None:
        for key in list(self._used) if keys is None else keys:
            self._used.pop(key, None)
            self._targets.pop(key, None)

    async def _load(self, ref: ModelRef) -> Target:
        raise NotImplementedError


class TransformersEngine(Engine):
    kind = "transformers"
    checks_context = False  # it would generate past max_position_embeddings
    cuts_stop_text = False  # its text keeps the stop string generation stopped on
    native = frozenset({"temperature", "top_p", "max_tokens", "stop", "seed", "stream", "tools"})

    def __init__(
        self,
        *,
        device: str,
        idle_seconds: float,
        log_dir: Path,
        cache_dir: Path,
        start_timeout: float,
        continuous_batching: bool = False,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        super().__init__(idle_seconds=idle_seconds, log_dir=log_dir)
        self.cache_dir = cache_dir
        port = free_port()
        argv = [*(command or [sys.executable, "-m", "transformers.cli.transformers"]), "serve"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--device", device]
        argv += ["--model-timeout", str(max(1, int(idle_seconds)))]
        if continuous_batching:
            argv.append("--continuous-batching")
        self.proc = EngineProcess(
            "transformers-serve",
            argv,
            port,
            {**os.environ, **(env or {})},
            log_dir / "transformers-serve.log",
            start_timeout=start_timeout,
        )
        self._ready = asyncio.Event()
        self._restart_lock = asyncio.Lock()

    def processes(self) -> list[EngineProcess]:
        return [self.proc]

    async def start(self) -> None:
        await self._restart()

    async def _restart(self) -> None:
        async with self._restart_lock:
            if self._ready.is_set() and self.proc.alive():
                return
            self._ready.clear()
            self.forget()
            await asyncio.to_thread(self.proc.stop, 2.0)
            await asyncio.to_thread(self.proc.start)
            await self.proc.wait_ready(self.client)
            self._ready.set()

    async def check(self) -> None:
        if self._restart_lock.locked():
            return
        if not await self.proc.healthy(self.client):
            log.warning("transformers serve is down (pid %s); restarting it", self.proc.pid)
            self._ready.clear()
            await self._restart()

    def engine_down(self) -> None:
        """A request saw the engine fail: the next check restarts it at once."""
        if not self.proc.alive():
            self._ready.clear()

    async def _load(self, ref: ModelRef) -> Target:
        if not self._ready.is_set() or not self.proc.alive():
            await self._restart()
        model_id = str(await asyncio.to_thread(self.view, ref)) if ref.adapter else ref.path
        async with self.client.stream(
            "POST", self.proc.url + "/load_model", json={"model": model_id}
        ) as resp:
            if resp.status_code != 200:
                raise LoadFailed(f"model {ref.name!r} could not be loaded")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("status") == "ready":
                    return Target(self.proc.url, model_id, self.proc)
                if event.get("status") == "error":
                    log.warning("loading %s failed: %s", model_id, event.get("message"))
                    raise LoadFailed(f"model {ref.name!r} could not be loaded")
        raise EngineFailed("transformers serve ended the load without an answer")

    def view(self, ref: ModelRef) -> Path:
        """A directory transformers loads as ``ref.base`` with the adapter ``ref.path``
        attached (built once per adapter, atomically, in the worker's cache)."""
        assert ref.base is not None
        out = self.cache_dir / "adapters" / _digest(ref.path, ref.base)
        if out.is_dir():
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        base, adapter = Path(ref.base), Path(ref.path)
        for item in base.iterdir():
            if item.is_file() and not item.name.startswith(_ADAPTER_FILES):
                (tmp / item.name).symlink_to(item.resolve())
        for item in adapter.iterdir():
            if item.is_file() and item.name.startswith(_ADAPTER_FILES):
                if item.name != "adapter_config.json":
                    with contextlib.suppress(FileExistsError):
                        (tmp / item.name).symlink_to(item.resolve())
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base.resolve())
        (tmp / "adapter_config.json").write_text(json.dumps(config))
        try:
            tmp.rename(out)
        except OSError:  # another request built it first
            shutil.rmtree(tmp, ignore_errors=True)
        return out


@dataclass
class _VllmServer:
    base: str
    proc: EngineProcess
    served: str
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # lora name -> path
    used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    starting: asyncio.Future = field(init=False)  # its health check: every caller awaits it
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one adapter change at a time


class VllmEngine(Engine):
    kind = "vllm"
    native = frozenset(
        {
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "tools",
            "tool_choice",
            "n",
            "logprobs",
            "top_logprobs",
            "presence_penalty",
            "frequency_penalty",
            "response_format",
            "logit_bias",
            "echo",
            "best_of",
        }
    )

    def __init__(
        self,
        *,
        command: str,
        idle_seconds: float,
        log_dir: Path,
        start_timeout: float,
        max_engines: int = 1,
        max_loras: int = 4,
        max_lora_rank: int = 64,
        gpu_budget: float = 0.9,
        gpus: str | None = None,
        extra_args: list[str] | None = None,
    ):
        super().__init__(idle_seconds=idle_seconds, log_dir=log_dir)
        self.command, self.start_timeout = command.split(), start_timeout
        self.max_engines, self.max_loras, self.max_lora_rank = max_engines, max_loras, max_lora_rank
        self.gpu_budget, self.gpus, self.extra_args = gpu_budget, gpus, extra_args or []
        self.servers: OrderedDict[str, _VllmServer] = OrderedDict()  # base dir -> server
        self._lock = asyncio.Lock()

    def processes(self) -> list[EngineProcess]:
        return [s.proc for s in self.servers.values()]

    async def start(self) -> None:  # servers start with the first request for their base
        return None

    def _argv(self, base: str, served: str, port: int) -> list[str]:
        share = self.gpu_budget / self.max_engines
        return [
            *self.command,
            "serve",
            base,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served,
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--gpu-memory-utilization",
            f"{share:.3f}",
            *self.extra_args,
        ]

    async def _server(self, base: str) -> _VllmServer:
        async with self._lock:
            server = self.servers.get(base)
            if server is not None and server.proc.alive():
                self.servers.move_to_end(base)
            else:
                if server is not None:  # died: start it again
                    self._drop(base)
                server = await self._start(base)
        try:  # a server still starting is not ready for anyone
            await asyncio.shield(server.starting)
        except BaseException:
            async with self._lock:
                if self.servers.get(base) is server:
                    self._drop(base)
            await asyncio.to_thread(server.proc.stop)
            raise
        return server

    async def _start(self, base: str) -> _VllmServer:
        """A server for ``base``, started (its caller holds ``_lock``)."""
        while len(self.servers) >= self.max_engines:
            idle = [b for b, s in self.servers.items() if s.in_flight == 0]
            if not idle:
                raise TimeoutError("every vLLM server is busy; none can make room")
            log.info("stopping the vLLM server of %s (least recently used)", idle[0])
            old = self._drop(idle[0])
            await asyncio.to_thread(old.proc.stop)
        port = free_port()
        served = "m-" + _digest(base)
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        proc = EngineProcess(
            f"vllm-{served}",
            self._argv(base, served, port),
            port,
            env,
            self.log_dir / f"vllm-{served}.log",
            start_timeout=self.start_timeout,
        )
        server = _VllmServer(base, proc, served)
        self.servers[base] = server
        await asyncio.to_thread(proc.start)  # off the loop: a fork may wait
        server.starting = asyncio.ensure_future(proc.wait_ready(self.client))
        server.starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        return server

    def _drop(self, base: str) -> _VllmServer:
        server = self.servers.pop(base)
        keys = [base, *server.adapters.values()]
        self.forget(keys)
        return server

    async def _load(self, ref: ModelRef) -> Target:
        base = ref.base or ref.path
        server = await self._server(base)
        server.used = time.monotonic()
        if not ref.adapter:
            return Target(server.proc.url, server.served, server.proc)
        name = "a-" + _digest(ref.path)
        async with server.lora_lock:  # concurrent loads would overrun max_loras
            if name in server.adapters:
                server.adapters.move_to_end(name)
                return Target(server.proc.url, name, server.proc)
            try:
                while len(server.adapters) >= self.max_loras:
                    old, path = server.adapters.popitem(last=False)
                    self.forget([path])
                    await self.client.post(
                        server.proc.url + "/v1/unload_lora_adapter", json={"lora_name": old}
                    )
                resp = await self.client.post(
                    server.proc.url + "/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": ref.path},
                )
            except httpx.HTTPError as exc:  # the server went down under us
                raise EngineFailed(f"the vLLM server of {base} failed: {exc!r}") from None
            if resp.status_code != 200:
                log.warning("vLLM refused adapter %s: %s", ref.path, resp.text[:500])
                raise LoadFailed(f"model {ref.name!r} could not be loaded")
            server.adapters[name] = ref.path
        return Target(server.proc.url, name, server.proc)

    def warm_target(self, ref: ModelRef) -> Target | None:
        target = super().warm_target(ref)
        if target is not None and (server := self.server_of(target)) is not None:
            # a use: its server and its adapter become the most recently used
            server.used = time.monotonic()
            self.servers.move_to_end(server.base)
            if target.model in server.adapters:
                server.adapters.move_to_end(target.model)
        return target

    def server_of(self, target: Target) -> _VllmServer | None:
        return next((s for s in self.servers.values() if s.proc is target.engine), None)

    async def check(self) -> None:
        now = time.monotonic()
        async with self._lock:
            for base, server in list(self.servers.items()):
                if not server.proc.alive():
                    log.warning("the vLLM server of %s died; it starts again on demand", base)
                    self._drop(base)
                elif server.in_flight == 0 and now - server.used > self.idle_seconds:
                    log.info("stopping the idle vLLM server of %s", base)
                    self._drop(base)
                    await asyncio.to_thread(server.proc.stop)
