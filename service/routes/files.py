"""Files API: upload (validated row by row), list, retrieve, content, delete.

Routes are sync: FastAPI runs them in its thread pool, so streaming an upload to
disk and validating it line by line never blocks the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from service.deps import Auth, FilesDep, SettingsDep
from service.errors import APIError, not_found
from service.schemas import FileDeleted, FileObject, Page, file_object, page
from trainers.formats import DatasetError, summarize
from workers.filestore import FileNotFound

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Auth])
PURPOSES = ("fine-tune",)


@router.post("", response_model=FileObject)
def upload(
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    files: FilesDep,
    settings: SettingsDep,
) -> FileObject:
    if purpose not in PURPOSES:
        raise APIError(
            400,
            f"purpose must be one of {list(PURPOSES)}, got '{purpose}'",
            param="purpose",
            code="invalid_value",
        )
    staged = files.staging_path()
    try:
        size = 0
        with open(staged, "wb") as out:
            while chunk := file.file.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise APIError(
                        413,
                        f"file exceeds {settings.max_upload_bytes} bytes",
                        param="file",
                        code="file_too_large",
                    )
                out.write(chunk)
        try:
            with open(staged, "rb") as fh:
                summary = summarize(fh)
        except DatasetError as exc:
            raise APIError(
                400,
                f"Invalid file '{file.filename}': {exc}",
                param="file",
                code="invalid_file_format",
            ) from None
        rec = files.commit(
            staged,
            filename=file.filename or "upload.jsonl",
            purpose=purpose,
            formats=[str(f) for f in summary.formats],
            rows=summary.rows,
            extra_fields=sorted(summary.extra_fields),
        )
    finally:
        staged.unlink(missing_ok=True)
    return file_object(rec)


@router.get("", response_model=Page)
def list_files(
    files: FilesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    purpose: str | None = None,
) -> dict:
    try:
        recs, more = files.list(after, limit, purpose)
    except FileNotFound:
        raise not_found("file", after or "", "after") from None
    return page([file_object(r) for r in recs], more)


def _get(files: FilesDep, file_id: str) -> dict:
    try:
        return files.get(file_id)
    except FileNotFound:
        raise not_found("file", file_id, "file_id") from None


@router.get("/{file_id}", response_model=FileObject)
def retrieve(file_id: str, files: FilesDep) -> FileObject:
    return file_object(_get(files, file_id))


@router.get("/{file_id}/content")
def content(file_id: str, files: FilesDep) -> FileResponse:
    rec = _get(files, file_id)
    return FileResponse(
        files.path(file_id), media_type="application/jsonl", filename=rec["filename"]
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete(file_id: str, files: FilesDep) -> FileDeleted:
    _get(files, file_id)
    files.delete(file_id)
    return FileDeleted(id=file_id, deleted=True)
