"""Job creation and control: the logic behind the /fine_tuning/jobs routes.

Creation validates the body into a ``JobSpec``, checks the referenced files
exist and fit the method, honours an Idempotency-Key, writes the record and
enqueues. Every check happens before the record is written, so a bad request
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from typing import Any

from celery import Celery
from pydantic import ValidationError

from service.auth import DEFAULT, Tenant
from service.errors import APIError, loc_to_param, not_found
from service.modelaccess import ModelAccess
from trainers.formats import DatasetError, iter_rows, read_as
from trainers.judges.spec import JUDGE_TYPES, judge_item_fields
from trainers.methods import GRADERS, METHODS, PLANNED_METHODS
from trainers.rows import RowFormat
from trainers.spec import JobSpec, grader_fields, normalize_method, stored_spec_view
from workers.celery_app import enqueue
from workers.filestore import FileNotFound, FileStore
from workers.fleet import job_queue, live_workers
from workers.launch import PlacementError, place
from workers.store import InvalidTransition, JobNotFound, JobStatus, JobStore, new_id


def _check_method(body: dict[str, Any]) -> None:
    raw = body.get("method")
    if isinstance(raw, dict) and not isinstance(raw.get("type"), str):
        raise APIError(
            400,
            f"method.type must be a string naming the method; available: {', '.join(METHODS)}",
            param="method.type",
            code="invalid_value",
        )
    method = normalize_method(raw)
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


# Integers beyond this are no setting's value, and would overflow a float or a C long.
_MAX_INT = 2**63 - 1


def check_numbers(value: Any) -> None:
    """Refuse NaN, Infinity and out-of-range integers anywhere in a request body (JSON
    has no NaN, but Python's parser accepts it), and NUL characters in its strings (no
    name, path or text needs one): a 400 naming the first such field."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, float) and not math.isfinite(v):
            raise APIError(
                400,
                f"{path or 'body'}: NaN and Infinity are not valid numbers",
                param=path or None,
                code="invalid_value",
            )
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT:
            raise APIError(
                400,
                f"{path or 'body'}: the number is out of range",
                param=path or None,
                code="invalid_value",
            )
        elif isinstance(v, str) and "\x00" in v:
            raise APIError(
                400,
                f"{path or 'body'}: a NUL character is not allowed in a string",
                param=path or None,
                code="invalid_value",
            )
        if isinstance(v, dict) and any("\x00" in str(k) for k in v):
            raise APIError(
                400,
                f"{path or 'body'}: a NUL character is not allowed in a field name",
                param=path or None,
                code="invalid_value",
            )


NO_FILTER: Any = object()


def metadata_filter(query: list[tuple[str, str]]) -> Any:
    """OpenAI's job-list filter from the query string: ``metadata[k]=v`` pairs (a dict),
    ``metadata=null`` (None: jobs without metadata), or ``NO_FILTER``."""
    pairs: dict[str, str] = {}
    null = False
    for key, value in query:
        if key == "metadata":
            if value != "null":
                raise APIError(
                    400,
                    "filter on metadata with metadata[key]=value, or metadata=null for jobs "
                    "without metadata",
                    param="metadata",
                    code="invalid_value",
                )
            null = True
        elif key.startswith("metadata[") and key.endswith("]"):
            pairs[key[len("metadata[") : -1]] = value
    if null and pairs:
        raise APIError(
            400,
            "use either metadata[key]=value or metadata=null, not both",
            param="metadata",
            code="invalid_value",
        )
    return None if null else (pairs or NO_FILTER)


