"""Fine-tuning jobs API (OpenAI-compatible) plus posttrain's metrics and samples extensions."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse

from service import joblist, jobservice
from service.auth import Tenant
from service.deps import Auth, FilesDep, JobsDep, OwnedJob, SettingsDep, TenantDep, owned_job
from service.errors import APIError, error_responses, not_found
from service.evalsources import check_job_eval
from service.schemas import (
    FineTuningJob,
    Page,
    SamplePage,
    checkpoint_object,
    event_object,
    job_object,
    page,
    sample_object,
)
from service.tarstream import tar_stream
from workers.store import JobNotFound, JobStore

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["fine-tuning"],
    dependencies=[Auth],
    responses=error_responses(400, 503),
)
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=FineTuningJob, responses=error_responses(404, 409, 429))
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
        settings,
        idempotency_key,
        tenant=tenant,
        access=request.app.state.model_access,
        graders=request.app.state.grader_pool,
        check_eval=functools.partial(
            check_job_eval, request=request, tenant=tenant, files=files, settings=settings
        ),
    )
    obj = job_object(jobs.get(job_id), settings.organization_id)
    return JSONResponse(
        obj.model_dump(mode="json"),
        status_code=200,
        headers={"Idempotent-Replayed": "false" if created else "true"},
    )


@router.get("", response_model=Page, responses=error_responses(404))
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
        owned_job(jobs, job_id, tenant)
    except APIError:
        return False
    return True


@router.get("/{job_id}", response_model=FineTuningJob, responses=error_responses(404))
def retrieve(job: OwnedJob, settings: SettingsDep) -> FineTuningJob:
    return job_object(job, settings.organization_id)


@router.delete("/{job_id}", responses=error_responses(400, 404, 500))
def delete(job: OwnedJob, jobs: JobsDep, files: FilesDep) -> dict:
    """Delete a finished job: its record, events, metrics, checkpoints (list and files),
    Idempotency-Key binding and directory on the data volume (extension)."""
    jobservice.delete_job(job["id"], jobs, files)
    return {"id": job["id"], "object": "fine_tuning.job", "deleted": True}


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=error_responses(404))
def cancel(job: OwnedJob, jobs: JobsDep, settings: SettingsDep) -> FineTuningJob:
    return job_object(jobservice.cancel_job(job, jobs), settings.organization_id)


@router.post("/{job_id}/pause", response_model=FineTuningJob, responses=error_responses(404))
def pause(job: OwnedJob, jobs: JobsDep, settings: SettingsDep) -> FineTuningJob:
    return job_object(jobservice.pause_job(job, jobs), settings.organization_id)


@router.post("/{job_id}/resume", response_model=FineTuningJob, responses=error_responses(404))
def resume(job: OwnedJob, jobs: JobsDep, settings: SettingsDep, request: Request) -> FineTuningJob:
    written = jobservice.resume_job(job, jobs, request.app.state.celery, settings.queue)
    return job_object(written, settings.organization_id)


@router.get("/{job_id}/events", response_model=Page, responses=error_responses(404))
def events(job: OwnedJob, jobs: JobsDep, after: str | None = None, limit: Limit = 20) -> dict:
    job_id = job["id"]
    cursor = after.removeprefix("ftevent-") if after else None
    try:
        rows, more = jobs.events(job_id, cursor, limit)
    except Exception:
        raise APIError(
            400, f"invalid event cursor '{after}'", param="after", code="invalid_value"
        ) from None
    return page([event_object(sid, f) for sid, f in rows], more)


@router.get("/{job_id}/checkpoints", response_model=Page, responses=error_responses(404))
def checkpoints(job: OwnedJob, jobs: JobsDep, after: str | None = None, limit: Limit = 10) -> dict:
    job_id = job["id"]
    metas = list(reversed(jobs.checkpoints(job_id)))  # newest first
    if after:
        ids = [m["id"] for m in metas]
        if after not in ids:
            raise not_found("checkpoint", after, "after")
        metas = metas[ids.index(after) + 1 :]
    return page([checkpoint_object(job_id, m) for m in metas[:limit]], len(metas) > limit)


@router.get("/{job_id}/checkpoints/{checkpoint_id}/content", responses=error_responses(404, 410))
def checkpoint_content(
    job: OwnedJob, checkpoint_id: str, jobs: JobsDep, settings: SettingsDep
) -> StreamingResponse:
    job_id = job["id"]
    meta = next((m for m in jobs.checkpoints(job_id) if m["id"] == checkpoint_id), None)
    if meta is None:
        raise not_found("checkpoint", checkpoint_id, "checkpoint_id")
    root = Path(settings.data_dir).resolve()
    path = (root / meta["path"]).resolve()
    if root not in path.parents or not path.is_dir():
        raise APIError(
            410,
            f"checkpoint {checkpoint_id} is no longer on the data volume",
            param="checkpoint_id",
            code="checkpoint_gone",
        )
    name = f"{job_id}-step-{meta['step']}"
    return StreamingResponse(
        tar_stream(path, name),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar"'},
    )


@router.get("/{job_id}/integrations/{type}/content", responses=error_responses(404))
def integration_content(
    job: OwnedJob, kind: Annotated[str, PathParam(alias="type")], settings: SettingsDep
) -> StreamingResponse:
    """A tar of the run directory one of the job's trackers wrote (extension): W&B's offline
    run directories (``wandb sync`` them later), TensorBoard's event files, the MLflow
    store (or, with a remote tracking server, the id of the job's run there)."""
    job_id = job["id"]
    path = jobservice.integration_dir(job, kind, settings.data_dir)
    name = f"{job_id}-{kind}"
    return StreamingResponse(
        tar_stream(path, name, empty_dirs=True),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar"'},
    )


# A sample's id is ``ftsample-{step}-{n}``: its entry id in the job's samples stream.
_SAMPLE_ID = re.compile(r"ftsample-(\d{1,19})-(\d{1,19})")


@router.get("/{job_id}/samples", response_model=SamplePage, responses=error_responses(404))
def samples(
    job: OwnedJob,
    jobs: JobsDep,
    after: str | None = None,
    step: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    """Samples of an RL job's rollouts (extension): prompts, completions, each grader's
    reward and the advantages, oldest first. ``after`` is a sample id (the page starts after
    it, even once it has been dropped from the bounded stream), ``step`` keeps one step's
    samples. A job whose method records none answers an empty list."""
    cursor = None
    if after is not None:
        match = _SAMPLE_ID.fullmatch(after)
        if match is None:
            raise APIError(
                400,
                f"invalid sample cursor '{after}': give a sample's id (ftsample-<step>-<n>)",
                param="after",
                code="invalid_value",
            )
        cursor = f"{match[1]}-{match[2]}"
    rows, more = jobs.samples(job["id"], cursor, limit, step)
    return page([sample_object(sid, row) for sid, row in rows], more)


@router.get("/{job_id}/metrics", responses=error_responses(404))
def metrics(
    job: OwnedJob,
    jobs: JobsDep,
    after: int | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict:
    """Per-step training metrics, oldest first (extension; ``after`` is a step number)."""
    rows, more = jobs.metrics(job["id"], after, limit)
    return {"object": "list", "data": rows, "has_more": more}
