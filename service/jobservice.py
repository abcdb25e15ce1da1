"""Job creation and control: the logic behind the /fine_tuning/jobs routes' writes.

Creation reads the body into a ``JobSpec`` (``service.jobrequest``), resolves the
models it names, runs the checks against its judge, files and workers
(``service.jobchecks``), honours an Idempotency-Key and the tenant's quota, writes the
record and enqueues. Every check happens before the record is written, so a bad
request leaves nothing behind. Cancel, pause and resume move a job's status. (Lists
are ``service.joblist``.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery

from service.auth import DEFAULT, Tenant
from service.errors import APIError, not_found
from service.graderpool import GraderPool
from service.jobchecks import (
    check_files,
    check_integrations,
    check_method,
    check_patterns,
    check_python,
    check_queue,
    check_tools,
    check_workers,
)
from service.jobrequest import parse_spec
from service.modelaccess import ModelAccess
from service.settings import ApiSettings
from trainers.contract.environments import split_environment_secrets
from trainers.contract.graders.remote import split_grader_secrets
from trainers.contract.integrations import INTEGRATION_TYPES
from trainers.contract.jobdir import JobDir
from trainers.contract.spec import JobSpec, stored_spec_view
from trainers.contract.tools import split_secrets
from workers.celery_app import enqueue
from workers.filestore import FileStore
from workers.fleet import job_queue
from workers.store import (
    TERMINAL,
    InvalidTransition,
    JobNotFound,
    JobStatus,
    JobStore,
    encode,
    new_id,
)

log = logging.getLogger("posttrain.api")


def create_job(
    body: dict[str, Any],
    jobs: JobStore,
    files: FileStore,
    celery: Celery,
    settings: ApiSettings,
    idempotency_key: str | None,
    *,
    tenant: Tenant = DEFAULT,
    access: ModelAccess | None = None,
    graders: GraderPool | None = None,
    check_eval: Callable[[Any], None] | None = None,
) -> tuple[str, bool]:
    """Return (job id, created). A replayed Idempotency-Key returns the first job.

    The job belongs to ``tenant``; ``access`` decides which models it may load (every
    model the spec names is resolved before anything is written); ``check_eval`` checks
    the spec's eval per checkpoint (``service.routes.evalruns.check_job_eval``)."""
    spec = parse_spec(body)
    models = access.check_spec(spec, tenant) if access is not None else None
    check_method(spec, settings.judges().models())
    check_integrations(spec, settings.tracker_policy())
    check_tools(spec, tenant.tool_policy(settings.tool_policy()))
    check_python(spec, settings.sandbox_policy())
    check_patterns(spec, None if graders is None else functools.partial(graders.call, tenant))
    check_files(spec, files, tenant)
    if spec.eval is not None and check_eval is not None:
        check_eval(spec.eval)
    queue, live = check_queue(spec, jobs, settings.queue, settings.queue_names(), tenant)
    waiting = check_workers(spec, jobs, queue, settings.unserved_queue_seconds)
    job_id = new_id("ftjob")
    if idempotency_key:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        prior = jobs.remember_idempotency(idempotency_key, job_id, digest, tenant=tenant.name)
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
    record = {"tenant": tenant.name, "queue": queue, **(models.record_fields() if models else {})}
    if idempotency_key:  # DELETE of the job releases the key (JobStore.delete_job)
        record["idempotency_key"] = idempotency_key
    outbound = tenant.outbound()
    if not outbound.empty:  # the worker puts the tenant's rules in the run plan
        record["outbound"] = outbound.model_dump()
    if spec.eval is not None:  # its checkpoint runs get the tenant's grading slots
        record["eval_runs_limit"] = tenant.eval_run_slots(settings.eval_runs_per_tenant)
    spec, secrets = _without_secrets(spec)
    with _quota_slot(jobs, tenant, job_id, idempotency_key, live):
        jobs.create(job_id, spec.model_dump_json(), JobStatus.queued, secrets=secrets, **record)
    jobs.add_event(job_id, f"Created fine-tuning job: {job_id}")
    try:
        enqueue(celery, job_id, queue)
    except Exception as exc:  # broker down: the job must not sit queued with no message
        log.error("job %s could not be enqueued on %s: %r", job_id, queue, exc)
        message = "the job could not be sent to its workers (the message broker failed)"
        jobs.transition(
            job_id,
            JobStatus.failed,
            error={"code": "enqueue_failed", "message": message, "param": None},
        )
        raise APIError(
            503,
            f"job {job_id} failed: {message}; retry the request",
            type="server_error",
            code="enqueue_failed",
        ) from exc
    jobs.add_event(job_id, "Job queued")
    if waiting:
        jobs.add_event(job_id, waiting, level="warn")
    return job_id, True


