"""Files API: upload (validated row by row), list, retrieve, content, delete.

Routes are sync (FastAPI runs them in its thread pool) except the upload, which
streams the request body itself (``service.upload``) and validates the staged file
in the thread pool, so neither blocks the event loop.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service import upload as uploads
from service.auth import Tenant
from service.deps import Auth, FilesDep, SettingsDep, TenantDep
from service.errors import APIError, not_found
from service.schemas import FileDeleted, FileObject, Page, file_object, page
from trainers.contract.formats import DatasetError, summarize
from workers.filestore import FileNotFound

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Auth])
PURPOSES = ("fine-tune",)


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


@router.post("", response_model=FileObject)
async def upload(
    request: Request, files: FilesDep, settings: SettingsDep, tenant: TenantDep
) -> FileObject:
    """Multipart form: ``file`` (JSONL), ``purpose``, optional ``expires_after[anchor]`` and
    ``expires_after[seconds]`` (declared in ``service/openapi.py``). The body is read here,
    after the key was checked, and refused from its Content-Length when too large."""
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
            summary = await run_in_threadpool(_summarize, staged)
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
    return file_object(rec)


def _summarize(path):
    with open(path, "rb") as fh:
        return summarize(fh)


@router.get("", response_model=Page)
def list_files(
    files: FilesDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    if after:
        _get(files, after, tenant, "after")
    try:
        recs, more = files.list(
            after, limit, purpose, None if tenant.admin else tenant.name, order=order
        )
    except FileNotFound:
        raise not_found("file", after or "", "after") from None
    return page([file_object(r) for r in recs], more)


def _get(files: FilesDep, file_id: str, tenant: Tenant, param: str = "file_id") -> dict:
    """The file's record if ``tenant`` may see it; another tenant's file is a 404 exactly
    like a missing one."""
    try:
        rec = files.get(file_id)
    except FileNotFound:
        raise not_found("file", file_id, param) from None
    if not tenant.owns(rec):
        raise not_found("file", file_id, param)
    return rec


@router.get("/{file_id}", response_model=FileObject)
def retrieve(file_id: str, files: FilesDep, tenant: TenantDep) -> FileObject:
    return file_object(_get(files, file_id, tenant))


@router.get("/{file_id}/content")
def content(file_id: str, files: FilesDep, tenant: TenantDep) -> FileResponse:
    rec = _get(files, file_id, tenant)
    if not files.path(file_id).is_file():
        raise not_found("file", file_id, "file_id")  # its bytes are gone (deleted meanwhile)
    return FileResponse(
        files.path(file_id), media_type="application/jsonl", filename=rec["filename"]
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete(file_id: str, files: FilesDep, tenant: TenantDep) -> FileDeleted:
    _get(files, file_id, tenant)
    files.delete(file_id)
    return FileDeleted(id=file_id, deleted=True)
