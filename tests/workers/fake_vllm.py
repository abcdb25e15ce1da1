"""A stand-in of vLLM's OpenAI-compatible server for the routes posttrain uses.

Run as ``python -m tests.workers.fake_vllm serve MODEL_DIR --host H --port P
--served-model-name NAME [--enable-lora] [--max-loras K] [--max-lora-rank R]
[--gpu-memory-utilization F] [--max-model-len N] [other flags, ignored]``, as the
inference worker runs ``vllm serve``. It serves, the way vLLM does:

* ``GET /health``: 200 with an empty body, once the server is up (it takes a moment to
  start, as vLLM does, before the port opens);
* ``GET /v1/models``: the served name (its ``root`` the model directory) and the LoRA
  adapters loaded (their ``parent`` the served name);
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST
  /v1/unload_lora_adapter`` ``{"lora_name"}``: only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
  is ``1``/``true`` in its environment (otherwise the routes do not exist: 404, as in
  vLLM). Loading answers 200 with vLLM's plain-text success line, or vLLM's error object
  ``{"error": {"message", "type", "param", "code"}}``: 400 when LoRA is not enabled
  (no ``--enable-lora``), a name is already loaded, a name or path is missing, the
  adapter's rank is above ``--max-lora-rank``, or ``--max-loras`` adapters are already
  loaded (vLLM itself would keep more in its CPU cache; refusing makes a client that
  does not unload visible); 404 when the path holds no ``adapter_config.json``.
  Unloading an unknown name is a 404, a missing name a 400;
* ``POST /v1/chat/completions`` and ``POST /v1/completions``: a 404 ``NotFoundError``
  (``param: "model"``) for a ``model`` that is neither the served name nor a loaded
  adapter, a 400 for a prompt plus ``max_tokens`` beyond the model's context
  (``max_position_embeddings`` of its ``config.json``, or ``--max-model-len``); otherwise
  a deterministic answer: words drawn from a hash of the weights (the model directory,
  or the adapter's path), the prompt, the choice's index, ``seed`` and ``temperature``,
  so an adapter's answer differs from its base's and ``temperature: 0`` repeats itself.
  ``n`` choices, ``max_tokens`` words (``finish_reason: "length"`` when cut), ``stop``
  strings (cut, ``stop_reason`` set), ``logprobs``/``top_logprobs`` (chat) or
  ``logprobs: k`` (completions) in vLLM's shapes, ``usage`` on every whole answer; with
  ``stream``, SSE chunks (a role chunk first in chat), a last chunk with no choices and
  the ``usage`` when ``stream_options.include_usage``, then ``data: [DONE]``.

A word is a token; an adapter takes ``FAKE_VLLM_LOAD_DELAY`` seconds (0.2) to load.
Every start and request is appended as one JSON line to the file named by
``FAKE_VLLM_LOG`` (when set): ``{"event": "start", "pid", "argv", "env"}`` with
the argv after the module and the LoRA and CUDA variables of its environment; ``{"event":
"request", "pid", "route", "model", "body", "status"}`` per request; ``{"event": "stop"}``
when it shuts down (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

STARTUP_DELAY = 0.3  # seconds before the port opens
LOAD_DELAY = float(os.environ.get("FAKE_VLLM_LOAD_DELAY", "0.2"))  # seconds an adapter loads
TOKEN_DELAY = 0.002  # seconds between streamed chunks
DEFAULT_WORDS = 12  # what a model "wants" to say at most when max_tokens is not given
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs

VOCAB = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber "
    "birch cedar dune ember fern grove harbor island jade kelp lagoon meadow nectar orchid "
    "pebble quartz river stone thistle umber valley willow yarrow zephyr"
).split()


def _truthy(value: str | None) -> bool:
    # vLLM's envs: VLLM_ALLOW_RUNTIME_LORA_UPDATING in ("1", "true"), case-insensitive
    return (value or "0").strip().lower() in ("1", "true")


def _h(*parts: Any) -> int:
    raw = "\0".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def _record(entry: dict) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "time": time.time(), **entry}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict:
    """vLLM's ErrorResponse (``{"error": ErrorInfo}``; ``code`` is the HTTP status)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--enable-lora", action="store_true")
    serve.add_argument("--max-loras", type=int, default=1)
    serve.add_argument("--max-lora-rank", type=int, default=16)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--max-model-len", type=int, default=None)
    return parser.parse_known_args(argv)