def _without_secrets(spec: JobSpec) -> tuple[JobSpec, dict[str, Any] | None]:
    """The spec as stored (the header values of its tools, environment and endpoint
    graders replaced by ``[redacted]``) and those values, kept in the job's own secrets
    key (``JobStore.create``)."""
    block = spec.method.block
    update: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    if getattr(block, "tools", None):
        update["tools"], secrets["tool_headers"] = split_secrets(block.tools)
    if getattr(block, "environment", None) is not None:
        update["environment"], env_headers = split_environment_secrets(block.environment)
        if env_headers:
            secrets["environment_headers"] = env_headers
    graders = block.grader_list() if hasattr(block, "grader_list") else []
    stored, grader_headers = split_grader_secrets(graders)
    if grader_headers:
        secrets["grader_headers"] = grader_headers
        update.update(block.with_graders(stored))
    if not update:
        return spec, None
    method = spec.method.model_copy(update={spec.method.type: block.model_copy(update=update)})
    return spec.model_copy(update={"method": method}), secrets or None


@contextmanager
def _quota_slot(
    jobs: JobStore, tenant: Tenant, job_id: str, idempotency_key: str | None, live: set[str]
):
    """Hold the tenant's quota lock while its active jobs are counted and the new one is
    written, so two concurrent requests cannot both take the last slot. Jobs queued on a
    queue no live worker serves (``live``) do not count. A refusal is a 429
    (``quota_exceeded``), and releases the Idempotency-Key it had bound."""
    if tenant.max_active_jobs is None:
        yield
        return
    with jobs.r.lock(f"{jobs.p}tenant:{tenant.name}:quota-lock", timeout=30, blocking_timeout=10):
        active = jobs.active_count(tenant.name, served=live)
        if active >= tenant.max_active_jobs:
            if idempotency_key:
                jobs.forget_idempotency(idempotency_key, job_id, tenant.name)
            raise APIError(
                429,
                f"tenant '{tenant.name}' has {active} active jobs (queued on a served queue, "
                f"running, pausing or paused) and a quota of {tenant.max_active_jobs}; cancel "
                "one or wait for one to finish",
                type="rate_limit_error",
                code="quota_exceeded",
            )
        yield


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


def cancel_job(rec: dict, jobs: JobStore) -> dict:
    """Cancel the job of ``rec``; return the record as written."""
    job_id = rec["id"]
    prev, written = _move(rec, jobs, JobStatus.cancelled, "cancelled")
    how = {
        "queued": " before it started",
        "validating_files": " before it started",
        "paused": " while paused",
    }.get(prev, "; its training process is being stopped")
    jobs.add_event(job_id, f"Job cancelled{how}")
    return written


def _move(
    rec: dict,
    jobs: JobStore,
    target: JobStatus,
    verb: str,
    expect: set[JobStatus] | None = None,
) -> tuple[str, dict]:
    """Move the job of ``rec`` to ``target``; return its previous status and the record as
    this request wrote it (what the API answers, even if a worker moves the job on at
    once: a resumed job may be claimed before the answer is sent)."""
    job_id, now = rec["id"], time.time()
    written = {"updated_at": now, **({"finished_at": now} if target in TERMINAL else {})}
    try:
        prev = jobs.transition(job_id, target, expect=expect, **written)
    except JobNotFound:
        raise not_found("fine-tuning job", job_id) from None
    except InvalidTransition as exc:
        raise APIError(
            400,
            f"job {job_id} is {exc.current} and cannot be {verb}",
            param="fine_tuning_job_id",
            code="invalid_state",
        ) from None
    return prev, {**rec, "status": str(target), **{k: encode(v) for k, v in written.items()}}


