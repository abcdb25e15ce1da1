"""Uploads: from a multipart request to a stored, validated file record.

The files route hands the raw request here. ``upload`` refuses a body whose
Content-Length is over the limit, streams it into a staging file within the limits
(``service.upload``), checks the form fields (``purpose``, OpenAI's ``expires_after``),
validates every row in the thread pool (``trainers.contract.formats.summarize``, or for
purpose ``evals`` ``workers.evalrows.read_rows``: each error names its line) and commits
the file and its record (``FileStore.commit``). The staging file never outlives the
request.
"""

from __future__ import annotations

import functools

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service import upload as uploads
from service.auth import Tenant
from service.errors import APIError
from service.settings import ApiSettings
from trainers.contract.formats import DatasetError, FileSummary, summarize
from workers.evalrows import RowError, read_rows
from workers.filestore import FileStore

PURPOSES = ("fine-tune", "evals")


def _expires_after(fields: dict[str, str]) -> int | None:
    """OpenAI's ``expires_after``: anchor ``created_at`` plus 3600..2592000 seconds."""
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise APIError(
            400,
            f"expires_after[anchor] must be 'created_at', got {anchor!r}",
            param="expires_after.anchor",
            code="invalid_value",
        )
    if seconds is None or not seconds.isdigit() or not 3600 <= int(seconds) <= 2_592_000:
        raise APIError(
            400,
            f"expires_after[seconds] must be an integer from 3600 to 2592000 (30 days), "
            f"got {seconds!r}",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return int(seconds)


async def upload(request: Request, files: FileStore, settings: ApiSettings, tenant: Tenant) -> dict:
    """Receive, validate and store one upload; return its record. The body is refused from
    its Content-Length when too large, then streamed to a staging file
    (``service.upload``), validated row by row in the thread pool and committed."""
    limit = settings.max_upload_bytes
    uploads.check_length(request, limit)
    staged = files.staging_path()
    try:
        form = await uploads.receive(request, staged, limit, settings.max_line_bytes)
        purpose = form.fields.get("purpose")
        if purpose not in PURPOSES:
            raise APIError(
                400,
                f"purpose must be one of {list(PURPOSES)}, got {purpose!r}",
                param="purpose",
                code="invalid_value",
            )
        expires_after = _expires_after(form.fields)
        filename = form.filename or "upload.jsonl"
        try:
            summary = await run_in_threadpool(
                _summarize_eval if purpose == "evals" else _summarize, staged
            )
        except DatasetError as exc:
            raise APIError(
                400,
                f"Invalid file '{filename}': {exc}",
                param="file",
                code="invalid_file_format",
            ) from None
        rec = await run_in_threadpool(
            functools.partial(
                files.commit,
                staged,
                filename=filename,
                purpose=purpose,
                formats=[str(f) for f in summary.formats],
                rows=summary.rows,
                extra_fields=sorted(summary.extra_fields),
                tenant=tenant.name,
                expires_after=expires_after,
            )
        )
    finally:
        staged.unlink(missing_ok=True)
    return rec


def _summarize(path):
    with open(path, "rb") as fh:
        return summarize(fh)


def _summarize_eval(path) -> FileSummary:
    """An eval data file: ``{"item": {...}, "sample": {...}}`` per line
    (``workers.evalrows.read_rows``); its format is ``eval``."""
    with open(path, "rb") as fh:
        try:
            rows = read_rows(fh, "file")
        except RowError as exc:
            field = exc.where.partition(".")[2] or None if exc.line else None
            raise DatasetError(exc.line or 1, field, exc.message) from None
    return FileSummary(formats=["eval"], rows=len(rows))
