"""Chat and completion requests: validated here, answered by an inference worker.

The API checks the request's shape and bounds, resolves ``model`` for the caller with
the same policy as job creation (``service.modelaccess``: a base model under a model
root, the caller's ``ft:`` model, one of its checkpoints by name or id; anything else,
another tenant's model included, is the same 404), picks a live inference worker of
``POSTTRAIN_INFERENCE_QUEUE`` from Redis (one that has the model loaded first) and
relays the worker's answer byte for byte as it arrives. No model is ever loaded here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service.auth import Tenant
from service.errors import APIError
from service.modelaccess import ModelRefused
from workers.inference.registry import live_workers, pick
from workers.store import JobNotFound

log = logging.getLogger("posttrain.api")

MODEL_HEADER = "X-Posttrain-Model"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Penalty = Annotated[float | None, Field(ge=-2, le=2)]


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=64)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def check_bounds(req: _Sampling, max_n: int, max_tokens: int) -> None:
    n = req.n or 1
    prompts = (
        len(req.prompt)
        if isinstance(req, CompletionRequest) and isinstance(req.prompt, list)
        else 1
    )
    if n * prompts > max_n:
        raise APIError(
            400,
            f"n: at most {max_n} choices per request (asked {n}"
            + (f" for each of {prompts} prompts" if prompts > 1 else "")
            + ")",
            param="n",
            code="invalid_value",
        )
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, field, None)
        if value is not None and value > max_tokens:
            raise APIError(
                400,
                f"{field}: at most {max_tokens} tokens per completion on this server "
                f"(asked {value})",
                param=field,
                code="invalid_value",
            )


def not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model '{name[:200]}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def resolve(request: Request, name: str, tenant: Tenant) -> dict:
    """The model header for the worker: caller's name, directory, and an adapter's base."""
    access = request.app.state.model_access
    try:
        resolved = access.resolve(name, tenant)
    except ModelRefused:
        raise not_found(name) from None
    if resolved.path is None:  # a hub id (POSTTRAIN_HUB_ACCESS): the engine loads it
        return {"name": name, "path": name, "base": None}
    path = Path(resolved.path)
    base = None
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        base = _adapter_base(request, path)
        if base is None:
            raise not_found(name)
    return {"name": name, "path": str(path), "base": base}


def _adapter_base(request: Request, path: Path) -> str | None:
    """The base model directory a LoRA checkpoint was trained on (its job's record)."""
    data_dir = Path(request.app.state.settings.data_dir).resolve()
    try:
        job_id = path.relative_to(data_dir / "jobs").parts[0]
        rec = request.app.state.jobs.get(job_id)
    except (ValueError, IndexError, JobNotFound):
        return None
    if rec.get("model_path"):
        return str(rec["model_path"])
    return rec.get("model") if rec.get("model_source") == "hub" else None


async def proxy(request: Request, kind: str, req: _Sampling, tenant: Tenant) -> Response:
    s = request.app.state.settings
    check_bounds(req, s.inference_max_n, s.inference_max_tokens)
    model = await asyncio.to_thread(resolve, request, req.model, tenant)
    body = req.model_dump(exclude_none=True)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    headers = {MODEL_HEADER: json.dumps(model)}
    if s.inference_token:
        headers["Authorization"] = f"Bearer {s.inference_token}"
    client: httpx.AsyncClient = request.app.state.inference_client
    tried: set[str] = set()
    while True:
        workers = await _live(request, s.key_prefix, s.inference_queue)
        worker = pick([w for w in workers if w.get("name") not in tried], model["path"])
        if worker is None:
            raise APIError(
                503,
                "no inference worker is serving chat and completion requests; start one "
                "with `posttrain inference`",
                code="no_inference_worker",
                type="server_error",
                headers={"Retry-After": "10"},
            )
        tried.add(worker.get("name", ""))
        upstream = client.build_request("POST", worker["url"] + path, json=body, headers=headers)
        try:
            resp = await client.send(upstream, stream=True)
            break
        except httpx.HTTPError as exc:  # that worker is gone: another live one may answer
            log.warning("inference worker %s unreachable: %s", worker.get("name"), exc)
            request.app.state.inference_workers.pop(s.inference_queue, None)
            continue
    if req.stream and resp.status_code == 200:
        return StreamingResponse(
            _relay(resp),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        content = await resp.aread()
    except httpx.HTTPError:
        content = b""
    finally:
        await resp.aclose()
    return _answer(resp, content)


# How long the API reuses a read of the worker registry: workers rewrite their entries
# every 2 s and expire after 6; a worker that went away in between is skipped by the
# retry in ``proxy`` (and the cache dropped).
WORKERS_TTL = 1.0


async def _live(request: Request, prefix: str, queue: str) -> list[dict]:
    cache = request.app.state.inference_workers
    now = time.monotonic()
    hit = cache.get(queue)
    if hit is not None and hit[0] > now:
        return hit[1]
    workers = await asyncio.to_thread(live_workers, request.app.state.redis, prefix, queue)
    cache[queue] = (now + WORKERS_TTL, workers)
    return workers


def _answer(resp: httpx.Response, content: bytes) -> Response:
    # a JSON object, by its first byte: the worker writes whole JSON answers or none
    if not content.lstrip()[:1] == b"{":
        raise APIError(
            502,
            "the inference worker gave no valid answer",
            code="inference_error",
            type="server_error",
        )
    headers = {"Retry-After": resp.headers["retry-after"]} if "retry-after" in resp.headers else {}
    return Response(content, resp.status_code, headers=headers, media_type="application/json")


async def _relay(resp: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        error = {
            "error": {
                "message": "the inference worker stopped answering mid-stream",
                "type": "server_error",
                "param": None,
                "code": "inference_error",
            }
        }
        yield b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
    finally:
        await resp.aclose()
