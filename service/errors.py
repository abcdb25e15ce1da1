"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )
        super().__init__(message)


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {kind}: {ident}", param=param, code="not_found")


def _body(message: str, type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def loc_to_param(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else ("." if out else "") + p
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            _body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = loc_to_param(tuple(first.get("loc", ()))) or None
        msg = "; ".join(f"{loc_to_param(tuple(e['loc'])) or 'body'}: {e['msg']}" for e in errs[:5])
        return JSONResponse(
            _body(msg, "invalid_request_error", param, "invalid_value"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            _body(str(exc.detail), "invalid_request_error", None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
