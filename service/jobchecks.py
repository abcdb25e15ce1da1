"""Creation-time checks of a parsed ``JobSpec`` against what exists: its judge, its
files and the workers of its queue. Each refusal is a 400 naming the field (a missing
or another tenant's file is a 404); a queue with no live worker yet is no refusal
(``check_workers`` returns the note the job's events get). Nothing here writes.
"""

from __future__ import annotations

from service.auth import DEFAULT, Tenant
from service.errors import APIError, not_found
from trainers.formats import DatasetError, iter_rows, read_as
from trainers.judges.spec import judge_item_fields
from trainers.rows import RowFormat
from trainers.spec import JobSpec, grader_fields
from workers.filestore import FileNotFound, FileStore
from workers.fleet import live_workers
from workers.launch import PlacementError, place
from workers.store import JobStore


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
