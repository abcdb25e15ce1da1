"""Creation-time checks of a parsed ``JobSpec`` against what exists: the method's own
checks, its files, its queue and the workers of that queue. Each refusal is a 400 naming
the field (a missing or another tenant's file is a 404); a queue the server offers but no
live worker serves yet is no refusal (``check_workers`` returns the note the job's events
get). Nothing here writes.

Nothing here knows which method a job holds: each method's contract model
(``trainers.contract.methods``) brings its own hooks, called the same way for all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from service.auth import DEFAULT, Tenant
from service.deps import owned_file
from service.errors import APIError
from trainers.contract.errors import JobError
from trainers.contract.formats import DatasetError, iter_rows, read_as
from trainers.contract.graders.patterns import PatternError, check_compiles, patterns_in
from trainers.contract.graders.python import python_params, refusal
from trainers.contract.graders.remote import endpoint_urls
from trainers.contract.hparams import ROLLOUT_ENGINES, RolloutEngine
from trainers.contract.integrations import TrackerPolicy
from trainers.contract.outbound import AddressRefused, ToolPolicy
from trainers.contract.sandbox import SandboxPolicy
from trainers.contract.spec import JobSpec
from workers.filestore import FileStore
from workers.fleet import live_queues, live_workers
from workers.placement import PlacementError, place
from workers.store import JobStore


def _refusal(exc: JobError) -> APIError:
    return APIError(400, exc.message, param=exc.param, code=exc.code)


def check_method(spec: JobSpec, judges: Collection[str] = ()) -> None:
    """The method's own creation-time checks (a judge's model directory, a field it
    cannot take; ``judges``: the models the server's judge endpoints serve): a 400 naming
    the field."""
    try:
        spec.method.check_request(validation_file=spec.validation_file, judges=judges)
    except JobError as exc:
        raise _refusal(exc) from None


def check_integrations(spec: JobSpec, policy: TrackerPolicy) -> None:
    """The job's trackers against what the server runs (W&B's mode, the MLflow tracking
    URIs it allows): a 400 naming the field."""
    try:
        policy.check(spec.integrations)
    except JobError as exc:
        raise _refusal(exc) from None


def check_tools(spec: JobSpec, policy: ToolPolicy) -> None:
    """Every tool endpoint, environment and endpoint grader of an RL job against the
    server's outbound policy (its allow-list of URL prefixes, and no loopback, private or
    link-local address unless the server allows that network): a 400 naming the ``url``."""
    block = spec.method.block
    base = f"method.{spec.method.type}"
    urls = [
        (tool.endpoint.url, f"{base}.tools[{i}].endpoint.url")
        for i, tool in enumerate(getattr(block, "tools", None) or [])
    ]
    if getattr(block, "environment", None) is not None:
        urls.append((block.environment.url, f"{base}.environment.url"))
    if hasattr(block, "graders_with_params"):
        pairs = block.graders_with_params(base)  # none when the environment scores alone
        urls += endpoint_urls([g for g, _ in pairs], [p for _, p in pairs])
    for url, param in urls:
        try:
            policy.check(url)
        except AddressRefused as exc:
            raise APIError(400, f"{param}: {exc}", param=param, code="invalid_url") from None


def check_python(spec: JobSpec, sandbox: SandboxPolicy) -> None:
    """A python grader of an RL job (or EGPO's grader judge), on a server whose python
    grader is off: a 400 naming the grader. (Where it is on, the trainer probes the
    sandbox before grading.)"""
    block, base = spec.method.block, f"method.{spec.method.type}"
    pairs = []
    if hasattr(block, "graders_with_params"):
        pairs = block.graders_with_params(base)  # none: environment only
    judge = getattr(spec.method.hyperparameters, "judge", None)
    if getattr(judge, "type", None) == "grader":  # EGPO's grader judge
        pairs = [*pairs, (judge.grader, f"{base}.hyperparameters.judge.grader")]
    found = python_params([g for g, _ in pairs], [p for _, p in pairs])
    why = refusal(sandbox)
    if found and why:
        raise APIError(400, f"{found[0]}: {why}", param=found[0], code="unsupported_grader")


def check_patterns(spec: JobSpec, run: Callable[..., Any] | None = None) -> None:
    """Every user regex of the method (regex graders, pattern-table judges) compiles
    within its limits, compiled in a bounded child process (waited for through ``run``,
    the grader pool's ``call``): a 400 naming the field."""
    found = patterns_in(spec.model_dump(mode="json")["method"], "method")
    if not found:
        return
    try:
        if run is None:
            check_compiles(found)
        else:
            run(check_compiles, found)
    except PatternError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None


def check_files(spec: JobSpec, files: FileStore, tenant: Tenant = DEFAULT) -> None:
    """Each file exists, is the caller's, is for fine-tuning, and holds rows this method
    can train on. Another tenant's file is answered exactly like a missing one."""
    accepted = type(spec.method).accepted_formats
    for param in ("training_file", "validation_file"):
        fid = getattr(spec, param)
        if fid is None:
            continue
        rec = owned_file(files, fid, tenant, param)
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
        _check_item_fields(spec, fid, rec, param)
        _check_rows(spec, files, fid, rec, param)


def _check_rows(spec: JobSpec, files: FileStore, fid: str, rec: dict, param: str) -> None:
    """A method that must see every row (OREO's step variant: every response split into
    steps) scans the file once, in the format it will be trained as: a 400 naming the
    first line it refuses."""
    if not spec.method.scans_rows():
        return
    fmt = next(f for f in spec.method.accepted_formats if f in rec["formats"])
    with open(files.path(fid), "rb") as fh:
        rows = ((line, fits[fmt]) for line, fits in iter_rows(fh, [fmt]))
        try:
            spec.method.check_rows(rows, f"{param} {fid}")
        except JobError as exc:
            raise APIError(400, exc.message, param=param, code="invalid_file") from None


def _check_item_fields(spec: JobSpec, fid: str, rec: dict, param: str) -> None:
    """Every ``{{item.x}}`` the method's graders (or judge) read must be a field of the
    file's rows."""
    have = set(rec["extra_fields"]) | {"prompt", "messages"}
    reads = spec.method.item_fields()
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


def check_queue(
    spec: JobSpec, jobs: JobStore, default: str, offered: frozenset[str], tenant: Tenant = DEFAULT
) -> tuple[str, set[str]]:
    """The job's queue (its ``resources.queue``, else ``default``) must be one the server
    offers (``offered``: POSTTRAIN_QUEUE and POSTTRAIN_QUEUES) or a live worker serves,
    and one the tenant may use: a 400 naming the queues it may use otherwise. Returns
    (the queue, the queues live workers serve)."""
    queue = spec.resources.queue or default
    live = live_queues(jobs.r, jobs.p)
    usable = sorted(q for q in offered | live if tenant.may_use(q))
    if queue in usable:
        return queue, live
    what = "the default queue " if spec.resources.queue is None else ""
    raise APIError(
        400,
        f"resources.queue: {what}'{queue}' is not a queue you may use; "
        + (f"use one of: {', '.join(usable)}" if usable else "no queue is open to you"),
        param="resources.queue",
        code="invalid_value",
    )


def check_workers(spec: JobSpec, jobs: JobStore, queue: str, unserved_seconds: float) -> str | None:
    """The job's queue against the workers live on it (``workers.fleet``). None live: the
    job is accepted and waits (workers can join later); the returned note says for what,
    and how long before it fails. Some live, none able to run it (too few GPUs, strategy
    not installed, no vLLM for a job whose rollout_engine is 'vllm'): a 400."""
    res = spec.resources
    workers = live_workers(jobs.r, jobs.p, queue)
    if not workers:
        need = f"{res.gpus} GPU(s)" if res.gpus else "CPU" if res.gpus == 0 else "any devices"
        return (
            f"No worker is live on queue '{queue}' yet; the job waits for a worker "
            f"({need}, strategy {res.strategy}) to join the queue, and fails if none serves "
            f"it within {unserved_seconds:g} s. It does not count towards the tenant's "
            "active jobs while it waits"
        )
    hp = spec.method.hyperparameters
    engine = hp.needs_engine if isinstance(hp, RolloutEngine) else None
    problems, param, where = [], "resources", "resources"
    for w in workers:
        try:
            place(res, w["gpus"], w["strategies"])
        except PlacementError as exc:
            problems.append(f"{w['name']}: {exc}")
            param = f"resources.{exc.field}"
            continue
        if engine is None or engine in w.get("engines", [engine]):  # none listed: unchecked
            return None
        problems.append(f"{w['name']} {ROLLOUT_ENGINES[engine]}")
        param = where = f"method.{spec.method.type}.hyperparameters.rollout_engine"
    raise APIError(
        400,
        f"{where}: no live worker of queue '{queue}' can run this job ("
        + "; ".join(problems)
        + ")",
        param=param,
        code="invalid_value",
    )