def list_jobs(
    jobs: JobStore, after: str | None, limit: int, tenant: str | None, wanted: Any = NO_FILTER
) -> tuple[list[dict], bool]:
    """A page of job records, newest first, keeping those ``wanted`` (``metadata_filter``)."""
    if wanted is NO_FILTER:
        ids, more = jobs.list_ids(after, limit, tenant)
        return [jobs.get(i) for i in ids], more
    out: list[dict] = []
    cursor = after
    while True:
        ids, more = jobs.list_ids(cursor, max(limit + 1, 200), tenant)
        for job_id in ids:
            try:
                rec = jobs.get(job_id)
            except JobNotFound:
                continue  # deleted meanwhile
            meta = stored_spec_view(rec["spec"])["metadata"]
            if wanted is None:
                hit = meta is None
            else:
                hit = meta is not None and all(meta.get(k) == v for k, v in wanted.items())
            if hit:
                out.append(rec)
                if len(out) > limit:
                    return out[:limit], True
        if not more or not ids:
            return out, False
        cursor = ids[-1]


def parse_spec(body: dict[str, Any]) -> JobSpec:
    check_numbers(body)
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
        # strict: "3" and true are not numbers, 1 is not a boolean (JSON's own types only)
        return JobSpec.model_validate_json(json.dumps(body), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = loc_to_param(_user_loc(err["loc"]))
        raise APIError(
            400,
            f"{param or 'body'}: {err['msg'].removeprefix('Value error, ')}",
            param=param or None,
            code="invalid_value",
        ) from None


def check_judge(spec: JobSpec) -> None:
    """An EGPO job's judge passes the judges' creation-time checks (torch-free: a model
    path that does not load, a bad pattern...): a 400 naming the judge field otherwise."""
    if spec.method_type != "egpo":
        return
    if spec.validation_file is not None:
        raise APIError(
            400,
            "method 'egpo' has no validation pass (its answers are sampled and judged online); "
            "drop validation_file",
            param="validation_file",
            code="invalid_value",
        )
    from trainers.judges.validate import validate_judge

    base = "method.egpo.hyperparameters.judge"
    try:
        validate_judge(spec.method_hyperparameters().judge, base)
    except ValueError as exc:
        param = getattr(exc, "param", None) or base
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def check_files(spec: JobSpec, files: FileStore, tenant: Tenant = DEFAULT) -> None:
    """Each file exists, is the caller's, is for fine-tuning, and holds rows this method
    can train on. Another tenant's file is answered exactly like a missing one."""
    accepted = type(spec.method).accepted_formats
    for param in ("training_file", "validation_file"):
        fid = getattr(spec, param)
        if fid is None:
            continue
        try:
            rec = files.get(fid)
        except FileNotFound:
            raise not_found("file", fid, param) from None
        if not tenant.owns(rec):
            raise not_found("file", fid, param)
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
    reads = grader_fields(spec.method)
    if spec.method_type == "egpo":  # a grader judge reads the prompt's row too
        reads |= judge_item_fields(spec.method_hyperparameters().judge)
    missing = sorted(f for f in reads if f.split(".")[0] not in have)
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


_BRANCHES = {
    "int",
    "float",
    "str",
    "bool",
    "function-after",
    "function-before",
    "constrained-int",
    "constrained-float",
}


def _user_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch and discriminator-tag entries from an error location."""
    out = [p for p in loc if not (isinstance(p, str) and (p in _BRANCHES or "[" in p))]
    if len(out) > 2 and out[0] == "method" and out[1] == out[2]:
        del out[1]  # method.<tag>.<tag>.x -> method.<tag>.x
    # judge.<type>.x -> judge.x, grader.<type>.x -> grader.x
    tags = {"judge": JUDGE_TYPES, "grader": GRADERS}
    out = [p for i, p in enumerate(out) if not (i and p in tags.get(out[i - 1], ()))]
    return tuple(out)


def create_job(
    body: dict[str, Any],
    jobs: JobStore,
    files: FileStore,
    celery: Celery,
    queue: str,
    idempotency_key: str | None,
    *,
    tenant: Tenant = DEFAULT,
    access: ModelAccess | None = None,
) -> tuple[str, bool]:
    """Return (job id, created). A replayed Idempotency-Key returns the first job.

    The job belongs to ``tenant``; ``access`` decides which models it may load (every
    model the spec names is resolved before anything is written)."""
    spec = parse_spec(body)
    models = access.check_spec(spec, tenant) if access is not None else None
    check_judge(spec)
    check_files(spec, files, tenant)
    queue = spec.resources.queue or queue
    waiting = check_workers(spec, jobs, queue)
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
    record = {"tenant": tenant.name, **(models.record_fields() if models else {})}
    if idempotency_key:  # DELETE of the job releases the key (JobStore.delete_job)
        record["idempotency_key"] = idempotency_key
    with _quota_slot(jobs, tenant, job_id, idempotency_key):
        jobs.create(job_id, spec.model_dump_json(), JobStatus.queued, **record)
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
    if waiting:
        jobs.add_event(job_id, waiting, level="warn")
    return job_id, True


def check_workers(spec: JobSpec, jobs: JobStore, queue: str) -> str | None:
    """The job's queue against the workers live on it (``workers.fleet``). None live: the
    job is accepted and waits (workers can join later); the returned note says for what.
    Some live, none able to run it (too few GPUs, strategy not installed): a 400."""
    res = spec.resources
    workers = live_workers(jobs.r, jobs.p, queue)
    if not workers:
        need = f"{res.gpus} GPU(s)" if res.gpus else "CPU" if res.gpus == 0 else "any devices"
        return (
            f"No worker is live on queue '{queue}' yet; the job waits for a worker "
            f"({need}, strategy {res.strategy}) to join the queue"
        )
    problems, param = [], "resources"
    for w in workers:
        try:
            place(res, w["gpus"], w["strategies"])
            return None
        except PlacementError as exc:
            problems.append(f"{w['name']}: {exc}")
            param = f"resources.{exc.field}"
    raise APIError(
        400,
        f"resources: no live worker of queue '{queue}' can run this job ("
        + "; ".join(problems)
        + ")",
        param=param,
        code="invalid_value",
    )


@contextmanager
def _quota_slot(jobs: JobStore, tenant: Tenant, job_id: str, idempotency_key: str | None):
    """Hold the tenant's quota lock while its active jobs are counted and the new one is
    written, so two concurrent requests cannot both take the last slot. A refusal is a
    429 (``quota_exceeded``), and releases the Idempotency-Key it had bound."""
    if tenant.max_active_jobs is None:
        yield
        return
    with jobs.r.lock(f"{jobs.p}tenant:{tenant.name}:quota-lock", timeout=30, blocking_timeout=10):
        active = jobs.active_count(tenant.name)
        if active >= tenant.max_active_jobs:
            if idempotency_key:
                jobs.forget_idempotency(idempotency_key, job_id, tenant.name)
            raise APIError(
                429,
                f"tenant '{tenant.name}' has {active} active jobs (queued, running, pausing "
                f"or paused) and a quota of {tenant.max_active_jobs}; cancel one or wait for "
                "one to finish",
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


def cancel_job(job_id: str, jobs: JobStore) -> None:
    prev = _move(job_id, jobs, JobStatus.cancelled, "cancelled")
    how = {
        "queued": " before it started",
        "validating_files": " before it started",
        "paused": " while paused",
    }.get(prev, "; its training process is being stopped")
    jobs.add_event(job_id, f"Job cancelled{how}")


def _move(
    job_id: str,
    jobs: JobStore,
    target: JobStatus,
    verb: str,
    expect: set[JobStatus] | None = None,
) -> str:
    try:
        return jobs.transition(job_id, target, expect=expect)
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
    """paused -> queued, and only that: the next run resumes from the pause checkpoint.

    (running/pausing -> queued is the worker's move when a run is lost, never the API's.)
    If the enqueue fails the job stays queued and the workers' reconciler sends it."""
    _move(job_id, jobs, JobStatus.queued, "resumed", expect={JobStatus.paused})
    jobs.add_event(job_id, "Job resumed; queued to continue from its last checkpoint")
    queue = job_queue(jobs, job_id, queue)
    try:
        enqueue(celery, job_id, queue)
    except Exception as exc:  # the reconciler re-enqueues a queued job with no message
        jobs.add_event(
            job_id, f"Enqueue failed ({exc}); a worker's reconciler will send it", level="warn"
        )
