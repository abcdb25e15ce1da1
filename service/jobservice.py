"""Job creation and control: the logic behind the /fine_tuning/jobs routes.

Creation validates the body into a ``JobSpec``, checks the referenced files
exist and fit the method, honours an Idempotency-Key, writes the record and
enqueues. Every check happens before the record is written, so a bad request
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from celery import Celery
from pydantic import ValidationError

from service.errors import APIError, loc_to_param, not_found
from trainers.formats import DatasetError, iter_rows, read_as
from trainers.methods import METHODS, PLANNED_METHODS
from trainers.rows import RowFormat
from trainers.spec import JobSpec, grader_fields, normalize_method
from workers.celery_app import enqueue
from workers.filestore import FileNotFound, FileStore
from workers.store import InvalidTransition, JobNotFound, JobStatus, JobStore, new_id


def _check_method(body: dict[str, Any]) -> None:
    method = normalize_method(body.get("method"))
    mtype = method.get("type") if isinstance(method, dict) else None
    if mtype in METHODS:
        return
    available = ", ".join(METHODS)
    if mtype in PLANNED_METHODS:
        raise APIError(
            400,
            f"method '{mtype}' is not available yet in this posttrain release; "
            f"available: {available}",
            param="method.type",
            code="method_not_available",
        )
    raise APIError(
        400,
        f"unknown method type {mtype!r}; available: {available}",
        param="method.type",
        code="invalid_value",
    )


def parse_spec(body: dict[str, Any]) -> JobSpec:
    body = dict(body)
    if body.get("integrations"):
        raise APIError(400, "integrations are not supported by posttrain", param="integrations")
    body.pop("integrations", None)
    if "spec_version" in body:
        raise APIError(400, "spec_version is set by the server", param="spec_version")
    legacy = body.pop("hyperparameters", None)  # OpenAI's deprecated top-level field
    if legacy and not body.get("method"):
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": legacy}}
    _check_method(body)
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = loc_to_param(_user_loc(err["loc"]))
        raise APIError(
            400,
            f"{param or 'body'}: {err['msg'].removeprefix('Value error, ')}",
            param=param or None,
            code="invalid_value",
        ) from None


def check_files(spec: JobSpec, files: FileStore) -> None:
    """Each file exists, is for fine-tuning, and holds rows this method can train on."""
    accepted = type(spec.method).accepted_formats
    for param in ("training_file", "validation_file"):
        fid = getattr(spec, param)
        if fid is None:
            continue
        try:
            rec = files.get(fid)
        except FileNotFound:
            raise not_found("file", fid, param) from None
        if rec["purpose"] != "fine-tune":
            raise APIError(
                400,
                f"{param} {fid} has purpose '{rec['purpose']}', expected 'fine-tune'",
                param=param,
                code="invalid_file",
            )
        if not set(rec["formats"]) & set(accepted):
            raise APIError(
                400,
                f"{param} {fid} holds '{rec['format']}' rows, but method "
                f"'{spec.method_type}' needs {' or '.join(str(f) for f in accepted)} rows"
                + _first_misfit(files, fid, accepted),
                param=param,
                code="invalid_file",
            )
        _check_grader_fields(spec, fid, rec, param)
        _check_oreo_steps(spec, files, fid, param)


def _check_oreo_steps(spec: JobSpec, files: FileStore, fid: str, param: str) -> None:
    """A step-level OREO job needs every response split into steps: the first response
    without a step delimiter is a 400 naming its line (one scan of the file)."""
    if spec.method_type != "oreo":
        return
    hp = spec.method_hyperparameters()
    if hp.variant != "step":
        return
    delimiters = hp.step_delimiters
    with open(files.path(fid), "rb") as fh:
        for line, fits in iter_rows(fh, [RowFormat.scored]):
            row = fits[RowFormat.scored]
            response = row.response if hasattr(row, "response") else row.messages[-1].text()
            if not any(d in response for d in delimiters):
                raise APIError(
                    400,
                    f"{param} {fid}: line {line}: the response has no step delimiter "
                    f"({', '.join(repr(d) for d in delimiters)}); variant 'step' splits each "
                    "response into steps at step_delimiters: add them, or use variant 'token'",
                    param=param,
                    code="invalid_file",
                )


def _check_grader_fields(spec: JobSpec, fid: str, rec: dict, param: str) -> None:
    """Every ``{{item.x}}`` a grader reads must be a field of the file's rows."""
    have = set(rec["extra_fields"]) | {"prompt", "messages"}
    missing = sorted(f for f in grader_fields(spec.method) if f.split(".")[0] not in have)
    if missing:
        raise APIError(
            400,
            f"the graders read {', '.join('item.' + f for f in missing)}, but {param} {fid} "
            f"has no such field (its rows have: {', '.join(sorted(have & _row_fields(rec)))})",
            param=param,
            code="invalid_file",
        )


