"""Request bodies are bounded before they are read (pure ASGI middleware).

Every route but the upload (which streams to disk under its own limit,
``service.upload``) reads its JSON body whole, so the body is refused first:

* a ``Content-Length`` over ``POSTTRAIN_MAX_BODY_BYTES`` is answered 413
  (``request_too_large``) before a byte of the body is read, and one that is not a
  number is a 400;
* a body without a length (chunked) is counted as it streams in; past the limit the
  app's read fails with the same 413 (Starlette's ``HTTPException``, answered by the
  API's error handler) and nothing more is read.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response


def _too_large(limit: int) -> str:
    return f"The request body is over {limit} bytes, the limit of this route"


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[tuple[str, str]]):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                response = error_response(
                    400,
                    "Content-Length must be a number of bytes",
                    param="Content-Length",
                    code="invalid_request",
                )
                await response(scope, receive, send)
                return
            if int(declared) > self.limit:
                response = error_response(413, _too_large(self.limit), code="request_too_large")
                await response(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, _too_large(self.limit))
            return message

        await self.app(scope, counted, send)
