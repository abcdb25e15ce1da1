"""Liveness and readiness."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter(tags=["health"])
log = logging.getLogger("posttrain.api")


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: Literal["ok", "unreachable"]


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis cannot be reached"}},
)
def readyz(request: Request) -> JSONResponse:
    """Whether the API can serve: Redis answers. The reason it does not goes to the log,
    not to the (unauthenticated) caller."""
    try:
        request.app.state.redis.ping()
    except Exception as exc:
        log.warning("readiness check: Redis unreachable: %s", exc)
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok"})