def delete_job(job_id: str, jobs: JobStore, files: FileStore) -> None:
    """Remove a finished job's directory on the data volume, then its record, streams,
    checkpoint list and Idempotency-Key binding.

    The files go first: if they cannot all be removed (RemovalFailed, answered 500
    ``deletion_failed``) the record stays and the DELETE can be retried. A finished job
    never changes state again, so checking before removing is not racy."""
    try:
        status = jobs.status(job_id)
        if status is None:
            raise JobNotFound(job_id)
        if status not in TERMINAL:
            raise InvalidTransition(job_id, status, "deleted")
        files.delete_job_dir(job_id)
        jobs.delete_job(job_id)
    except JobNotFound:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id") from None
    except InvalidTransition as exc:
        raise APIError(
            400,
            f"job {job_id} is {exc.current}; only a finished job (succeeded, failed or "
            "cancelled) can be deleted: cancel it first",
            param="fine_tuning_job_id",
            code="invalid_state",
        ) from None


def pause_job(rec: dict, jobs: JobStore) -> dict:
    """queued -> paused at once (no worker starts it; its broker message, when delivered,
    finds it paused and is dropped), or running -> pausing: the worker saves a checkpoint
    at the next step boundary and parks the job."""
    try:
        _, written = _move(rec, jobs, JobStatus.paused, "paused", expect={JobStatus.queued})
    except APIError:  # not queued (or claimed meanwhile): pause a running job
        _, written = _move(rec, jobs, JobStatus.pausing, "paused")
        jobs.add_event(rec["id"], "Pause requested; the job will stop at the next step boundary")
        return written
    jobs.add_event(rec["id"], "Job paused before it started; resume queues it again")
    return written


def resume_job(rec: dict, jobs: JobStore, celery: Celery, queue: str) -> dict:
    """paused -> queued, and only that: the next run resumes from the pause checkpoint.

    (running/pausing -> queued is the worker's move when a run is lost, never the API's.)
    If the enqueue fails the job stays queued and the workers' reconciler sends it."""
    job_id = rec["id"]
    _, written = _move(rec, jobs, JobStatus.queued, "resumed", expect={JobStatus.paused})
    jobs.add_event(job_id, "Job resumed; queued to continue from its last checkpoint")
    queue = job_queue(jobs, job_id, queue)
    try:
        enqueue(celery, job_id, queue)
    except Exception as exc:  # the reconciler re-enqueues a queued job with no message
        log.warning("job %s could not be enqueued on resume: %r", job_id, exc)
        jobs.add_event(
            job_id,
            "Enqueue failed (the message broker); a worker's reconciler will send it",
            level="warn",
        )
    return written


def integration_dir(job: dict[str, str], kind: str, data_dir: Path) -> Path:
    """The directory the job's tracker ``kind`` writes (``trainers.contract.integrations``);
    a 404 naming what is missing: the type, the job's integration, or its run so far."""
    if kind not in INTEGRATION_TYPES:
        raise APIError(
            404,
            f"no integration type '{kind}'; types: {', '.join(INTEGRATION_TYPES)}",
            param="type",
            code="not_found",
        )
    kinds = [i.get("type") for i in stored_spec_view(job["spec"]).get("integrations") or ()]
    if kind not in kinds:
        raise APIError(
            404,
            f"fine-tuning job {job['id']} has no {kind} integration",
            param="type",
            code="not_found",
        )
    path = JobDir(data_dir, job["id"]).tracker(kind)
    if not path.is_dir() or path.is_symlink():
        raise APIError(
            404,
            f"fine-tuning job {job['id']} has no {kind} run yet (its tracker starts with training)",
            param="type",
            code="not_found",
        )
    return path
