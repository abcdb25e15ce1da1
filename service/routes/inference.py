"""OpenAI's chat completions and (legacy) completions on base and fine-tuned models,
answered by inference workers (``service.inference``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import inference
from service.deps import Auth, TenantDep
from service.errors import error_responses

router = APIRouter(
    prefix="/v1",
    tags=["inference"],
    dependencies=[Auth],
    responses=error_responses(400, 404, 503),
)

_SSE = {
    "description": "The answer; with `stream: true`, server-sent events ending in `data: [DONE]`.",
    "content": {"application/json": {}, "text/event-stream": {}},
}


@router.post("/chat/completions", responses={200: _SSE})
async def chat_completions(
    body: inference.ChatCompletionRequest, request: Request, tenant: TenantDep
) -> Response:
    """A chat completion from a base model, the caller's fine-tuned model or one of its
    checkpoints (by ``ft:...:ckpt-step-N`` name or ``ftckpt-`` id)."""
    return await inference.proxy(request, "chat", body, tenant)


@router.post("/completions", responses={200: _SSE})
async def completions(
    body: inference.CompletionRequest, request: Request, tenant: TenantDep
) -> Response:
    """A text completion of ``prompt`` (no chat template)."""
    return await inference.proxy(request, "completion", body, tenant)
