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
    data_dir: Literal["ok", "not_writable"]


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "Redis cannot be reached, or the data directory cannot be written",
        }
    },
)
def readyz(request: Request) -> JSONResponse:
    """Whether the API can serve: Redis answers and the data directory takes a write (an
    upload needs both). The reason it cannot goes to the log, not to the
    (unauthenticated) caller."""
    ready = {"redis": "ok", "data_dir": "ok"}
    try:
        request.app.state.redis.ping()
    except Exception as exc:
        log.warning("readiness check: Redis unreachable: %s", exc)
        ready["redis"] = "unreachable"
    problem = request.app.state.files.writable()
    if problem is not None:
        log.warning("readiness check: the data directory is not writable: %s", problem)
        ready["data_dir"] = "not_writable"
    ok = ready == {"redis": "ok", "data_dir": "ok"}
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", **ready}, status_code=200 if ok else 503
    )