def _row_fields(rec: dict) -> set[str]:
    base = {"messages"} if "messages" in rec.get("format", "") else {"prompt"}
    return base | set(rec["extra_fields"])


def _first_misfit(files: FileStore, fid: str, accepted) -> str:
    """'': <the first line that fits none of ``accepted``, and why>' (a rescan, error path only)."""
    try:
        with open(files.path(fid), "rb") as fh:
            read_as(fh, accepted)
    except DatasetError as exc:
        return f": {exc}"
    except OSError:
        pass
    return ""


_BRANCHES = {"int", "float", "str", "bool", "function-after", "function-before"}


def _user_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch and discriminator-tag entries from an error location."""
    out = [p for p in loc if not (isinstance(p, str) and (p in _BRANCHES or "[" in p))]
    if len(out) > 2 and out[0] == "method" and out[1] == out[2]:
        del out[1]  # method.<tag>.<tag>.x -> method.<tag>.x
    return tuple(out)


def create_job(
    body: dict[str, Any],
    jobs: JobStore,
    files: FileStore,
    celery: Celery,
    queue: str,
    idempotency_key: str | None,
) -> tuple[str, bool]:
    """Return (job id, created). A replayed Idempotency-Key returns the first job."""
    spec = parse_spec(body)
    check_files(spec, files)
    job_id = new_id("ftjob")
    if idempotency_key:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        prior = jobs.remember_idempotency(idempotency_key, job_id, digest)
        if prior is not None:
            prior_id, prior_digest = prior.split("|", 1)
            if prior_digest != digest:
                raise APIError(
                    409,
                    "Idempotency-Key was already used with a different request",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                )
            _wait_for_record(jobs, prior_id)
            return prior_id, False
    jobs.create(job_id, spec.model_dump_json(), JobStatus.queued)
    jobs.add_event(job_id, f"Created fine-tuning job: {job_id}")
    try:
        enqueue(celery, job_id, queue)
    except Exception as exc:  # broker down: the job must not sit queued with no message
        jobs.transition(
            job_id,
            JobStatus.failed,
            error={
                "code": "enqueue_failed",
                "message": f"could not enqueue the job: {exc}",
                "param": None,
            },
        )
        raise APIError(
            503,
            f"job {job_id} could not be enqueued: {exc}",
            type="server_error",
            code="enqueue_failed",
        ) from exc
    jobs.add_event(job_id, "Job queued")
    return job_id, True


def _wait_for_record(jobs: JobStore, job_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not jobs.exists(job_id):
        if time.monotonic() > deadline:
            raise APIError(
                409,
                "a request with this Idempotency-Key is still being processed",
                param="Idempotency-Key",
                code="idempotency_key_in_use",
            )
        time.sleep(0.05)


def cancel_job(job_id: str, jobs: JobStore) -> None:
    prev = _move(job_id, jobs, JobStatus.cancelled, "cancelled")
    how = {
        "queued": " before it started",
        "validating_files": " before it started",
        "paused": " while paused",
    }.get(prev, "; its training process is being stopped")
    jobs.add_event(job_id, f"Job cancelled{how}")


def _move(job_id: str, jobs: JobStore, target: JobStatus, verb: str) -> str:
    try:
        return jobs.transition(job_id, target)
    except JobNotFound:
        raise not_found("fine-tuning job", job_id) from None
    except InvalidTransition as exc:
        raise APIError(
            400,
            f"job {job_id} is {exc.current} and cannot be {verb}",
            param="fine_tuning_job_id",
            code="invalid_state",
        ) from None


def pause_job(job_id: str, jobs: JobStore) -> None:
    """running -> pausing; the worker saves a checkpoint at the next step and parks the job."""
    _move(job_id, jobs, JobStatus.pausing, "paused")
    jobs.add_event(job_id, "Pause requested; the job will stop at the next step boundary")


def resume_job(job_id: str, jobs: JobStore, celery: Celery, queue: str) -> None:
    """paused -> queued; the next run resumes from the pause checkpoint."""
    _move(job_id, jobs, JobStatus.queued, "resumed")
    jobs.add_event(job_id, "Job resumed; queued to continue from its last checkpoint")
    enqueue(celery, job_id, queue)
