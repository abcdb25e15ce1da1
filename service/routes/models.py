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

from service.deps import Auth, FilesDep, JobsDep, OwnedModel, SettingsDep, TenantDep
from service.errors import error_responses

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Auth],
    responses=error_responses(400, 503),
)


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


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


@router.get("/{model_id:path}", response_model=Model, responses=error_responses(404))
def retrieve(rec: OwnedModel, settings: SettingsDep) -> Model:
    return _model(rec, settings.organization_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=error_responses(404, 500))
def delete(rec: OwnedModel, jobs: JobsDep, files: FilesDep) -> ModelDeleted:
    files.delete_checkpoints(rec["id"])  # first: a failed removal leaves the model listed
    jobs.set_fields(rec["id"], model_deleted_at=int(time.time()))
    return ModelDeleted(id=rec["fine_tuned_model"], deleted=True)
