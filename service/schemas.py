"""OpenAI API objects, built from Redis records.

Every object carries every field the official ``openai`` SDK's model declares
(``FineTuningJob``, ``FileObject``, ``FineTuningJobEvent``,
``FineTuningJobCheckpoint``); posttrain's extensions are extra fields in the
same objects (``training_type``, ``resources``, ``suffix``, ``attempt``), or objects of
their own (``JobSample``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from trainers.contract.spec import stored_spec_view


def _omitted_when_null(description: str = ""):
    """An optional field OpenAI's API leaves out, rather than sending null, when unset."""
    return Field(None, exclude_if=lambda v: v is None, description=description or None)


class ErrorInfo(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: ErrorInfo | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = []
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    # extensions
    suffix: str | None = None
    training_type: str
    resources: dict[str, Any]
    attempt: int = 0
    step: int | None = Field(
        None, description="The newest training step the job reported (null before the first)."
    )
    total_steps: int | None = Field(None, description="The steps the job's run will train.")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = _omitted_when_null("When the file is deleted (expires_after).")
    status_details: str | None = _omitted_when_null()
    # extensions
    format: str | None = None
    rows: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: Any = _omitted_when_null()
    type: Literal["message", "metrics"] = "message"


class CheckpointMetrics(BaseModel):
    """Every metric is optional in OpenAI's schema: one not measured is left out."""

    step: float | None = _omitted_when_null()
    train_loss: float | None = _omitted_when_null()
    train_mean_token_accuracy: float | None = _omitted_when_null()
    valid_loss: float | None = _omitted_when_null()
    valid_mean_token_accuracy: float | None = _omitted_when_null()
    full_valid_loss: float | None = _omitted_when_null()
    full_valid_mean_token_accuracy: float | None = _omitted_when_null()
    # extensions: mean grader reward (GRPO family) on training and validation prompts
    train_mean_reward: float | None = _omitted_when_null()
    valid_mean_reward: float | None = _omitted_when_null()
    # extension: the pass rate of the job's eval run on this checkpoint (spec field ``eval``)
    eval_pass_rate: float | None = _omitted_when_null()


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class JobSample(BaseModel):
    """Extension: one sampled completion of an RL job's rollout batch, with its scores."""

    id: str
    object: Literal["fine_tuning.job.sample"] = "fine_tuning.job.sample"
    created_at: int
    step: int = Field(description="The optimizer step the rollout batch trained.")
    prompt: str = Field(description="The prompt's tokens as the model saw them, decoded.")
    completion: str = Field(description="The completion's text as the graders read it.")
    reward: float | None = Field(description="The graders' rewards, weighted and summed.")
    rewards: dict[str, float | None] = Field(description="Each grader's reward, by name.")
    advantage: float | None = Field(description="The advantage the loss used.")
    group: int | None = Field(None, description="The prompt's group in the rollout batch.")
    completion_tokens: int | None = None
    truncated: bool | None = Field(None, description="Cut at max_completion_length.")
    tool_calls: list[dict[str, Any]] | None = Field(
        None,
        description="A job with tools: the episode's calls in order, each {name, arguments, "
        "result}, result being the text the model read back.",
    )


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class SamplePage(Page):
    """A page of an RL job's samples (extension)."""

    data: list[JobSample]


class FilePage(Page):
    """OpenAI's file list: ``first_id``/``last_id`` are strings even on an empty page
    (``""`` there; the other lists send null, as their schemas allow)."""

    first_id: str
    last_id: str


def page(items: list[BaseModel], has_more: bool, empty_id: str | None = None) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0].id if items else empty_id,
        "last_id": items[-1].id if items else empty_id,
    }


def _int(value: str | None) -> int | None:
    return int(float(value)) if value not in (None, "", "None") else None


def _resources(requested: dict[str, Any], placement: str | None) -> dict[str, Any]:
    """The job's resources as requested; once a worker placed it, the GPU and process
    counts it resolved (a default ``gpus`` is 0 on a CPU-only worker, never shown as 1)."""
    if not placement:
        return requested
    placed = json.loads(placement)
    return {**requested, "gpus": placed["gpus"], "processes": placed["processes"]}


def job_object(rec: dict[str, str], organization_id: str) -> FineTuningJob:
    spec = stored_spec_view(rec["spec"])  # never fails, even on a record of an older release
    method = spec["method"]
    config = method.get(method.get("type"), {}) if isinstance(method, dict) else {}
    hps = config.get("hyperparameters", {}) if isinstance(config, dict) else {}
    error = json.loads(rec["error"]) if rec.get("error") else None
    status = rec["status"]
    return FineTuningJob(
        id=rec["id"],
        created_at=_int(rec["created_at"]),
        error=error,
        fine_tuned_model=rec.get("fine_tuned_model") or None,
        finished_at=_int(rec.get("finished_at")),
        hyperparameters={
            k: hps[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if k in hps
        },
        model=spec["model"],
        organization_id=organization_id,
        seed=spec["seed"] or 0,
        status=status,
        trained_tokens=_int(rec.get("trained_tokens")),
        training_file=spec["training_file"],
        validation_file=spec["validation_file"],
        estimated_finish=_int(rec.get("estimated_finish")) if status == "running" else None,
        integrations=spec.get("integrations") or [],
        metadata=spec["metadata"],
        method=method,
        suffix=spec["suffix"],
        training_type=spec["training_type"],
        resources=_resources(spec["resources"], rec.get("placement")),
        attempt=_int(rec.get("attempt")) or 0,
        step=_int(rec.get("step")),
        total_steps=_int(rec.get("total_steps")),
    )


def file_object(rec: dict[str, Any]) -> FileObject:
    return FileObject(
        id=rec["id"],
        bytes=rec["bytes"],
        created_at=rec["created_at"],
        filename=rec["filename"],
        purpose=rec["purpose"],
        status=rec["status"],
        expires_at=rec.get("expires_at"),
        format=rec.get("format"),
        rows=rec.get("rows"),
    )


def event_object(stream_id: str, fields: dict[str, str]) -> JobEvent:
    data = json.loads(fields["data"]) if fields.get("data") else None
    return JobEvent(
        id=f"ftevent-{stream_id}",
        created_at=int(fields["created_at"]),
        level=fields.get("level", "info"),
        message=fields["message"],
        data=data,
        type=fields.get("type", "message"),
    )


def checkpoint_object(job_id: str, meta: dict[str, Any]) -> JobCheckpoint:
    return JobCheckpoint(
        id=meta["id"],
        created_at=meta["created_at"],
        fine_tuned_model_checkpoint=meta["fine_tuned_model_checkpoint"],
        fine_tuning_job_id=job_id,
        metrics=CheckpointMetrics(**meta["metrics"]),
        step_number=meta["step"],
    )


def sample_object(stream_id: str, row: dict[str, Any]) -> JobSample:
    return JobSample.model_validate({**row, "id": f"ftsample-{stream_id}"})
