"""The inference worker's HTTP front: what the API proxies chat and completion requests to.

Each request names its model in the ``X-Posttrain-Model`` header (the API resolved and
authorised it; the body's ``model`` is ignored). The front refuses parameters the engine
cannot honour, makes the model ready (``engines``), checks the prompt against the
model's context on engines that do not (``transformers serve``), sends the sub-requests
(``shapes``) and streams the engine's events back as they come, rewritten to OpenAI's
shapes. An engine that fails mid-request gives an OpenAI 5xx and is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from workers.inference import shapes
from workers.inference.engines import Engine, LoadFailed, ModelRef, Target
from workers.inference.process import EngineFailed

log = logging.getLogger(__name__)

MODEL_HEADER = "x-posttrain-model"


class Refused(Exception):
    def __init__(self, status: int, body: dict, headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def refused(
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    type: str = "invalid_request_error",
    retry_after: int | None = None,
) -> Refused:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Refused(
        status, shapes.error(status, message, type=type, code=code, param=param), headers
    )


class Limits:
    """Prompt length against the model's context, where the engine does not check it.

    The tokenizer and chat template are the checkpoint's own (loaded once per model, in
    a thread); the context is ``max_position_embeddings`` of its ``config.json``."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._tok: dict[str, tuple[Any, int | None]] = {}
        self._lock = asyncio.Lock()

    async def _tokenizer(self, path: str) -> tuple[Any, int | None]:
        async with self._lock:
            if path not in self._tok:
                self._tok[path] = await asyncio.to_thread(_load_tokenizer, path)
            return self._tok[path]

    async def apply(self, body: dict, kind: str, target: Target) -> dict:
        """``body`` with ``max_tokens`` set to what fits; ``Refused`` when nothing does.

        A prompt whose text, with room for its template's markers, is shorter in UTF-8
        bytes than what is left of the context once ``max_tokens`` is taken, fits without
        being tokenized: the engines' tokenizers never make more tokens of a text than it
        has bytes (byte-level BPE, or byte fallback). Without ``max_tokens``, a reply may
        use the context that bound leaves (up to the server's bound)."""
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
            # OpenAI's newer name: the same bound (else the context's rest would be set)
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        tokenizer, context = await self._tokenizer(target.model)
        asked = body.get("max_tokens")
        if context is not None:
            bound = _byte_bound(body, kind)
            if asked is not None and bound + int(asked) <= context:
                return body
            if asked is None and bound < context:  # the rest, less the bound's slack
                return {**body, "max_tokens": min(self.max_tokens, context - bound)}
        if kind == "chat":
            try:
                prompt = await asyncio.to_thread(_chat_tokens, tokenizer, body)
            except Exception as exc:  # the model's template refused the messages
                raise refused(
                    400,
                    f"messages: the model's chat template cannot render them ({exc})",
                    code="invalid_messages",
                    param="messages",
                ) from None
            param = "messages"
        else:
            prompt = len(tokenizer(body.get("prompt") or "")["input_ids"])
            param = "prompt"
        if context is None:
            return body
        if prompt >= context or (asked is not None and prompt + int(asked) > context):
            wanted = f"{prompt} in the {param}" + (
                f" and {asked} to generate" if asked is not None else ""
            )
            raise refused(
                400,
                f"This model's maximum context length is {context} tokens; the request "
                f"needs {wanted}.",
                code="context_length_exceeded",
                param=param if prompt >= context else "max_tokens",
            )
        if asked is None:
            body = {**body, "max_tokens": min(self.max_tokens, context - prompt)}
        return body


def _byte_bound(body: dict, kind: str) -> int:
    """An upper bound of the prompt's tokens: its text's UTF-8 bytes, plus 32 per message
    for the chat template's role markers and separators, plus 64 for the template's
    framing (generation prompt, a system preamble)."""
    if kind != "chat":
        return len(str(body.get("prompt") or "").encode()) + 64
    total = 64 + len(json.dumps(body.get("tools") or "").encode())
    for m in body.get("messages") or []:
        total += 32 + len(json.dumps(m.get("content") or "", ensure_ascii=False).encode())
    return total


def _load_tokenizer(path: str) -> tuple[Any, int | None]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    context = None
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(path) / "config.json").read_text())
        context = config.get("max_position_embeddings") or config.get("max_seq_len")
    return tokenizer, int(context) if context else None


