"""OpenAI's Evals API, the runs: ``/v1/evals/{eval_id}/runs`` and their output items.

A run grades rows against its eval's testing criteria. Its ``data_source`` is ``jsonl``
(rows with their ``sample`` already present) or ``completions`` (the rows' items, an
``input_messages`` template, a ``model`` the caller may use and ``sampling_params``:
posttrain's inference samples each row). The rows are inline (``file_content``) or an
uploaded file of the caller's with purpose ``evals`` (``file_id``; one
``{"item": ..., "sample": ...}`` per line). The run is checked here and queued to the
workers as ``posttrain.run_eval`` (``workers.evaltasks``; ``workers.evalgrading`` states
the pass rule); cancel stops it between rows, delete removes it, its output items and
its events. At most ``POSTTRAIN_EVAL_RUNS_PER_TENANT`` runs of a tenant (its key-file
entry's ``max_concurrent_eval_runs`` where it has one) are graded at once; the limit is
recorded on the run when it is created, and the others wait ``queued``. A run's events
(``GET .../runs/{run_id}/events``, an extension in the shape of fine-tuning job events,
newest first) say what became of it: created, waiting for a slot, started or resumed
and on which worker, progress, requeued, canceled, completed or failed and why.

Checks, each a 400 naming the field (a model the caller cannot use: 404
``model_not_found``, as chat completions answer):

* every row's ``item`` satisfies the eval's ``item_schema`` (``type``, ``required``,
  ``properties``, ``items``, ``enum``): ``data_source.source.content[i].item.<field>``,
  or for a file the row's line;
* a jsonl run whose criteria read ``{{sample.*}}`` has a ``sample`` in every row; a
  completions run has none (it samples them);
* every ``{{item.x}}`` of the input template is declared by ``item_schema``, and an
  ``item_reference`` names a declared field;
* at most ``MAX_ITEMS`` rows;
* every model the criteria name is one the eval's tenant may still use, resolved again
  as at the eval's creation (``service.routes.evals.grading_plan``: a 400
  ``model_not_found`` naming ``testing_criteria[i].model``); the worker's spec carries
  how each criterion is graded (``grading``: a judge's inference header, a reward
  model's directory).

Departures from OpenAI's shapes, all within its SDK's types: ``error`` (of the run and
of an output item's sample) is an object always, ``{"code": "", "message": ""}`` when
there is none, because OpenAI's published schema makes it a required object; a sample
of a jsonl row reports the sampling fields the row did not carry as OpenAI's defaults
(temperature 1.0, top_p 1.0, seed 0, max_completion_tokens 0); ``report_url`` is this
API's URL of the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service.auth import Tenant
from service.deps import Auth, FilesDep, SettingsDep, TenantDep
from service.errors import error_responses, not_found
from service.evalsources import _bad, check_data_source
from service.jobrequest import check_numbers
from service.routes.evals import (
    MAX_NAME,
    OwnedEval,
    _check_metadata,
)
from service.schemas import Page, page
from service.settings import ApiSettings
from workers.celery_app import enqueue_eval_run
from workers.ckptevals import prune_job_checkpoints
from workers.evalruns import (
    NO_ERROR,
    USAGE,
    EvalRunNotFound,
    EvalRunStore,
    output_item_id,
    wake_waiting,
)

router = APIRouter(
    prefix="/v1/evals/{eval_id}/runs",
    tags=["evals"],
    dependencies=[Auth],
    responses=error_responses(400, 404, 503),
)

_STREAM_ID = re.compile(r"^\d+-\d+$")


# ---- objects
class EvalRunObject(BaseModel):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    name: str
    status: Literal["queued", "in_progress", "completed", "failed", "canceled"]
    model: str
    created_at: int
    metadata: dict[str, str]
    data_source: dict[str, Any] = Field(description="The data source, as given.")
    result_counts: dict[str, int] = Field(description="total, errored, failed, passed.")
    per_testing_criteria_results: list[dict[str, Any]]
    per_model_usage: list[dict[str, Any]]
    report_url: str
    error: dict[str, str] = Field(description="{code, message}; both empty when none.")


class EvalRunPage(Page):
    data: list[EvalRunObject]


class EvalRunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool
    run_id: str


class OutputItemObject(BaseModel):
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    eval_id: str
    run_id: str
    created_at: int
    status: Literal["pass", "fail"]
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]
    sample: dict[str, Any]


class OutputItemPage(Page):
    data: list[OutputItemObject]


class EvalRunEvent(BaseModel):
    object: Literal["eval.run.event"] = "eval.run.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: str = Field(
        description="created, waiting, started, resumed, progress, requeued, canceled, "
        "completed or failed."
    )
    data: dict[str, Any] | None = None


class EvalRunEventPage(Page):
    data: list[EvalRunEvent]


EVENT_PREFIX = "evalrunevent-"


def event_object(stream_id: str, fields: dict[str, str]) -> EvalRunEvent:
    return EvalRunEvent(
        id=f"{EVENT_PREFIX}{stream_id}",
        created_at=int(fields["created_at"]),
        level=fields.get("level", "info"),
        message=fields["message"],
        type=fields.get("type", "message"),
        data=json.loads(fields["data"]) if fields.get("data") else None,
    )


class RunCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_source: dict[str, Any] = Field(
        description="{'type': 'jsonl', 'source': ...} or {'type': 'completions', 'source': ..., "
        "'input_messages': ..., 'model': ..., 'sampling_params': ...}; a source is "
        "{'type': 'file_content', 'content': [{'item': ..., 'sample': ...}]} or "
        "{'type': 'file_id', 'id': ...}."
    )
    name: str | None = Field(None, max_length=MAX_NAME)
    metadata: dict[str, str] | None = None


def run_object(rec: dict[str, Any], request: Request) -> EvalRunObject:
    criteria = rec["spec"].get("criteria") or []
    by_model: dict[str, dict[str, int]] = {}
    if rec["invocation_count"]:
        by_model[rec["model"]] = {k: rec[k] for k in USAGE}
    for name, counts in rec["judge_usage"].items():  # the judges' calls, by judge model
        mine = by_model.setdefault(name, dict.fromkeys(USAGE, 0))
        for k in USAGE:
            mine[k] += counts.get(k, 0)
    usage = [{"model_name": name, **counts} for name, counts in by_model.items()]
    path = f"/v1/evals/{rec['eval_id']}/runs/{rec['id']}"
    return EvalRunObject(
        id=rec["id"],
        eval_id=rec["eval_id"],
        name=rec["name"],
        status=rec["status"],
        model=rec["model"],
        created_at=rec["created_at"],
        metadata=rec["metadata"],
        data_source=rec["data_source"],
        result_counts={
            "total": rec["total"],
            "errored": rec["errored"],
            "failed": rec["failed"],
            "passed": rec["passed"],
        },
        per_testing_criteria_results=[
            {"testing_criteria": c.get("name", ""), "passed": p, "failed": f}
            for c, (p, f) in zip(criteria, rec["criteria_counts"], strict=True)
        ],
        per_model_usage=usage,
        report_url=str(request.base_url).rstrip("/") + path,
        error=rec["error"] or NO_ERROR,
    )


# ---- dependencies
def get_runs(request: Request) -> EvalRunStore:
    return request.app.state.eval_runs


RunsDep = Annotated[EvalRunStore, Depends(get_runs)]


def _run_of_path(run_id: str, ev: OwnedEval, runs: RunsDep) -> dict:
    """The run if it belongs to the (caller's) eval of the path; else the same 404."""
    try:
        rec = runs.get(run_id)
    except EvalRunNotFound:
        raise not_found("eval run", run_id, "run_id") from None
    if rec["eval_id"] != ev["id"] or rec["tenant"] != ev["tenant"]:
        raise not_found("eval run", run_id, "run_id")
    return rec


OwnedRun = Annotated[dict, Depends(_run_of_path)]


# ---- routes
@router.post("", response_model=EvalRunObject, status_code=201)
def create(
    body: RunCreateRequest,
    ev: OwnedEval,
    request: Request,
    tenant: TenantDep,
    files: FilesDep,
    settings: SettingsDep,
    runs: RunsDep,
) -> EvalRunObject:
    """Check the data source against the eval and queue the run to the workers."""
    check_numbers(body.model_dump())
    _check_metadata(body.metadata)
    ds = body.data_source
    spec, total, model = check_data_source(ds, ev, request, tenant, files, settings)
    owner = tenant if tenant.name == ev["tenant"] else _tenant_named(request, ev["tenant"])
    rec = runs.create(
        eval_id=ev["id"],
        name=body.name or model or ds["type"],
        model=model,
        data_source=ds,
        spec=spec,
        total=total,
        metadata=body.metadata,
        tenant=ev["tenant"],
        queue=settings.queue,
        limit=owner.eval_run_slots(settings.eval_runs_per_tenant),
    )
    enqueue_eval_run(request.app.state.celery, rec["id"], settings.queue)
    return run_object(rec, request)


def _tenant_named(request: Request, name: str) -> Tenant:
    """A tenant's entry by name (an admin acting on another tenant's eval)."""
    return request.app.state.keyring.tenants().get(name) or Tenant(name)


@router.get("", response_model=EvalRunPage)
def list_runs(
    ev: OwnedEval,
    request: Request,
    runs: RunsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
    status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None,
) -> dict:
    """The eval's runs, oldest first (``order=desc``: newest first); ``after`` is the last
    id of the previous page; ``status`` keeps only runs in that status."""
    try:
        recs, more = runs.list(ev["id"], after, limit, order=order, status=status)
    except EvalRunNotFound:
        raise not_found("eval run", after or "", "after") from None
    return page([run_object(r, request) for r in recs], more, empty_id="")


@router.get("/{run_id}", response_model=EvalRunObject)
def retrieve(run: OwnedRun, request: Request) -> EvalRunObject:
    return run_object(run, request)


def _cancel(
    run: dict, runs: EvalRunStore, request: Request, settings: ApiSettings
) -> EvalRunObject:
    if run["status"] in ("completed", "failed"):
        raise _bad(
            f"the run is {run['status']}; only a queued or in_progress run can be canceled",
            "run_id",
            "invalid_state",
        )
    if runs.transition(run["id"], "canceled", ("queued", "in_progress")) is not None:
        rec = runs.get(run["id"])
        runs.add_event(
            run["id"],
            f"Run canceled after {rec['progress']} of {rec['total']} rows were graded; they stay",
            type="canceled",
            data={"progress": rec["progress"], "total": rec["total"]},
        )
        _wake(run, runs, request, settings)
        _release_checkpoint(run, request, settings)
    try:
        return run_object(runs.get(run["id"]), request)
    except EvalRunNotFound:
        raise not_found("eval run", run["id"], "run_id") from None


def _wake(run: dict, runs: EvalRunStore, request: Request, settings: ApiSettings) -> None:
    """A run that held or could take a grading slot ended: send the waiting ones."""
    celery = request.app.state.celery
    slots = settings.eval_runs_per_tenant if run["limit"] is None else run["limit"]
    wake_waiting(runs, run, slots, settings, lambda r, q: enqueue_eval_run(celery, r, q))


def _release_checkpoint(run: dict, request: Request, settings: ApiSettings) -> None:
    """A job's checkpoint run that will not sample it any more: the checkpoint it kept
    from ``keep_checkpoints`` is pruned now (``workers.ckptevals``)."""
    job_id = run["metadata"].get("fine_tuning_job_id")
    if job_id:
        prune_job_checkpoints(job_id, request.app.state.jobs, Path(settings.data_dir))


@router.post("/{run_id}/cancel", response_model=EvalRunObject)
def cancel(run: OwnedRun, runs: RunsDep, request: Request, settings: SettingsDep) -> EvalRunObject:
    """Stop the run between rows (the SDK's ``runs.cancel``); the rows graded stay."""
    return _cancel(run, runs, request, settings)


@router.post("/{run_id}", response_model=EvalRunObject)
def cancel_by_id(
    run: OwnedRun, runs: RunsDep, request: Request, settings: SettingsDep
) -> EvalRunObject:
    """The same cancel at the path OpenAI's API reference gives it."""
    return _cancel(run, runs, request, settings)


@router.delete("/{run_id}", response_model=EvalRunDeleted)
def delete(run: OwnedRun, runs: RunsDep, request: Request, settings: SettingsDep) -> EvalRunDeleted:
    """Remove the run, its output items and its events (a worker grading it stops at its
    next row)."""
    try:
        runs.delete(run["id"])
    except EvalRunNotFound:
        raise not_found("eval run", run["id"], "run_id") from None
    if run["status"] in ("queued", "in_progress"):
        _wake(run, runs, request, settings)
        _release_checkpoint(run, request, settings)
    return EvalRunDeleted(deleted=True, run_id=run["id"])


@router.get("/{run_id}/events", response_model=EvalRunEventPage)
def list_events(
    run: OwnedRun,
    runs: RunsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    """The run's events, newest first (an extension, shaped as fine-tuning job events);
    ``after`` is the last id of the previous page."""
    cursor = after.removeprefix(EVENT_PREFIX) if after else None
    if cursor is not None and not _STREAM_ID.match(cursor):
        raise _bad(f"invalid event cursor '{after}'", "after")
    rows, more = runs.events(run["id"], cursor, limit)
    return page([event_object(sid, f) for sid, f in rows], more)


@router.get("/{run_id}/output_items", response_model=OutputItemPage)
def list_output_items(
    run: OwnedRun,
    runs: RunsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
    status: Literal["pass", "fail"] | None = None,
) -> dict:
    """The run's output items by row (``order=desc``: last row first); ``after`` is the
    last id of the previous page; ``status`` keeps only passed or only failed items."""
    start = None
    if after:
        start = _index_of(run["id"], after)
        if start is None or runs.item(run["id"], start) is None:
            raise not_found("output item", after, "after")
    items, more = runs.items(run["id"], start, limit, order=order, status=status)
    return page([OutputItemObject.model_validate(i) for i in items], more, empty_id="")


@router.get("/{run_id}/output_items/{output_item_id}", response_model=OutputItemObject)
def retrieve_output_item(output_item_id: str, run: OwnedRun, runs: RunsDep) -> OutputItemObject:
    index = _index_of(run["id"], output_item_id)
    item = None if index is None else runs.item(run["id"], index)
    if item is None:
        raise not_found("output item", output_item_id, "output_item_id")
    return OutputItemObject.model_validate(item)


def _index_of(run_id: str, output_item_id_: str) -> int | None:
    """The row index an output item id of this run names, or None."""
    index = output_item_id_.rpartition("_")[2]
    if not index.isdigit() or output_item_id_ != output_item_id(run_id, int(index)):
        return None
    return int(index)
