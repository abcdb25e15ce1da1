"""OpenAI's models API, for the fine-tuned models posttrain made: list, retrieve, delete.

A fine-tuned model is a succeeded job's ``fine_tuned_model``
(``ft:<base>:<suffix>:<job id>``); its weights are the job's final checkpoint.
Base models are whatever the worker can load (a local path or a Hub id) and are
not listed. Deleting a model removes its weights (the job's checkpoints on the
data volume) and marks the record ``model_deleted_at``: the job and its history
stay, the name stops resolving (here and as the base model of a new job), and
checkpoint downloads answer 410.
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from service.auth import Tenant
from service.deps import Auth, FilesDep, JobsDep, SettingsDep, TenantDep
from service.errors import not_found
from workers.store import JobNotFound, JobStatus, JobStore

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Auth])


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


def _model_record(jobs: JobStore, model_id: str, tenant: Tenant) -> dict:
    """The succeeded job that made ``model_id``, if ``tenant`` may see it; otherwise the
    same 404 as an unknown name."""
    job_id = model_id.rsplit(":", 1)[-1] if model_id.startswith("ft:") else ""
    try:
        rec = jobs.get(job_id) if job_id else None
    except JobNotFound:
        rec = None
    if (
        rec is None
        or not tenant.owns(rec)
        or rec.get("status") != JobStatus.succeeded
        or rec.get("fine_tuned_model") != model_id
        or rec.get("model_deleted_at")
    ):
        raise not_found("model", model_id, "model")
    return rec


def _model(rec: dict, organization_id: str) -> Model:
    created = rec.get("finished_at") or rec.get("created_at") or 0
    return Model(id=rec["fine_tuned_model"], created=int(float(created)), owned_by=organization_id)


@router.get("")
def list_models(jobs: JobsDep, settings: SettingsDep, tenant: TenantDep) -> dict:
    """The caller's fine-tuned models, newest first (OpenAI's list has no pagination)."""
    data = [
        _model(rec, settings.organization_id)
        for rec in jobs.fine_tuned_models()
        if tenant.owns(rec)
    ]
    return {"object": "list", "data": data}


@router.get("/{model_id:path}", response_model=Model)
def retrieve(model_id: str, jobs: JobsDep, settings: SettingsDep, tenant: TenantDep) -> Model:
    return _model(_model_record(jobs, model_id, tenant), settings.organization_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete(model_id: str, jobs: JobsDep, files: FilesDep, tenant: TenantDep) -> ModelDeleted:
    rec = _model_record(jobs, model_id, tenant)
    jobs.set_fields(rec["id"], model_deleted_at=int(time.time()))
    files.delete_checkpoints(rec["id"])
    return ModelDeleted(id=model_id, deleted=True)
