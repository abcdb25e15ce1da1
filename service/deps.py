"""FastAPI dependencies: settings, stores and auth, as ``Annotated`` aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import APIError
from service.settings import ApiSettings
from workers.filestore import FileStore
from workers.store import JobStore


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_files(request: Request) -> FileStore:
    return request.app.state.files


def require_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    keys = request.app.state.api_keys
    if not keys:
        return
    token = (authorization or "").removeprefix("Bearer ").strip()
    if not any(secrets.compare_digest(token, k) for k in keys):
        raise APIError(
            401,
            "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
FilesDep = Annotated[FileStore, Depends(get_files)]
Auth = Depends(require_key)
