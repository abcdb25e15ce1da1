"""Files API: upload (validated row by row), list, retrieve, content, delete.

Routes are sync (FastAPI runs them in its thread pool) except the upload, which
streams the request body itself (``service.fileservice``) and validates the staged
file in the thread pool, so neither blocks the event loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from service import fileservice
from service.deps import Auth, FilesDep, OwnedFile, SettingsDep, TenantDep, owned_file
from service.errors import error_responses, not_found
from service.schemas import FileDeleted, FileObject, FilePage, file_object, page
from workers.filestore import FileNotFound

router = APIRouter(
    prefix="/v1/files",
    tags=["files"],
    dependencies=[Auth],
    responses=error_responses(400, 503),
)


@router.post("", response_model=FileObject, responses=error_responses(413))
async def upload(
    request: Request, files: FilesDep, settings: SettingsDep, tenant: TenantDep
) -> FileObject:
    """Multipart form: ``file`` (JSONL), ``purpose``, optional ``expires_after[anchor]`` and
    ``expires_after[seconds]`` (declared in ``service/openapi.py``). The body is read by
    ``service.fileservice``, after the key was checked."""
    return file_object(await fileservice.upload(request, files, settings, tenant))


@router.get("", response_model=FilePage, responses=error_responses(404))
def list_files(
    files: FilesDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    if after:
        owned_file(files, after, tenant, "after")
    try:
        recs, more = files.list(
            after, limit, purpose, None if tenant.admin else tenant.name, order=order
        )
    except FileNotFound:
        raise not_found("file", after or "", "after") from None
    return page([file_object(r) for r in recs], more, empty_id="")


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404))
def retrieve(file: OwnedFile) -> FileObject:
    return file_object(file)


@router.get("/{file_id}/content", responses=error_responses(404))
def content(file: OwnedFile, files: FilesDep) -> FileResponse:
    path = files.path(file["id"])
    if not path.is_file():
        raise not_found("file", file["id"], "file_id")  # its bytes are gone (deleted meanwhile)
    return FileResponse(path, media_type="application/jsonl", filename=file["filename"])


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(404, 500))
def delete(file: OwnedFile, files: FilesDep) -> FileDeleted:
    files.delete(file["id"])
    return FileDeleted(id=file["id"], deleted=True)