def _chat_tokens(tokenizer: Any, body: dict) -> int:
    messages = []
    for m in body.get("messages") or []:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        messages.append(m)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, tools=body.get("tools")
    )
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def create_front(
    engine: Engine,
    *,
    load_wait: float,
    max_tokens: int,
    check_seconds: float = 2.0,
    token: str | None = None,
) -> FastAPI:
    limits = Limits(max_tokens)
    wake = asyncio.Event()

    async def checker() -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), check_seconds)
            wake.clear()
            try:
                await engine.check()
            except Exception:
                log.exception("engine check failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        task = asyncio.create_task(checker())
        try:
            yield
        finally:
            task.cancel()
            await engine.stop()

    app = FastAPI(
        title="posttrain inference worker",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/health")
    async def health() -> JSONResponse:
        up = [p.alive() for p in engine.processes()]
        return JSONResponse(
            {"status": "ok", "engine": engine.kind, "engines_alive": up, "models": engine.loaded()}
        )

    async def handle(request: Request, kind: str) -> Response:
        try:
            if token and request.headers.get("authorization") != f"Bearer {token}":
                raise refused(
                    401,
                    "missing or wrong inference token",
                    code="invalid_api_key",
                    type="authentication_error",
                )
            try:
                ref = ModelRef.from_header(request.headers[MODEL_HEADER])
                body = await request.json()
                assert isinstance(body, dict)
            except (KeyError, ValueError, AssertionError):
                raise refused(
                    400,
                    "the request names no model or is not a JSON object",
                    code="invalid_request",
                ) from None
            return await answer(ref, body, kind)
        except Refused as r:
            return r.response()

    async def ready(ref: ModelRef) -> Target:
        target = engine.warm_target(ref)
        if target is not None:
            return target
        try:
            return await engine.ensure(ref, wait=load_wait)
        except TimeoutError:
            raise refused(
                503,
                f"model {ref.name!r} is loading; try again shortly",
                code="model_loading",
                type="server_error",
                retry_after=5,
            ) from None
        except LoadFailed as exc:
            raise refused(
                500, str(exc), code="model_load_failed", type="server_error", param="model"
            ) from None
        except EngineFailed:
            wake.set()
            raise refused(
                503,
                "the inference engine is starting; try again shortly",
                code="engine_unavailable",
                type="server_error",
                retry_after=5,
            ) from None

    async def answer(ref: ModelRef, body: dict, kind: str) -> Response:
        bad = shapes.unsupported(body, engine.native)
        if bad:
            raise refused(
                400,
                f"{', '.join(bad)}: not supported by this server's {engine.kind} engine",
                code="unsupported_parameter",
                param=bad[0],
            )
        target = await ready(ref)
        if not engine.checks_context:
            body = await limits.apply(body, kind, target)
        subs = shapes.sub_requests(body, kind, target.model, engine.native)
        result = shapes.Answer(kind, ref.name, body, trim_stops=not engine.cuts_stop_text)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        server = engine.server_of(target)
        if server is not None:
            server.in_flight += 1
        try:
            if body.get("stream"):
                return StreamingResponse(
                    stream(target, path, subs, result, server),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            parts = await asyncio.gather(*(once(target, path, sub) for sub in subs))
            return JSONResponse(result.merge(zip(subs, parts, strict=True)))
        finally:
            if server is not None and not body.get("stream"):
                server.in_flight -= 1

    def engine_failed() -> Refused:
        engine.engine_down()
        wake.set()
        return refused(
            503,
            "the inference engine failed while answering; it is being restarted, try again shortly",
            code="engine_error",
            type="server_error",
            retry_after=5,
        )

    async def once(target: Target, path: str, sub: dict) -> dict:
        try:
            r = await engine.client.post(target.url + path, json=shapes.engine_body(sub))
        except httpx.HTTPError:
            raise engine_failed() from None
        try:
            payload = r.json()
        except ValueError:
            payload = None
        if r.status_code != 200 or not isinstance(payload, dict):
            if r.status_code >= 500:
                log.warning("engine answered %s: %s", r.status_code, r.text[:500])
            status, err = shapes.engine_error(
                r.status_code if r.status_code != 200 else 500, payload
            )
            raise Refused(status, err)
        return payload

    async def stream(
        target: Target, path: str, subs: list[dict], result: shapes.Answer, server: Any
    ) -> AsyncIterator[bytes]:
        """The engine's events as the caller's, one write per read from the engine: what
        arrived together leaves together (a send per token costs more than the token)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(sub: dict) -> None:
            trimmers: dict[int, shapes.StopTrimmer] = {}
            try:
                async with engine.client.stream(
                    "POST", target.url + path, json=shapes.engine_body(sub)
                ) as r:
                    if r.status_code != 200:
                        raw = await r.aread()
                        try:
                            payload = json.loads(raw)
                        except ValueError:
                            payload = None
                        await queue.put(("error", shapes.engine_error(r.status_code, payload)[1]))
                        return
                    buf = b""
                    async for chunk in r.aiter_raw():
                        buf += chunk.replace(b"\r\n", b"\n")
                        *complete, buf = buf.split(b"\n\n")
                        out = []
                        for event in complete:
                            data = b"".join(
                                line[5:].strip()
                                for line in event.split(b"\n")
                                if line.startswith(b"data:")
                            )
                            if not data or data == b"[DONE]":
                                continue
                            parsed = json.loads(data)
                            if "error" in parsed:
                                log.warning("engine stream error: %s", parsed["error"])
                                if out:
                                    await queue.put(("data", b"".join(out)))
                                failed = shapes.error(
                                    500,
                                    "the inference engine failed while generating",
                                    type="server_error",
                                    code="engine_error",
                                )
                                await queue.put(("error", failed))
                                return
                            rewritten = result.rewrite_chunk(sub, parsed, trimmers)
                            if rewritten:
                                out.append(rewritten)
                        if out:
                            await queue.put(("data", b"".join(out)))
            except httpx.HTTPError:
                await queue.put(("error", engine_failed().body))
            finally:
                await queue.put(("end", None))

        tasks = [asyncio.create_task(pump(sub)) for sub in subs]
        try:
            ended = 0
            while ended < len(tasks):
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                out = []
                for what, item in items:
                    if what == "end":
                        ended += 1
                    elif what == "data":
                        out.append(item)
                    else:
                        yield b"".join(out) + shapes.sse(item) + shapes.DONE
                        return
                if out:
                    yield b"".join(out)
            yield result.usage_chunk() + shapes.DONE
        finally:
            for task in tasks:
                task.cancel()
            if server is not None:
                server.in_flight -= 1

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completion")

    return app
