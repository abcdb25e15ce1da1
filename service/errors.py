"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every answer that is not a success has this shape, whatever raised it:

* ``APIError`` (the routes' own refusals), FastAPI's request validation (400, never
  422) and Starlette's HTTP errors (404 for an unknown path, 405 with an ``Allow``
  header listing every method the path serves);
* Redis or the Celery broker unreachable: 503 ``service_unavailable``;
* bytes on the data volume that a DELETE could not remove: 500 ``deletion_failed``
  (the record stays, so the DELETE can be retried); a data directory the API may not
  write (the volume owned by another user): 500 ``storage_not_writable``;
* anything else: 500 ``internal_error``, answered by ``CatchAll`` as an ordinary
  response, so the client's keep-alive connection survives (the traceback goes
  to the log, never to the client).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.filestore import RemovalFailed

log = logging.getLogger("posttrain.api")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )
        self.headers = headers
        super().__init__(message)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
_WHY = {
    "400": "Invalid request: the message names the field (or the file's line)",
    "401": "Missing or wrong API key",
    "404": "No such object (or an id no object can have)",
    "409": "Idempotency-Key reused with another request, or still in flight",
    "410": "The checkpoint's files are no longer on the data volume",
    "413": "The upload exceeds the size limit",
    "429": "The tenant's quota of active jobs is full",
    "500": "Files on the data volume could not be removed; nothing was marked deleted, retry",
    "503": "Redis or the message broker cannot be reached; retry",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` a route declares for the error statuses it can answer, each with
    the OpenAI error object (``service/openapi.py`` registers its schema as ``Error``)."""
    return {
        str(status): {
            "description": _WHY[str(status)],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status in statuses
    }


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {kind}: {ident}", param=param, code="not_found")


def _body(message: str, type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(_body(message, type, param, code), status_code=status, headers=headers)


def loc_to_param(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else ("." if out else "") + p
    return out


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first
    route's methods when several routes share a path)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


class CatchAll:
    """Turn an exception no handler took into an OpenAI-shaped 500 response.

    Starlette's own last-resort handler re-raises after answering, and uvicorn then
    closes the connection; answering here ends the request normally instead. An
    exception after the response has started cannot be answered and is re-raised.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = error_response(
                500,
                "The server had an error while processing your request; it has been logged",
                type="server_error",
                code="internal_error",
            )
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, exc.type, exc.param, exc.code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = loc_to_param(tuple(first.get("loc", ()))) or None
        msg = "; ".join(f"{loc_to_param(tuple(e['loc'])) or 'body'}: {e['msg']}" for e in errs[:5])
        return error_response(400, msg, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        code = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
        }.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
        return error_response(exc.status_code, message, param=None, code=code, headers=headers)

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        what = "the message broker" if isinstance(exc, BrokerError) else "Redis"
        log.warning("%s unreachable during %s %s: %s", what, request.method, request.url.path, exc)
        return error_response(
            503,
            "The service is temporarily unavailable (its record store or queue cannot be "
            "reached); retry shortly",
            type="server_error",
            code="service_unavailable",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(RemovalFailed)
    async def _not_removed(request: Request, exc: RemovalFailed) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(
            500,
            f"Deletion failed: {exc}. Nothing was marked deleted; retry the request (an "
            "operator may need to fix the data volume's permissions)",
            type="server_error",
            code="deletion_failed",
        )

    @app.exception_handler(PermissionError)
    async def _not_writable(request: Request, exc: PermissionError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return error_response(
            500,
            "The API may not write its data directory (permission denied), so nothing was "
            "stored; an operator must give the API's user the data volume (/readyz reports it)",
            type="server_error",
            code="storage_not_writable",
        )

    for exc_class in (redis.ConnectionError, redis.TimeoutError, BrokerError):
        app.add_exception_handler(exc_class, _unavailable)
    app.add_middleware(CatchAll)