class Model:
    """The server's state: its base, its adapters, and how it "generates"."""

    def __init__(self, args: argparse.Namespace):
        self.dir = args.model
        self.names = args.served_model_name or [args.model]
        self.enable_lora, self.max_loras = args.enable_lora, args.max_loras
        self.max_lora_rank = args.max_lora_rank
        config = json.loads((Path(args.model) / "config.json").read_text())
        self.max_model_len = int(
            args.max_model_len or config.get("max_position_embeddings") or 2048
        )
        self.adapters: OrderedDict[str, str] = OrderedDict()  # lora name -> path
        self.locks: dict[str, asyncio.Lock] = {}
        self.created = int(time.time())

    # ---- models
    def weights(self, model: str | None) -> str | None:
        """What answers for ``model`` (None: no such model)."""
        if not model or model in self.names:
            return self.dir
        return self.adapters.get(model)

    def cards(self) -> dict:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.dir,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [],
            }
            for name in self.names
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": path,
                "parent": self.names[0],
                "max_model_len": None,
                "permission": [],
            }
            for name, path in self.adapters.items()
        ]
        return {"object": "list", "data": data}

    # ---- LoRA
    async def load(self, body: dict) -> tuple[int, Any]:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return 400, error_body(
                "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400
            )
        lock = self.locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.adapters and not body.get("load_inplace"):
                return 400, error_body(
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                    400,
                )
            if not self.enable_lora:
                return 400, error_body("LoRA is not enabled.", "BadRequestError", 400)
            await asyncio.sleep(LOAD_DELAY)
            config_path = Path(path) / "adapter_config.json"
            if not config_path.is_file():
                return 404, error_body(
                    f"Loading lora {name} failed: No adapter found for {path}",
                    "NotFoundError",
                    404,
                )
            rank = int(json.loads(config_path.read_text()).get("r") or 0)
            if rank > self.max_lora_rank:
                return 400, error_body(
                    f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.",
                    "BadRequestError",
                    400,
                )
            if name not in self.adapters and len(self.adapters) >= self.max_loras:
                return 400, error_body(
                    f"fake vLLM: {self.max_loras} LoRA adapters (--max-loras) are already "
                    f"loaded: {', '.join(self.adapters)}",
                    "BadRequestError",
                    400,
                )
            self.adapters[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, body: dict) -> tuple[int, Any]:
        name = body.get("lora_name")
        if not name:
            return 400, error_body(
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                "InvalidUserInput",
                400,
            )
        async with self.locks.setdefault(name, asyncio.Lock()):
            if name not in self.adapters:
                return 404, error_body(
                    f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404
                )
            del self.adapters[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    # ---- generation
    def generate(
        self, weights: str, prompt: str, choice: int, body: dict, max_tokens: int | None
    ) -> dict:
        """One choice: its tokens, their logprobs and why it ended."""
        temperature = body.get("temperature")
        greedy = temperature is not None and float(temperature) == 0
        salt = ("greedy",) if greedy else (choice, body.get("seed"), temperature)
        wants = 3 + _h(weights, prompt, *salt, "len") % (DEFAULT_WORDS - 2)
        count = wants if max_tokens is None else min(wants, max_tokens)
        tokens, logprobs = [], []
        for i in range(count):
            word = VOCAB[_h(weights, prompt, *salt, i) % len(VOCAB)]
            tokens.append(word if i == 0 else " " + word)
            logprobs.append(-round((_h(weights, prompt, *salt, i, "lp") % 1000) / 400, 4))
        finish, stop_reason = ("length" if count < wants else "stop"), None
        text = "".join(tokens)
        stops = body.get("stop")
        stops = [stops] if isinstance(stops, str) else [s for s in stops or [] if s]
        cuts = [(text.find(s), s) for s in stops if s in text]
        if cuts:  # the text ends before the first stop string (vLLM leaves it out)
            at, stop_reason = min(cuts)
            kept, length = [], 0
            for token in tokens:
                if length + len(token) > at:
                    break
                kept.append(token)
                length += len(token)
            tail = text[length:at]
            if tail:
                kept.append(tail)
            tokens, logprobs = kept, logprobs[: len(kept)]
            finish = "stop"
        return {"tokens": tokens, "logprobs": logprobs, "finish": finish, "stop": stop_reason}

    def top(self, token: str, logprob: float, k: int) -> list[tuple[str, float]]:
        """The sampled token first, then ``k - 1`` other candidates, less likely."""
        out = [(token, logprob)]
        lead = " " if token.startswith(" ") else ""
        for j, word in enumerate(w for w in VOCAB if lead + w != token):
            if len(out) >= k:
                break
            out.append((lead + word, round(logprob - 1.0 - j * 0.5, 4)))
        return out


def chat_prompt(messages: list[dict]) -> str:
    lines = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        lines.append(f"{m.get('role')}: {content or ''}")
    return "\n".join(lines) + "\nassistant:"


def create_app(model: Model, lora_routes: bool) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        _record({"event": "stop"})

    app = FastAPI(lifespan=lifespan)

    def answer(route: str, body: Any, status: int, payload: Any) -> Response:
        _record(
            {
                "event": "request",
                "route": route,
                "model": body.get("model") if isinstance(body, dict) else None,
                "body": body,
                "status": status,
            }
        )
        if isinstance(payload, str):
            return PlainTextResponse(payload, status_code=status)
        if isinstance(payload, Response):
            return payload
        return JSONResponse(payload, status_code=status)

    async def read(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(model.cards())

    if lora_routes:

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await read(request)
            if not isinstance(body, dict):
                return answer("load_lora_adapter", body, 400, _invalid_json())
            status, payload = await model.load(body)
            return answer("load_lora_adapter", body, status, payload)

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            body = await read(request)
            if not isinstance(body, dict):
                return answer("unload_lora_adapter", body, 400, _invalid_json())
            status, payload = await model.unload(body)
            return answer("unload_lora_adapter", body, status, payload)

    async def complete(request: Request, kind: str) -> Response:
        route = "chat/completions" if kind == "chat" else "completions"
        body = await read(request)
        if not isinstance(body, dict):
            return answer(route, body, 400, _invalid_json())
        status, payload = generate(model, body, kind)
        return answer(route, body, status, payload)

    def generate(model: Model, body: dict, kind: str) -> tuple[int, Any]:
        name = body.get("model") or model.names[0]
        weights = model.weights(body.get("model"))
        if weights is None:
            return 404, error_body(
                f"The model `{name}` does not exist.", "NotFoundError", 404, param="model"
            )
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return 400, error_body("messages: Field required", "BadRequestError", 400)
            prompts = [chat_prompt(messages)]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                prompts = [prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompts = list(prompt)
            else:
                return 400, error_body("prompt: Field required", "BadRequestError", 400)
        n = body.get("n") or 1
        if not isinstance(n, int) or n < 1:
            return 400, error_body(f"n must be at least 1, got {n!r}.", "BadRequestError", 400)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return 400, error_body(
                f"max_tokens must be at least 1, got {max_tokens}.", "BadRequestError", 400
            )
        if kind == "chat":
            want_lp = bool(body.get("logprobs"))
            top_k = body.get("top_logprobs") or 0
            if top_k and not want_lp:
                return 400, error_body(
                    "when using `top_logprobs`, `logprobs` must be set to true.",
                    "BadRequestError",
                    400,
                )
        else:
            lp = body.get("logprobs")
            want_lp, top_k = lp is not None, lp or 0
        if top_k > MAX_LOGPROBS:
            return 400, error_body(
                f"Requested sample logprobs of {top_k}, which is greater than max allowed: "
                f"{MAX_LOGPROBS}",
                "BadRequestError",
                400,
            )
        prompt_tokens = [len(p.split()) for p in prompts]
        for count in prompt_tokens:
            if count + (max_tokens or 0) > model.max_model_len or count >= model.max_model_len:
                return 400, error_body(
                    f"This model's maximum context length is {model.max_model_len} tokens. "
                    f"However, you requested {count + (max_tokens or 0)} tokens ({count} in "
                    f"the messages, {max_tokens or 0} in the completion). Please reduce the "
                    "length of the messages or completion.",
                    "BadRequestError",
                    400,
                )
        outs = []  # (index, prompt index, generation)
        for p_index, prompt in enumerate(prompts):
            room = model.max_model_len - prompt_tokens[p_index]
            limit = max_tokens if max_tokens is not None else room
            for i in range(n):
                outs.append(
                    (p_index * n + i, p_index, model.generate(weights, prompt, i, body, limit))
                )
        usage = {
            "prompt_tokens": sum(prompt_tokens),
            "total_tokens": sum(prompt_tokens) + sum(len(g["tokens"]) for _, _, g in outs),
            "completion_tokens": sum(len(g["tokens"]) for _, _, g in outs),
            "prompt_tokens_details": None,
        }
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return 200, StreamingResponse(
                stream(model, kind, rid, created, name, outs, want_lp, top_k, usage, include_usage),
                media_type="text/event-stream",
            )
        choices = []
        for index, _, g in outs:
            text = "".join(g["tokens"])
            logprobs = (
                _logprobs(model, kind, g["tokens"], g["logprobs"], top_k) if want_lp else None
            )
            if kind == "chat":
                choices.append(
                    {
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "tool_calls": [],
                            "reasoning_content": None,
                        },
                        "logprobs": logprobs,
                        "finish_reason": g["finish"],
                        "stop_reason": g["stop"],
                    }
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": g["finish"],
                        "stop_reason": g["stop"],
                        "prompt_logprobs": None,
                    }
                )
        return 200, {
            "id": rid,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": name,
            "choices": choices,
            "usage": usage,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    async def stream(model, kind, rid, created, name, outs, want_lp, top_k, usage, include_usage):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices: list[dict], **extra: Any) -> bytes:
            data = {"id": rid, "object": obj, "created": created, "model": name}
            data.update(choices=choices, **extra)
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        if kind == "chat":
            for index, _, _ in outs:
                yield chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        longest = max(len(g["tokens"]) for _, _, g in outs)
        for t in range(max(longest, 1)):
            for index, _, g in outs:
                tokens = g["tokens"]
                if t >= max(len(tokens), 1):
                    continue
                last = t >= len(tokens) - 1
                piece = tokens[t] if t < len(tokens) else ""
                lp = (
                    _logprobs(model, kind, [piece], [g["logprobs"][t]], top_k)
                    if want_lp and t < len(tokens)
                    else None
                )
                finish = g["finish"] if last else None
                stop = g["stop"] if last else None
                if kind == "chat":
                    c = {"index": index, "delta": {"content": piece}, "logprobs": lp}
                else:
                    c = {"index": index, "text": piece, "logprobs": lp}
                c.update(finish_reason=finish, stop_reason=stop)
                yield chunk([c])
            await asyncio.sleep(TOKEN_DELAY)
        if include_usage:
            yield chunk([], usage=usage)
        yield b"data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    return app


def _invalid_json() -> dict:
    return error_body("The request body is not a JSON object.", "BadRequestError", 400)


def _logprobs(model: Model, kind: str, tokens: list[str], lps: list[float], k: int) -> dict:
    if kind == "chat":
        return {
            "content": [
                {
                    "token": tok,
                    "logprob": lp,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": p, "bytes": list(t.encode())}
                        for t, p in model.top(tok, lp, k)
                    ]
                    if k
                    else [],
                }
                for tok, lp in zip(tokens, lps, strict=True)
            ]
        }
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {
        "text_offset": offsets,
        "token_logprobs": lps,
        "tokens": tokens,
        "top_logprobs": [
            dict(model.top(tok, lp, max(k, 1))) for tok, lp in zip(tokens, lps, strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args, ignored = parse_args(sys.argv[1:] if argv is None else argv)
    _record(
        {
            "event": "start",
            "argv": sys.argv[1:] if argv is None else argv,
            "ignored": ignored,
            "env": {
                k: os.environ.get(k)
                for k in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "CUDA_VISIBLE_DEVICES")
            },
        }
    )
    time.sleep(STARTUP_DELAY)  # vLLM loads its weights before it listens
    try:
        model = Model(args)
    except (OSError, ValueError) as exc:
        print(f"fake vLLM: cannot load {args.model}: {exc}", file=sys.stderr)
        return 1
    lora_routes = _truthy(os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"))
    import uvicorn

    uvicorn.run(create_app(model, lora_routes), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
