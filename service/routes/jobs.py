"""Fine-tuning jobs API (OpenAI-compatible) plus posttrain's metrics extension."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service import joblist, jobservice
from service.auth import Tenant
from service.deps import Auth, FilesDep, JobsDep, SettingsDep, TenantDep
from service.errors import APIError, not_found
from service.schemas import FineTuningJob, Page, checkpoint_object, event_object, job_object, page
from service.tarstream import tar_stream
from workers.store import JobNotFound, JobStore

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], dependencies=[Auth])
Limit = Annotated[int, Query(ge=1, le=1000)]


def _record(jobs: JobStore, job_id: str, tenant: Tenant) -> dict:
    """The job's record if ``tenant`` may see it; another tenant's job is a 404 exactly
    like a missing one."""
    try:
        rec = jobs.get(job_id)
    except JobNotFound:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id") from None
    if not tenant.owns(rec):
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return rec


@router.post("", response_model=FineTuningJob)
def create(
    body: Annotated[dict[str, Any], Body()],
    jobs: JobsDep,
    files: FilesDep,
    settings: SettingsDep,
    request: Request,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
):
    job_id, created = jobservice.create_job(
        body,
        jobs,
        files,
        request.app.state.celery,
        settings.queue,
        idempotency_key,
        tenant=tenant,
        access=request.app.state.model_access,
    )
    obj = job_object(jobs.get(job_id), settings.organization_id)
    return JSONResponse(
        obj.model_dump(mode="json"),
        status_code=200,
        headers={"Idempotent-Replayed": "false" if created else "true"},
    )


@router.get("", response_model=Page)
def list_jobs(
    jobs: JobsDep,
    settings: SettingsDep,
    tenant: TenantDep,
    request: Request,
    after: str | None = None,
    limit: Limit = 20,
) -> dict:
    """Newest first. ``metadata[k]=v`` (repeatable) keeps jobs whose metadata holds every
    pair; ``metadata=null`` keeps jobs without metadata (declared in service/openapi.py)."""
    wanted = joblist.metadata_filter(request.query_params.multi_items())
    if after and not _visible(jobs, after, tenant):
        raise not_found("fine-tuning job", after, "after")
    try:
        recs, more = joblist.list_jobs(
            jobs, after, limit, None if tenant.admin else tenant.name, wanted
        )
    except JobNotFound:
        raise not_found("fine-tuning job", after or "", "after") from None
    return page([job_object(r, settings.organization_id) for r in recs], more)


def _visible(jobs: JobStore, job_id: str, tenant: Tenant) -> bool:
    try:
        _record(jobs, job_id, tenant)
    except APIError:
        return False
    return True


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve(job_id: str, jobs: JobsDep, settings: SettingsDep, tenant: TenantDep) -> FineTuningJob:
    return job_object(_record(jobs, job_id, tenant), settings.organization_id)


@router.delete("/{job_id}")
def delete(job_id: str, jobs: JobsDep, files: FilesDep, tenant: TenantDep) -> dict:
    """Delete a finished job: its record, events, metrics, checkpoints (list and files),
    Idempotency-Key binding and directory on the data volume (extension)."""
    _record(jobs, job_id, tenant)
    jobservice.delete_job(job_id, jobs, files)
    return {"id": job_id, "object": "fine_tuning.job", "deleted": True}


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel(job_id: str, jobs: JobsDep, settings: SettingsDep, tenant: TenantDep) -> FineTuningJob:
    _record(jobs, job_id, tenant)
    jobservice.cancel_job(job_id, jobs)
    return job_object(jobs.get(job_id), settings.organization_id)


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause(job_id: str, jobs: JobsDep, settings: SettingsDep, tenant: TenantDep) -> FineTuningJob:
    _record(jobs, job_id, tenant)
    jobservice.pause_job(job_id, jobs)
    return job_object(jobs.get(job_id), settings.organization_id)


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume(
    job_id: str, jobs: JobsDep, settings: SettingsDep, request: Request, tenant: TenantDep
) -> FineTuningJob:
    _record(jobs, job_id, tenant)
    jobservice.resume_job(job_id, jobs, request.app.state.celery, settings.queue)
    return job_object(jobs.get(job_id), settings.organization_id)


@router.get("/{job_id}/events", response_model=Page)
def events(
    job_id: str, jobs: JobsDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20
) -> dict:
    _record(jobs, job_id, tenant)
    cursor = after.removeprefix("ftevent-") if after else None
    try:
        rows, more = jobs.events(job_id, cursor, limit)
    except Exception:
        raise APIError(400, f"invalid event cursor '{after}'", param="after") from None
    return page([event_object(sid, f) for sid, f in rows], more)


@router.get("/{job_id}/checkpoints", response_model=Page)
def checkpoints(
    job_id: str, jobs: JobsDep, tenant: TenantDep, after: str | None = None, limit: Limit = 10
) -> dict:
    _record(jobs, job_id, tenant)
    metas = list(reversed(jobs.checkpoints(job_id)))  # newest first
    if after:
        ids = [m["id"] for m in metas]
        if after not in ids:
            raise not_found("checkpoint", after, "after")
        metas = metas[ids.index(after) + 1 :]
    return page([checkpoint_object(job_id, m) for m in metas[:limit]], len(metas) > limit)


@router.get("/{job_id}/checkpoints/{checkpoint_id}/content")
def checkpoint_content(
    job_id: str, checkpoint_id: str, jobs: JobsDep, settings: SettingsDep, tenant: TenantDep
) -> StreamingResponse:
    _record(jobs, job_id, tenant)
    meta = next((m for m in jobs.checkpoints(job_id) if m["id"] == checkpoint_id), None)
    if meta is None:
        raise not_found("checkpoint", checkpoint_id, "checkpoint_id")
    root = Path(settings.data_dir).resolve()
    path = (root / meta["path"]).resolve()
    if root not in path.parents or not path.is_dir():
        raise APIError(
            410,
            f"checkpoint {checkpoint_id} is no longer on the data volume",
            code="checkpoint_gone",
        )
    name = f"{job_id}-step-{meta['step']}"
    return StreamingResponse(
        tar_stream(path, name),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar"'},
    )


@router.get("/{job_id}/metrics")
def metrics(
    job_id: str,
    jobs: JobsDep,
    tenant: TenantDep,
    after: int | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict:
    """Per-step training metrics, oldest first (extension; ``after`` is a step number)."""
    _record(jobs, job_id, tenant)
    rows, more = jobs.metrics(job_id, after, limit)
    return {"object": "list", "data": rows, "has_more": more}
