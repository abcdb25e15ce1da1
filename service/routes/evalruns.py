"""OpenAI's Evals API, the runs: ``/v1/evals/{eval_id}/runs`` and their output items.

A run grades rows against its eval's testing criteria. Its ``data_source`` is ``jsonl``
(rows with their ``sample`` already present) or ``completions`` (the rows' items, an
``input_messages`` template, a ``model`` the caller may use and ``sampling_params``:
posttrain's inference samples each row). The rows are inline (``file_content``) or an
uploaded file of the caller's with purpose ``evals`` (``file_id``; one
``{"item": ..., "sample": ...}`` per line). The run is checked here and queued to the
workers as ``posttrain.run_eval`` (``workers.evaltasks``, which states the pass rule);
cancel stops it between rows, delete removes it, its output items and its events. At
most ``POSTTRAIN_EVAL_RUNS_PER_TENANT`` runs of a tenant (its key-file entry's
``max_concurrent_eval_runs`` where it has one) are graded at once; the limit is recorded
on the run when it is created, and the others wait ``queued``. A run's events
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

from service import inference
from service.auth import Tenant
from service.deps import Auth, FilesDep, SettingsDep, TenantDep, owned_file
from service.errors import APIError, error_responses, not_found
from service.jobrequest import check_numbers
from service.routes.evals import (
    MAX_NAME,
    OwnedEval,
    _check_metadata,
    _undeclared,
    criterion_spec,
    grading_plan,
    owned_eval,
)
from service.schemas import Page, page
from service.settings import ApiSettings
from trainers.contract.graders.templates import TemplateError, parse_template
from workers.celery_app import enqueue_eval_run
from workers.ckptevals import prune_job_checkpoints
from workers.evalruns import (
    MAX_ITEMS,
    NO_ERROR,
    USAGE,
    EvalRunNotFound,
    EvalRunStore,
    RowError,
    check_item,
    check_row,
    output_item_id,
    read_rows,
    wake_waiting,
)

router = APIRouter(
    prefix="/v1/evals/{eval_id}/runs",
    tags=["evals"],
    dependencies=[Auth],
    responses=error_responses(400, 404, 503),
)

DS = "data_source"
ROLES = ("system", "developer", "user", "assistant")
SAMPLING = ("temperature", "top_p", "seed", "max_completion_tokens")
_TEXT_PARTS = ("input_text", "output_text")
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


def check_data_source(
    ds: dict[str, Any],
    ev: dict,
    request: Request,
    tenant,
    files,
    settings,
    *,
    with_model: bool = True,
) -> tuple[dict[str, Any], int, str]:
    """A run's data source checked against its eval: the worker's spec, the row count and
    the model. ``with_model=False``: a job's eval per checkpoint (``check_job_eval``), a
    completions source without ``model`` (each checkpoint is the model)."""
    if not isinstance(ds, dict):
        raise _bad(f"{DS} must be an object", DS)
    criteria = ev["testing_criteria"]
    graders = [criterion_spec(c, f"testing_criteria[{i}]") for i, c in enumerate(criteria)]
    plans = [
        grading_plan(g, f"testing_criteria[{i}]", request, tenant) for i, g in enumerate(graders)
    ]
    kind = ds.get("type")
    if kind in ("responses",):
        raise _bad(
            f"{DS}.type 'responses' reads responses stored on OpenAI's platform, which "
            "posttrain does not have; use 'jsonl' or 'completions'",
            f"{DS}.type",
            "unsupported_data_source",
        )
    if kind not in ("jsonl", "completions"):
        raise _bad(f"{DS}.type must be 'jsonl' or 'completions', got {kind!r}", f"{DS}.type")
    if not with_model and kind != "completions":
        raise _bad(
            f"{DS}.type must be 'completions': each checkpoint samples the rows",
            f"{DS}.type",
        )
    allowed = ("type", "source") + (
        ("input_messages", "model", "sampling_params") if kind == "completions" else ()
    )
    if not with_model:
        allowed = tuple(k for k in allowed if k != "model")
    extra = next((k for k in ds if k not in allowed), None)
    if extra == "model" and not with_model:
        raise _bad(f"{DS}.model: each checkpoint of the job is the model; drop it", f"{DS}.model")
    if extra is not None:
        raise _bad(f"{DS}.{extra}: unknown field of a {kind} data source", f"{DS}.{extra}")
    rows, where = _rows(ds.get("source"), files, tenant)
    schema = ev["data_source_config"]["item_schema"]
    reads_sample = any(
        ref.namespace == "sample"
        for g in graders
        for text in g.templates()
        for ref in parse_template(text)
    )
    for i, row in enumerate(rows):
        try:
            check_item(row["item"], schema, f"{where(i)}.item")
        except RowError as exc:
            raise _bad(f"{exc.where}: {exc.message}", _param(exc.where)) from None
        if kind == "jsonl" and reads_sample and "sample" not in row:
            raise _bad(
                f"{where(i)}.sample is required: the eval's criteria read {{{{sample.*}}}}",
                _param(f"{where(i)}.sample"),
            )
        if kind == "completions" and "sample" in row:
            raise _bad(
                f"{where(i)}.sample: a completions run samples the model; give items only",
                _param(f"{where(i)}.sample"),
            )
    spec: dict[str, Any] = {"kind": kind, "criteria": criteria, "grading": plans}
    if kind == "completions":
        spec.update(
            _completions(ds, schema, request, tenant, settings.inference_max_tokens, with_model)
        )
        model = ds.get("model", "")
    else:
        first = rows[0].get("sample") or {}
        model = first.get("model") if isinstance(first.get("model"), str) else ""
    return spec, len(rows), model


def check_job_eval(entry: Any, request: Request, tenant, files, settings) -> None:
    """A job's ``eval`` (``trainers.contract.spec.CheckpointEval``): the caller's eval
    (404 naming ``eval.eval_id``) and a completions data source without ``model``, checked
    as a run's is; errors name ``eval.data_source...``."""
    ev = owned_eval(request.app.state.evals, entry.eval_id, tenant, "eval.eval_id")
    try:
        check_data_source(entry.data_source, ev, request, tenant, files, settings, with_model=False)
    except APIError as exc:
        if exc.param and exc.param.startswith(DS):
            exc.param = f"eval.{exc.param}"
        if exc.message.startswith(DS):
            exc.message = f"eval.{exc.message}"
            exc.args = (exc.message,)
        raise


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


