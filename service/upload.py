"""Receiving an upload: the multipart body streamed to a staging file, within limits.

The files route reads the body itself (it declares no form parameters), so FastAPI
runs the auth dependency before a byte of the body is read, and the route refuses a
``Content-Length`` over the limit before reading it too. While the body streams:

* the whole body and the file part are capped (413 naming the limit);
* each line of the file is measured as it passes; the first longer than the line
  limit is a 400 naming it, so no later step ever holds a huge line in memory;
* a UTF-8 byte order mark at the start of the file is dropped.

Form fields are small (1 KiB each); the field names are the ones OpenAI's
``files.create`` sends: ``file``, ``purpose``, ``expires_after[anchor]`` and
``expires_after[seconds]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import APIError

BOM = b"\xef\xbb\xbf"
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
MAX_FIELD_BYTES = 1024
# Multipart framing around the file: boundaries, part headers, the small fields.
FORM_OVERHEAD = 64 * 1024
_FLUSH = 1 << 20


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the upload exceeds the limit of {limit} bytes (POSTTRAIN_MAX_UPLOAD_BYTES)",
        param="file",
        code="file_too_large",
    )


def _bad_file(message: str) -> APIError:
    return APIError(400, message, param="file", code="invalid_file_format")


class LineGuard:
    """Counts lines and their lengths in a byte stream; drops a leading BOM."""

    def __init__(self, max_line: int):
        self.max_line = max_line
        self.line = 1  # 1-based number of the line being read
        self.current = 0  # bytes of that line seen so far
        self.head: bytes | None = b""  # the first bytes until the BOM check is done

    def feed(self, data: bytes) -> bytes:
        if self.head is not None:
            data = self.head + data
            if len(data) < len(BOM) and BOM.startswith(data):
                self.head = data
                return b""
            self.head = None
            data = data.removeprefix(BOM)
        first = data.find(b"\n")
        if first < 0:
            self._grow(len(data))
            return data
        self._grow(first)  # the end of the line carried over from earlier chunks
        last = data.rfind(b"\n")
        if last - first - 1 > self.max_line:  # a whole line in between may be too long
            pos = first
            while pos < last:
                nxt = data.find(b"\n", pos + 1)
                self.line += 1
                self.current = 0
                self._grow(nxt - pos - 1)
                pos = nxt
        else:
            self.line += data.count(b"\n", first, last)
        self.line += 1
        self.current = 0
        self._grow(len(data) - last - 1)
        return data

    def _grow(self, n: int) -> None:
        self.current += n
        if self.current > self.max_line:
            raise _bad_file(
                f"line {self.line} is longer than {self.max_line} bytes "
                "(POSTTRAIN_MAX_LINE_BYTES); split it or raise the limit"
            )

    def finish(self) -> bytes:
        """Bytes held back while checking for a BOM (a file shorter than the BOM)."""
        held, self.head = self.head or b"", None
        return held


@dataclass
class Upload:
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    file_bytes: int = 0
    got_file: bool = False


class _Receiver:
    """python-multipart callbacks: the file part to ``out`` (via ``pending``), fields to
    ``upload.fields``."""

    def __init__(self, max_bytes: int, max_line: int):
        self.upload = Upload()
        self.max_bytes = max_bytes
        self.guard = LineGuard(max_line)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._headers: dict[str, str] = {}
        self._hname = b""
        self._hvalue = b""
        self._part: str | None = None  # "file", a field name
        self._value = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._hfield,
            "on_header_value": self._hval,
            "on_header_end": self._hend,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers, self._hname, self._hvalue, self._part, self._value = {}, b"", b"", None, b""

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _hval(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _hend(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname, self._hvalue = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.upload.got_file:
                raise APIError(400, "send one 'file' part", param="file", code="invalid_value")
            self.upload.got_file = True
            raw = options.get(b"filename")
            self.upload.filename = raw.decode("utf-8", "replace") if raw is not None else None
        elif name not in FIELDS:
            raise APIError(
                400,
                f"unknown form field '{name[:64]}'; expected file, {', '.join(FIELDS)}",
                param=name[:64] or None,
                code="invalid_value",
            )
        self._part = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.upload.file_bytes += end - start
            if self.upload.file_bytes > self.max_bytes:
                raise too_large(self.max_bytes)
            chunk = self.guard.feed(data[start:end])
            if chunk:
                self.pending.append(chunk)
                self.pending_bytes += len(chunk)
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise APIError(
                    400,
                    f"form field '{self._part}' is longer than {MAX_FIELD_BYTES} bytes",
                    param=self._part,
                    code="invalid_value",
                )

    def _end(self) -> None:
        if self._part == "file":
            held = self.guard.finish()
            if held:
                self.pending.append(held)
        elif self._part is not None:
            try:
                self.upload.fields[self._part] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(
                    400,
                    f"form field '{self._part}' is not UTF-8",
                    param=self._part,
                    code="invalid_value",
                ) from None

    def take(self) -> bytes:
        out = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return out


def _bad_form(exc: Exception) -> APIError:
    return APIError(
        400, f"the multipart body cannot be parsed: {exc}", param="file", code="invalid_value"
    )


def check_length(request: Request, max_bytes: int) -> None:
    """413 from the ``Content-Length`` header alone, before the body is read."""
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise APIError(
            400, "invalid Content-Length header", param="Content-Length", code="invalid_value"
        ) from None
    if length > max_bytes + FORM_OVERHEAD:
        raise too_large(max_bytes)


async def receive(request: Request, staged: Path, max_bytes: int, max_line: int) -> Upload:
    """Stream the multipart body of ``request``: the file part into ``staged``."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise APIError(
            400,
            "the body must be multipart/form-data with a 'file' part and a 'purpose' field",
            param="file",
            code="invalid_value",
        )
    check_length(request, max_bytes)
    receiver = _Receiver(max_bytes, max_line)
    parser = MultipartParser(boundary, receiver.callbacks())
    total = 0
    async with await anyio.open_file(staged, "wb") as out:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + FORM_OVERHEAD:
                raise too_large(max_bytes)
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise _bad_form(exc) from None
            if receiver.pending_bytes >= _FLUSH:
                await out.write(receiver.take())
        try:
            parser.finalize()
        except FormParserError as exc:
            raise _bad_form(exc) from None
        if receiver.pending:
            await out.write(receiver.take())
    if not receiver.upload.got_file:
        raise APIError(400, "the form has no 'file' part", param="file", code="invalid_value")
    return receiver.upload
