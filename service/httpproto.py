"""uvicorn's HTTP protocol with OpenAI-shaped answers to malformed HTTP.

A request uvicorn cannot parse (a bad request line, an invalid header) never reaches
the app: uvicorn answers it with a plain-text 400 by itself. ``JsonErrorProtocol`` is
uvicorn's own protocol (httptools where installed, else h11) with that one answer
replaced by the error object every other refusal has. ``posttrain serve`` runs with it.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def malformed_response(reason: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": f"Malformed HTTP request: {reason}",
                "type": "invalid_request_error",
                "param": None,
                "code": "malformed_request",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class JsonErrorProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    def send_400_response(self, msg: str) -> None:
        self.transport.write(malformed_response(msg))
        self.transport.close()