# ---- checks of a new run
def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _param(where: str) -> str:
    """The request field a row's message names (a file's rows: its id)."""
    return where.split(" ", 1)[0] if where.startswith(f"{DS}.source.id") else where


def _index_of(run_id: str, output_item_id_: str) -> int | None:
    """The row index an output item id of this run names, or None."""
    index = output_item_id_.rpartition("_")[2]
    if not index.isdigit() or output_item_id_ != output_item_id(run_id, int(index)):
        return None
    return int(index)


def _rows(source: Any, files, tenant) -> tuple[list[dict[str, Any]], Any]:
    """The rows, and a function naming row i in messages."""
    at = f"{DS}.source"
    if not isinstance(source, dict):
        raise _bad(f"{at} is required: file_content or file_id", at)
    kind = source.get("type")
    if kind in ("stored_completions", "responses"):
        raise _bad(
            f"{at}.type '{kind}' reads data stored on OpenAI's platform, which posttrain does "
            "not have; use file_content or file_id",
            f"{at}.type",
            "unsupported_data_source",
        )
    if kind == "file_content":
        content = source.get("content")
        if not isinstance(content, list) or not content:
            raise _bad(f"{at}.content must be a non-empty list of rows", f"{at}.content")
        if len(content) > MAX_ITEMS:
            raise _bad(
                f"{at}.content has {len(content)} rows; at most {MAX_ITEMS}", f"{at}.content"
            )
        for i, row in enumerate(content):
            try:
                check_row(row, f"{at}.content[{i}]")
            except RowError as exc:
                raise _bad(f"{exc.where}: {exc.message}", exc.where) from None
        return content, lambda i: f"{at}.content[{i}]"
    if kind == "file_id":
        file_id = source.get("id")
        if not isinstance(file_id, str):
            raise _bad(f"{at}.id must be a file id", f"{at}.id")
        rec = owned_file(files, file_id, tenant, f"{at}.id")
        if rec["purpose"] != "evals":
            raise _bad(
                f"{at}.id: the file {file_id} has purpose '{rec['purpose']}'; eval data is "
                "uploaded with purpose 'evals'",
                f"{at}.id",
            )
        try:
            with open(files.path(file_id), "rb") as fh:
                rows = read_rows(fh, f"{at}.id ({file_id})")
        except FileNotFoundError:
            raise not_found("file", file_id, f"{at}.id") from None
        except RowError as exc:
            raise _bad(str(exc), f"{at}.id") from None
        return rows, lambda i: f"{at}.id ({file_id}) row {i + 1}"
    raise _bad(f"{at}.type must be 'file_content' or 'file_id', got {kind!r}", f"{at}.type")


