"""A stand-in of ``vllm serve`` that really samples, for asynchronous GRPO on CPU.

Run as ``python -m tests.workers.vllm_rollouts serve MODEL_DIR --host H --port P
[--served-model-name NAME] [--max-model-len N] [--enable-lora --max-loras K
--max-lora-rank R] [other vLLM flags, ignored]``, as ``workers.vllm_server`` runs
``vllm serve``. Unlike ``tests/workers/fake_vllm.py`` (words from a hash), it loads the
checkpoint with transformers and samples from it in fp32, so the log-probabilities it
returns are the model's: TRL's ``AsyncGRPOTrainer`` computes its importance ratio
against them. It answers the routes TRL's async rollout worker (aiohttp, in a spawned
process) and its ``VLLMClient`` call, in vLLM's shapes:

* ``GET /health`` (200, empty), ``GET /get_world_size`` (``{"world_size": 1}``);
* ``GET /v1/models``: the served name with its ``max_model_len`` (and loaded adapters);
* ``GET /server_info?config_format=json``: ``{"vllm_config": {...}}`` with
  ``model_config.dtype`` (``"torch.float32"``), ``lora_config`` (``None`` without
  ``--enable-lora``, else ``max_lora_rank``/``max_loras``) and ``parallel_config``;
* ``POST /v1/completions`` with a token-id ``prompt``, ``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``seed``, ``n``, ``logprobs: 0`` and ``return_token_ids``:
  ``choices[i].token_ids`` (an end-of-sequence token that stopped it included, as vLLM
  does) and ``choices[i].logprobs.token_logprobs``, the sampled tokens' log-probabilities
  after temperature, top-k and top-p (vLLM's ``--logprobs-mode processed_logprobs``);
  a 404 for an unknown ``model``, a 400 for a prompt plus ``max_tokens`` beyond
  ``max_model_len``;
* ``POST /pause?mode=keep`` / ``POST /resume``: pausing waits for the requests already
  admitted to finish and holds new ones until resume (vLLM's ``keep`` freezes them
  mid-decode instead: either way no token is sampled from half-updated weights);
* ``POST /start_weight_update``, ``/update_weights`` ``{"update_info": {"names",
  "dtype_names", "shapes", "path"}}``, ``/finish_weight_update``: the weights are read
  from the safetensors file at ``path`` (``trainers.algorithms.grpo_async.transfer``;
  vLLM receives them over NCCL instead), every name must be a parameter of the model
  with that shape (else 400), and the update counts as one policy version;
* with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``: ``POST /v1/load_lora_adapter``
  ``{"lora_name", "lora_path"}`` / ``/v1/unload_lora_adapter`` ``{"lora_name"}``; a
  loaded adapter is a model name requests can select (PEFT applies it).

Each start, weight update and completion request is appended as one JSON line to
``$FAKE_VLLM_LOG`` when set (``{"event": "start"|"weights"|"completion"|"lora", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def _log(event: dict) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({**event, "pid": os.getpid(), "time": time.time()}) + "\n")


def _error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class Engine:
    """One model, one generation at a time, a gate that pause/resume close and open."""

    def __init__(self, model_dir: str, served: str, max_model_len: int | None, lora: dict | None):
        torch.set_num_threads(1)
        self.model_dir = model_dir
        self.served = served
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.config.get_text_config()
        self.max_model_len = max_model_len or int(config.max_position_embeddings)
        eos = self.model.generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.lora = lora
        self.adapters: dict[str, str] = {}  # name -> path
        self.peft = None  # a PeftModel over self.model once an adapter is loaded
        self.lock = threading.Lock()
        self.gate = threading.Condition()
        self.paused = False
        self.busy = 0
        self.version = 0
        self.pending: dict | None = None

    # ------------------------------------------------------------------ pause / resume
    def admit(self) -> None:
        with self.gate:
            while self.paused:
                self.gate.wait()
            self.busy += 1

    def leave(self) -> None:
        with self.gate:
            self.busy -= 1
            self.gate.notify_all()

    def pause(self) -> None:
        with self.gate:
            self.paused = True
            while self.busy:
                self.gate.wait()

    def resume(self) -> None:
        with self.gate:
            self.paused = False
            self.gate.notify_all()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model, prompt: list[int], body: dict, seed: int) -> dict:
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        top_k = int(body.get("top_k") or 0)
        max_tokens = int(body.get("max_tokens") or 16)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.tensor([prompt])
        past, out, logps, finish = None, [], [], "length"
        for _ in range(max_tokens):
            step = model(
                input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True
            )
            past = step.past_key_values
            logits = step.logits[0, -1].float()
            if temperature > 0:
                logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                order = torch.argsort(logits, descending=True)
                probs = logits[order].softmax(-1)
                drop = probs.cumsum(-1) - probs > top_p
                logits[order[drop]] = float("-inf")
            logp = logits.log_softmax(-1)
            if temperature > 0:
                token = int(torch.multinomial(logp.exp(), 1, generator=gen))
            else:
                token = int(logp.argmax())
            out.append(token)
            logps.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token in self.eos:
                finish = "stop"
                break
        return {"token_ids": out, "token_logprobs": logps, "finish_reason": finish}

    def complete(self, body: dict) -> JSONResponse:
        name = body.get("model")
        if name != self.served and name not in self.adapters:
            return _error(404, f"The model `{name}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return _error(400, "this stand-in takes token-id prompts only")
        max_tokens = int(body.get("max_tokens") or 16)
        if len(prompt) + max_tokens > self.max_model_len:
            return _error(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the "
                f"messages, {max_tokens} in the completion).",
            )
        seed = int(body.get("seed") if body.get("seed") is not None else time.time_ns())
        self.admit()
        try:
            with self.lock:
                if name == self.served and self.peft is not None:
                    with self.peft.disable_adapter():
                        results = [
                            self.sample(self.peft, prompt, body, seed + i)
                            for i in range(body.get("n", 1))
                        ]
                else:
                    model = self.model if name == self.served else self._select(name)
                    results = [
                        self.sample(model, prompt, body, seed + i) for i in range(body.get("n", 1))
                    ]
                version = self.version
        finally:
            self.leave()
        choices = []
        for i, r in enumerate(results):
            choice = {
                "index": i,
                "text": "",
                "finish_reason": r["finish_reason"],
                "stop_reason": None,
                "token_ids": r["token_ids"] if body.get("return_token_ids") else None,
                "prompt_token_ids": prompt if body.get("return_token_ids") else None,
                "logprobs": None,
            }
            if body.get("logprobs") is not None:
                choice["logprobs"] = {
                    "tokens": [f"token_id:{t}" for t in r["token_ids"]],
                    "token_logprobs": r["token_logprobs"],
                    "top_logprobs": [{} for _ in r["token_ids"]],
                    "text_offset": [0 for _ in r["token_ids"]],
                }
            choices.append(choice)
        generated = sum(len(r["token_ids"]) for r in results)
        _log({"event": "completion", "model": name, "version": version, "tokens": generated})
        return JSONResponse(
            {
                "id": f"cmpl-{time.time_ns()}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": generated,
                    "total_tokens": len(prompt) + generated,
                },
            }
        )

    def _select(self, name: str):
        self.peft.set_adapter(name)
        return self.peft

    # ------------------------------------------------------------------ weights
    def update(self, info: dict) -> JSONResponse:
        if self.pending is None:
            return _error(400, "update_weights before start_weight_update")
        path = info.get("path")
        if not path or not Path(path).is_file():
            return _error(
                400, "this stand-in receives weights as a safetensors file: update_info.path"
            )
        tensors = load_file(path)
        if sorted(tensors) != sorted(info.get("names", [])):
            return _error(400, "update_info.names does not list the file's tensors")
        params = dict(self.model.named_parameters())
        for name, tensor in tensors.items():
            if name not in params:
                return _error(400, f"unknown parameter {name}")
            if tuple(params[name].shape) != tuple(tensor.shape):
                return _error(
                    400, f"{name}: shape {list(tensor.shape)} != {list(params[name].shape)}"
                )
        self.pending.update(tensors)
        return JSONResponse({})

    def finish(self) -> None:
        tensors, self.pending = self.pending or {}, None
        if not tensors:
            return
        with self.lock, torch.no_grad():
            params = dict(self.model.named_parameters())
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
            self.version += 1
        _log({"event": "weights", "version": self.version, "tensors": len(tensors)})

    # ------------------------------------------------------------------ LoRA
    def load_adapter(self, name: str, path: str) -> JSONResponse:
        if self.lora is None:
            return _error(400, "LoRA is not enabled: start the server with --enable-lora")
        if not name or not path:
            return _error(400, "both lora_name and lora_path are required")
        if name in self.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            return _error(404, f"No adapter found for {path}", "NotFoundError")
        rank = int(json.loads(config.read_text()).get("r", 0))
        if rank > self.lora["max_lora_rank"]:
            return _error(
                400, f"LoRA rank {rank} is greater than max_lora_rank {self.lora['max_lora_rank']}"
            )
        if len(self.adapters) >= self.lora["max_loras"]:
            return _error(
                400, f"{self.lora['max_loras']} adapters are loaded already (--max-loras)"
            )
        from peft import PeftModel

        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.peft.load_adapter(path, adapter_name=name)
            self.adapters[name] = path
        _log({"event": "lora", "action": "load", "name": name})
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    def unload_adapter(self, name: str) -> Response:
        if name not in self.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        with self.lock:
            self.peft.delete_adapter(name)
            del self.adapters[name]
        _log({"event": "lora", "action": "unload", "name": name})
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI()
    runtime_lora = (os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") or "").lower() in (
        "1",
        "true",
    )

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/get_world_size")
    def world_size():
        return {"world_size": 1}

    @app.get("/v1/models")
    def models():
        data = [
            {
                "id": engine.served,
                "object": "model",
                "root": engine.model_dir,
                "parent": None,
                "max_model_len": engine.max_model_len,
            }
        ]
        data += [
            {
                "id": n,
                "object": "model",
                "root": p,
                "parent": engine.served,
                "max_model_len": engine.max_model_len,
            }
            for n, p in engine.adapters.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/server_info")
    def server_info():
        return {
            "vllm_config": {
                "model_config": {
                    "model": engine.model_dir,
                    "dtype": "torch.float32",
                    "max_model_len": engine.max_model_len,
                },
                "lora_config": engine.lora,
                "parallel_config": {
                    "data_parallel_size": 1,
                    "tensor_parallel_size": 1,
                    "pipeline_parallel_size": 1,
                },
            }
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        return await _in_thread(engine.complete, body)

    @app.post("/pause")
    async def pause(mode: str = "abort"):
        await _in_thread(engine.pause)
        return JSONResponse({})

    @app.post("/resume")
    def resume():
        engine.resume()
        return JSONResponse({})

    @app.post("/start_weight_update")
    def start_update():
        engine.pending = {}
        return JSONResponse({})

    @app.post("/update_weights")
    async def update(request: Request):
        body = await request.json()
        return await _in_thread(engine.update, body.get("update_info") or {})

    @app.post("/finish_weight_update")
    async def finish():
        await _in_thread(engine.finish)
        return JSONResponse({})

    if runtime_lora:

        @app.post("/v1/load_lora_adapter")
        async def load_lora(request: Request):
            body = await request.json()
            return await _in_thread(
                engine.load_adapter, body.get("lora_name"), body.get("lora_path")
            )

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora(request: Request):
            body = await request.json()
            return await _in_thread(engine.unload_adapter, body.get("lora_name"))

    return app


async def _in_thread(fn, *args):
    import anyio

    return await anyio.to_thread.run_sync(fn, *args)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name")
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--enable-lora", action="store_true")
    serve.add_argument("--max-loras", type=int, default=1)
    serve.add_argument("--max-lora-rank", type=int, default=16)
    args, _ignored = parser.parse_known_args(argv)
    lora = (
        {"max_lora_rank": args.max_lora_rank, "max_loras": args.max_loras}
        if args.enable_lora
        else None
    )
    engine = Engine(args.model, args.served_model_name or args.model, args.max_model_len, lora)
    _log({"event": "start", "argv": argv})
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
