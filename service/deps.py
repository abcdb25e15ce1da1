"""FastAPI dependencies: settings, stores, auth and owned records, as ``Annotated`` aliases.

A route that acts on one record takes it as ``OwnedJob``, ``OwnedFile`` or ``OwnedModel``:
the record of the id in its path, if the caller's tenant may see it. Another tenant's
record is answered with the same 404 as a missing one, so no route can forget the check.
``valid_path_ids`` (app-wide) answers 404 for an id no record can have before any of
these builds a Redis key from it.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Request

from service.auth import DEFAULT, KeyRing, Tenant
from service.errors import APIError, not_found
from service.settings import ApiSettings
from workers.filestore import FileNotFound, FileStore
from workers.store import JobNotFound, JobStatus, JobStore

# Ids posttrain issues are "<prefix>-<hex>"; anything outside this alphabet (":" above
# all, which would reach another record's Redis key) can name no record.
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
_ID = re.compile(ID_PATTERN)
# Path parameters that name a record, and what a 404 calls them.
_ID_PARAMS = {
    "job_id": "fine-tuning job",
    "file_id": "file",
    "checkpoint_id": "checkpoint",
    "eval_id": "eval",
    "run_id": "eval run",
    "output_item_id": "output item",
    "webhook_id": "webhook endpoint",
}


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
        # RFC 7235: the scheme is case-insensitive; a key without it is no credential
        scheme, _, token = (authorization or "").strip().partition(" ")
        tenant = ring.tenant_for(token.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise APIError(
                401,
                "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                param="Authorization",
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


def valid_path_ids(request: Request) -> None:
    """App-wide dependency: a record id in the path that no record can have is a 404 at
    the route, before any store builds a Redis key from it. The caller's key is checked
    first, so an unauthenticated caller still gets 401."""
    params = request.path_params
    bad = next(
        (name for name in _ID_PARAMS if name in params and not _ID.match(params[name])), None
    )
    if bad is None:
        return
    require_key(request, request.headers.get("authorization"))
    raise not_found(_ID_PARAMS[bad], params[bad], bad)


# ---- records the caller owns
def owned(store, missing: type[Exception], kind: str, ident: str, tenant: Tenant, param: str):
    """The record ``ident`` if ``tenant`` may see it; another tenant's record is a 404
    exactly like a missing one, and costs the same: both are decided from one read of
    two short fields (``owner``), and only the owner's record is read whole."""
    owner = store.owner(ident)
    if owner is None or not tenant.owns({"tenant": owner}):
        raise not_found(kind, ident, param)
    try:
        return store.get(ident)
    except missing:  # deleted in between
        raise not_found(kind, ident, param) from None


def owned_job(jobs: JobStore, job_id: str, tenant: Tenant, param: str = "fine_tuning_job_id"):
    return owned(jobs, JobNotFound, "fine-tuning job", job_id, tenant, param)


def owned_file(files: FileStore, file_id: str, tenant: Tenant, param: str = "file_id") -> dict:
    return owned(files, FileNotFound, "file", file_id, tenant, param)


def owned_model(jobs: JobStore, model_id: str, tenant: Tenant) -> dict:
    """The succeeded job that made the fine-tuned model ``model_id``, if ``tenant`` may see
    it and its weights were not deleted; otherwise the same 404 as an unknown name."""
    job_id = model_id.rsplit(":", 1)[-1] if model_id.startswith("ft:") else ""
    owner = jobs.owner(job_id) if job_id and _ID.match(job_id) else None
    try:
        rec = jobs.get(job_id) if owner is not None and tenant.owns({"tenant": owner}) else None
    except JobNotFound:
        rec = None
    if (
        rec is None
        or rec.get("status") != JobStatus.succeeded
        or rec.get("fine_tuned_model") != model_id
        or rec.get("model_deleted_at")
    ):
        raise not_found("model", model_id, "model")
    return rec


def _job_of_path(job_id: str, jobs: JobsDep, tenant: TenantDep) -> dict:
    return owned_job(jobs, job_id, tenant)


def _file_of_path(file_id: str, files: FilesDep, tenant: TenantDep) -> dict:
    return owned_file(files, file_id, tenant)


def _model_of_path(model_id: str, jobs: JobsDep, tenant: TenantDep) -> dict:
    return owned_model(jobs, model_id, tenant)


OwnedJob = Annotated[dict, Depends(_job_of_path)]
OwnedFile = Annotated[dict, Depends(_file_of_path)]
OwnedModel = Annotated[dict, Depends(_model_of_path)]
