"""An eval run's ``data_source``, checked against its eval before the run is stored.

``check_data_source`` turns a request's data source into the worker's spec (the rows'
kind, the criteria and how each is graded, and for a completions run the model header,
the input messages and the sampling settings), or raises a 400 naming the field; a
job's eval per checkpoint goes through ``check_job_eval``. The rules are listed in
``service.routes.evalruns``' module doc, which serves the runs.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service import inference
from service.deps import owned_file
from service.errors import APIError, not_found
from service.routes.evals import _undeclared, criterion_spec, grading_plan, owned_eval
from trainers.contract.graders.templates import TemplateError, parse_template
from workers.evalrows import MAX_ITEMS, RowError, check_item, check_row, read_rows

DS = "data_source"
ROLES = ("system", "developer", "user", "assistant")
SAMPLING = ("temperature", "top_p", "seed", "max_completion_tokens")
_TEXT_PARTS = ("input_text", "output_text")


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


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _param(where: str) -> str:
    """The request field a row's message names (a file's rows: its id)."""
    return where.split(" ", 1)[0] if where.startswith(f"{DS}.source.id") else where


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