def _completions(
    ds: dict[str, Any],
    schema: dict[str, Any],
    request: Request,
    tenant,
    max_tokens: int,
    with_model: bool = True,
) -> dict[str, Any]:
    """The worker's part of a completions run: model header, input messages, sampling
    (no header without ``with_model``: the worker makes one per checkpoint)."""
    header = None
    if with_model:
        name = ds.get("model")
        if not isinstance(name, str) or not name:
            raise _bad(f"{DS}.model is required: the model that samples the rows", f"{DS}.model")
        header = inference.resolve(request, name, tenant)
    messages = ds.get("input_messages")
    at = f"{DS}.input_messages"
    if not isinstance(messages, dict):
        raise _bad(f"{at} is required: a template or an item_reference", at)
    if messages.get("type") == "template":
        template = messages.get("template")
        if not isinstance(template, list) or not template:
            raise _bad(f"{at}.template must be a non-empty list of messages", f"{at}.template")
        for j, message in enumerate(template):
            _check_message(message, f"{at}.template[{j}]", schema)
        spec_messages = {"type": "template", "template": template}
    elif messages.get("type") == "item_reference":
        ref = messages.get("item_reference")
        parts = ref.split(".") if isinstance(ref, str) else []
        if len(parts) < 2 or parts[0] != "item":
            raise _bad(
                f"{at}.item_reference must name a field of the item, 'item.<field>'",
                f"{at}.item_reference",
            )
        missing = _undeclared(tuple(parts[1:]), schema)
        if missing is not None:
            raise _bad(
                f"{at}.item_reference reads 'item.{missing}', which the eval's item_schema "
                "does not declare",
                f"{at}.item_reference",
            )
        spec_messages = {"type": "item_reference", "item_reference": ref}
    else:
        raise _bad(f"{at}.type must be 'template' or 'item_reference'", f"{at}.type")
    return {
        **({"model": header} if header is not None else {}),
        "input_messages": spec_messages,
        "sampling": _sampling(ds.get("sampling_params"), max_tokens),
    }


def _check_message(message: Any, at: str, schema: dict[str, Any]) -> None:
    if not isinstance(message, dict):
        raise _bad(f"{at} must be a message {{role, content}}", at)
    if message.get("role") not in ROLES:
        raise _bad(f"{at}.role must be one of {', '.join(ROLES)}", f"{at}.role")
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    for k, part in enumerate(parts):
        where = f"{at}.content" + (f"[{k}]" if isinstance(content, list) else "")
        if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
            text = part.get("text")
        else:
            text = part
        if not isinstance(text, str):
            raise _bad(
                f"{where}: posttrain samples from text; give a string or an input_text part",
                where,
            )
        try:
            refs = parse_template(text)
        except TemplateError as exc:
            raise _bad(f"{where}: {exc}", where) from None
        for ref in refs:
            shown = "{{" + ".".join((ref.namespace, *ref.path)) + "}}"
            if ref.namespace != "item":
                raise _bad(f"{where}: {shown}: input messages read the item namespace only", where)
            missing = _undeclared(ref.path, schema)
            if missing is not None:
                raise _bad(
                    f"{where}: {shown} reads 'item.{missing}', which the eval's item_schema "
                    "does not declare",
                    where,
                )


def _sampling(params: Any, max_tokens: int) -> dict[str, Any]:
    at = f"{DS}.sampling_params"
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _bad(f"{at} must be an object", at)
    params = dict(params)
    fmt = params.pop("response_format", None)
    if fmt is not None and fmt != {"type": "text"}:  # text is what every run answers
        raise _bad(
            f"{at}.response_format: only {{'type': 'text'}} is supported (the engines on CPU "
            "hosts cannot constrain answers to a format)",
            f"{at}.response_format",
            "unsupported_parameter",
        )
    extra = next((k for k in params if k not in SAMPLING), None)
    if extra is not None:
        raise _bad(
            f"{at}.{extra} is not supported; posttrain's eval runs take {', '.join(SAMPLING)}",
            f"{at}.{extra}",
            "unsupported_parameter",
        )
    bounds = {"temperature": (0, 2), "top_p": (0, 1), "max_completion_tokens": (1, max_tokens)}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (key in ("seed", "max_completion_tokens") and not isinstance(value, int)):
            raise _bad(f"{at}.{key} must be a number", f"{at}.{key}")
        lo, hi = bounds.get(key, (-(2**63), 2**63 - 1))
        if not lo <= value <= hi:
            raise _bad(f"{at}.{key} must be from {lo} to {hi}, got {value}", f"{at}.{key}")
        out[key] = value
    return out
