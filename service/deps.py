"""FastAPI dependencies: settings, stores and auth, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.auth import DEFAULT, KeyRing, Tenant
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


def require_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    """The caller's tenant (the default tenant when auth is off); 401 for a bad key.

    Routers list it as a dependency, and routes take ``TenantDep``: FastAPI runs it
    once per request either way."""
    ring: KeyRing = request.app.state.keyring
    if not ring.enabled:
        tenant = DEFAULT
    else:
        token = (authorization or "").removeprefix("Bearer ").strip()
        tenant = ring.tenant_for(token)
        if tenant is None:
            raise APIError(
                401,
                "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
    request.state.tenant = tenant
    return tenant


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
FilesDep = Annotated[FileStore, Depends(get_files)]
TenantDep = Annotated[Tenant, Depends(require_key)]
Auth = Depends(require_key)
