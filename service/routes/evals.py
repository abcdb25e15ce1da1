"""OpenAI's Evals API, the eval objects: ``/v1/evals`` create, list, retrieve, update, delete.

An eval is a data source config and testing criteria, in OpenAI's shapes (the ``openai``
SDK's ``client.evals`` works against it); each belongs to the tenant that created it, and
another tenant's eval is the same 404 as an unknown id. Runs: ``service/routes/evalruns.py``.

Departures from OpenAI, each refused with a 400 naming the field:

* ``data_source_config`` is ``custom`` only: ``logs`` and ``stored_completions`` read
  completions OpenAI stored on its platform, which posttrain has none of.
* ``testing_criteria`` are posttrain's graders (``trainers.contract.graders.spec``), checked
  as ``/v1/fine_tuning/alpha/graders/validate`` checks one, and ``label_model``;
  ``python`` only where the server runs it in its sandbox (``POSTTRAIN_PYTHON_GRADER``
  ``bwrap``; with ``off`` a 400 naming the criterion). posttrain's own grader types
  (``multi``, ``regex``, ``math_verify``, ``length_penalty``) are accepted too.
* A ``label_model``'s ``model``, and a ``score_model``'s that is no sequence classifier,
  is a generative judge: any model the caller may use for chat completions (a base model
  under a model root, its ``ft:`` models and checkpoints), asked through posttrain's
  inference workers when a run grades (``trainers.contract.graders.judging``). A judge,
  reward model or encoder the caller may not use, another tenant's included, is a 400
  ``model_not_found`` naming ``testing_criteria[i].model`` (the field, as for a
  training grader; the same answer as an unknown model). A ``label_model`` inside a
  ``multi`` grader is refused, and a ``multi``'s ``score_model`` must be a reward model.
* Every ``{{item.x}}`` a criterion reads must be a property of ``item_schema`` (nested
  ``{{item.a.b}}``: as deep as the schema declares ``properties``), and ``{{sample.*}}``
  needs ``include_sample_schema``; the ``sample`` fields posttrain fills are
  ``output_text`` and ``output_json`` (``trainers.contract.graders.templates``).

The answered ``data_source_config`` is OpenAI's: ``{"type": "custom", "schema": ...}``,
the schema of a run's data with ``item`` (the ``item_schema``) and, with
``include_sample_schema``, OpenAI's ``sample`` schema.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service import inference
from service.auth import Tenant
from service.deps import Auth, TenantDep, owned
from service.errors import APIError, error_responses, not_found
from service.jobrequest import check_numbers
from service.modelaccess import NOT_ALLOWED
from service.schemas import Page, page
from trainers.contract.graders.patterns import PatternError, check_compiles, patterns_in
from trainers.contract.graders.python import refusal, runs_code
from trainers.contract.graders.remote import calls_out
from trainers.contract.graders.spec import (
    THRESHOLD_CRITERIA,
    CriterionSpec,
    InvalidGrader,
    LabelModelGrader,
    ScoreModelGrader,
    dump_grader,
    needs_model,
    parse_criterion,
)
from trainers.contract.graders.templates import parse_template
from trainers.contract.graders.validate import check_criterion_models, is_judge
from trainers.contract.modelfiles import ModelFileError
from trainers.contract.sizes import MAX_DEFINITION_BYTES, MAX_SPEC_BYTES, json_size
from workers.evalstore import EvalNotFound, EvalStore

router = APIRouter(
    prefix="/v1/evals",
    tags=["evals"],
    dependencies=[Auth],
    responses=error_responses(400, 503),
)

MAX_NAME = 256
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
_HOSTED_SOURCES = ("logs", "stored_completions")
_CUSTOM_FIELDS = ("type", "item_schema", "include_sample_schema")

# OpenAI's ``sample`` schema, as its API answers it in a custom data source config created
# with ``include_sample_schema``: a chat completion and the fields graders read from it.
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "message": {
                        "type": "object",
                        "properties": {
                            "role": {"type": "string", "enum": ["assistant"]},
                            "content": {"type": ["string", "array", "null"]},
                            "refusal": {"type": ["boolean", "null"]},
                            "tool_calls": {
                                "type": ["array", "null"],
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "type": {"type": "string", "enum": ["function"]},
                                        "function": {
                                            "type": "object",
                                            "properties": {
                                                "name": {"type": "string"},
                                                "arguments": {"type": "string"},
                                            },
                                            "required": ["name", "arguments"],
                                        },
                                        "id": {"type": "string"},
                                    },
                                    "required": ["type", "function", "id"],
                                },
                            },
                            "function_call": {
                                "type": ["object", "null"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "arguments": {"type": "string"},
                                },
                                "required": ["name", "arguments"],
                            },
                        },
                        "required": ["role"],
                    },
                    "finish_reason": {"type": "string"},
                },
                "required": ["index", "message", "finish_reason"],
            },
        },
        "output_text": {"type": "string"},
        "output_json": {"type": "object"},
        "output_tools": {"type": "array", "items": {"type": "object"}},
        "output_reasoning_summary": {"type": ["string", "null"]},
        "output_audio": {"type": ["object", "null"]},
        "input_tools": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["model", "choices"],
}


# ---- objects
class CustomDataSourceConfig(BaseModel):
    type: Literal["custom"] = "custom"
    schema_: dict[str, Any] = Field(
        alias="schema",
        description="JSON Schema of a run's data: 'item' (the item_schema) and, when the eval "
        "was created with include_sample_schema, OpenAI's 'sample'.",
    )


class EvalObject(BaseModel):
    object: Literal["eval"] = "eval"
    id: str
    name: str
    created_at: int
    metadata: dict[str, str]
    data_source_config: CustomDataSourceConfig
    testing_criteria: list[dict[str, Any]] = Field(
        description="The graders, as accepted (trainers.contract.graders.spec)."
    )


class EvalPage(Page):
    data: list[EvalObject]


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool
    eval_id: str


class EvalCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_source_config: dict[str, Any] = Field(
        description="{'type': 'custom', 'item_schema': <JSON Schema of an object>, "
        "'include_sample_schema': bool}; 'logs' and 'stored_completions' are OpenAI-hosted "
        "data and refused."
    )
    testing_criteria: list[dict[str, Any]] = Field(
        description="One or more graders (string_check, text_similarity with pass_threshold, "
        "score_model, label_model, multi, math_verify, regex, length_penalty, and python "
        "where the server runs it), each with a name."
    )
    name: str | None = Field(None, max_length=MAX_NAME)
    metadata: dict[str, str] | None = Field(
        None, description="At most 16 pairs; keys up to 64 characters, values up to 512."
    )


class EvalUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=MAX_NAME, description="Rename the eval.")
    metadata: dict[str, str] | None = Field(
        None, description="Replaces the metadata (null: none); same limits as on creation."
    )


def answered_schema(item_schema: dict[str, Any], include_sample: bool) -> dict[str, Any]:
    """The ``schema`` OpenAI answers for a custom data source config."""
    properties: dict[str, Any] = {"item": copy.deepcopy(item_schema)}
    required = ["item"]
    if include_sample:
        properties["sample"] = copy.deepcopy(SAMPLE_SCHEMA)
        required.append("sample")
    return {"type": "object", "properties": properties, "required": required}


def eval_object(rec: dict[str, Any]) -> EvalObject:
    source = rec["data_source_config"]
    schema = answered_schema(
        source.get("item_schema") or {"type": "object", "properties": {}},
        bool(source.get("include_sample_schema")),
    )
    return EvalObject.model_validate(
        {
            "id": rec["id"],
            "name": rec["name"],
            "created_at": rec["created_at"],
            "metadata": rec["metadata"],
            "data_source_config": {"type": "custom", "schema": schema},
            "testing_criteria": rec["testing_criteria"],
        }
    )


# ---- dependencies
def get_evals(request: Request) -> EvalStore:
    return request.app.state.evals


EvalsDep = Annotated[EvalStore, Depends(get_evals)]


def owned_eval(evals: EvalStore, eval_id: str, tenant: Tenant, param: str = "eval_id") -> dict:
    """The eval if ``tenant`` may see it; a missing eval and another tenant's are the same
    404 (an id outside posttrain's alphabet is refused before, by ``valid_path_ids``)."""
    return owned(evals, EvalNotFound, "eval", eval_id, tenant, param)


def _eval_of_path(eval_id: str, evals: EvalsDep, tenant: TenantDep) -> dict:
    return owned_eval(evals, eval_id, tenant)


OwnedEval = Annotated[dict, Depends(_eval_of_path)]


# ---- routes
@router.post("", response_model=EvalObject, status_code=201, responses=error_responses(429))
async def create(
    body: EvalCreateRequest, request: Request, tenant: TenantDep, evals: EvalsDep
) -> EvalObject:
    """Check the data source config and every criterion (as /graders/validate checks a
    grader: shape, templates, regexes and models) and store the eval. Runs on the grader
    pool, as /graders/validate does (regexes are compiled in a bounded child)."""
    pool = request.app.state.grader_pool
    rec = await pool.run(tenant, _create, body, request, tenant, evals)
    return eval_object(rec)


@router.get("", response_model=EvalPage, responses=error_responses(404))
def list_evals(
    evals: EvalsDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
) -> dict:
    """The caller's evals, newest first (``order=asc``: oldest first) by ``order_by``;
    ``after`` is the last id of the previous page."""
    try:
        recs, more = evals.list(
            after,
            limit,
            tenant=None if tenant.admin else tenant.name,
            order=order,
            order_by=order_by,
        )
    except EvalNotFound:
        raise not_found("eval", after or "", "after") from None
    return page([eval_object(r) for r in recs], more, empty_id="")


@router.get("/{eval_id}", response_model=EvalObject, responses=error_responses(404))
def retrieve(rec: OwnedEval) -> EvalObject:
    return eval_object(rec)


@router.post("/{eval_id}", response_model=EvalObject, responses=error_responses(404))
def update(rec: OwnedEval, body: EvalUpdateRequest, evals: EvalsDep) -> EvalObject:
    """Rename the eval and/or replace its metadata; nothing else of an eval changes."""
    check_numbers(body.model_dump())
    given = body.model_fields_set
    if "name" in given and body.name is None:
        raise APIError(400, "name: must be a string", param="name", code="invalid_value")
    _check_metadata(body.metadata)
    metadata = (body.metadata or {}) if "metadata" in given else None
    try:
        return eval_object(evals.update(rec["id"], name=body.name, metadata=metadata))
    except EvalNotFound:  # deleted meanwhile
        raise not_found("eval", rec["id"], "eval_id") from None


@router.delete("/{eval_id}", response_model=EvalDeleted, responses=error_responses(404))
def delete(rec: OwnedEval, evals: EvalsDep, request: Request) -> EvalDeleted:
    """Remove the eval and its runs (a worker grading one stops at its next row)."""
    try:
        evals.delete(rec["id"])
        request.app.state.eval_runs.delete_eval_runs(rec["id"])
    except EvalNotFound:  # deleted meanwhile
        raise not_found("eval", rec["id"], "eval_id") from None
    return EvalDeleted(deleted=True, eval_id=rec["id"])


# ---- checks of a new eval
def _create(body: EvalCreateRequest, request: Request, tenant: Tenant, evals: EvalStore) -> dict:
    check_numbers(body.model_dump())
    _check_metadata(body.metadata)
    source = _data_source(body.data_source_config)
    criteria, plans = _criteria(body.testing_criteria, source, request, tenant)
    return evals.create(
        name=body.name or "",
        data_source_config=source,
        testing_criteria=criteria,
        metadata=body.metadata,
        tenant=tenant.name,
        grading=plans,
    )


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's limits: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise _bad(f"metadata: at most {MAX_METADATA_KEYS} keys, got {len(metadata)}", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise _bad(
                f"metadata: key '{key[:MAX_METADATA_KEY]}...' is longer than "
                f"{MAX_METADATA_KEY} characters",
                "metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise _bad(
                f"metadata.{key}: the value is longer than {MAX_METADATA_VALUE} characters",
                "metadata",
            )


def _data_source(raw: dict[str, Any]) -> dict[str, Any]:
    """The custom data source config as stored: type, item_schema, include_sample_schema."""
    where = "data_source_config"
    kind = raw.get("type")
    if kind is None:
        raise _bad(f"{where}.type is required; posttrain serves 'custom'", f"{where}.type")
    if kind in _HOSTED_SOURCES:
        raise _bad(
            f"{where}.type '{kind}' reads completions stored on OpenAI's platform, which "
            "posttrain does not have; use type 'custom' with an item_schema",
            f"{where}.type",
            "unsupported_data_source",
        )
    if kind != "custom":
        raise _bad(f"{where}.type: unknown type {kind!r}; expected 'custom'", f"{where}.type")
    extra = next((k for k in raw if k not in _CUSTOM_FIELDS), None)
    if extra is not None:
        raise _bad(
            f"{where}.{extra}: unknown field of a custom data source config (its fields: "
            f"{', '.join(_CUSTOM_FIELDS)})",
            f"{where}.{extra}",
        )
    include = raw.get("include_sample_schema", False)
    if not isinstance(include, bool):
        raise _bad(
            f"{where}.include_sample_schema must be true or false",
            f"{where}.include_sample_schema",
        )
    return {
        "type": "custom",
        "item_schema": _item_schema(raw.get("item_schema"), f"{where}.item_schema"),
        "include_sample_schema": include,
    }


def _item_schema(schema: Any, where: str) -> dict[str, Any]:
    """A JSON Schema of an object, checked for its shape (type, properties, required)."""
    if schema is None:
        raise _bad(f"{where} is required: the JSON Schema of one row", where)
    if not isinstance(schema, dict):
        raise _bad(f"{where} must be a JSON Schema object", where)
    size = json_size(schema)
    if size > MAX_DEFINITION_BYTES:
        raise _bad(f"{where} is {size} bytes of JSON; at most {MAX_DEFINITION_BYTES}", where)
    if schema.get("type") != "object":
        raise _bad(
            f"{where}.type must be 'object' (a row is a JSON object), got {schema.get('type')!r}",
            f"{where}.type",
        )
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        raise _bad(
            f"{where}.properties must be an object naming the row's fields",
            f"{where}.properties",
        )
    for name, sub in properties.items():
        if not isinstance(sub, dict | bool):
            raise _bad(
                f"{where}.properties.{name} must be a JSON Schema (an object)",
                f"{where}.properties.{name}",
            )
    required = schema.get("required", [])
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise _bad(f"{where}.required must be a list of field names", f"{where}.required")
    return schema


def _criteria(
    raw: list[dict[str, Any]], source: dict[str, Any], request: Request, tenant: Tenant
) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None]]:
    """Every criterion parsed and checked; as stored (the grader as given, and its
    ``pass_threshold``), and how a worker grades each (``grading_plan``)."""
    if not raw:
        raise _bad(
            "testing_criteria: at least one criterion (a grader) is required", "testing_criteria"
        )
    size = json_size(raw)
    if size > MAX_SPEC_BYTES:
        raise _bad(
            f"testing_criteria is {size} bytes of JSON; at most {MAX_SPEC_BYTES}",
            "testing_criteria",
        )
    parsed: list[tuple[str, CriterionSpec, dict[str, Any]]] = []
    for i, criterion in enumerate(raw):
        where = f"testing_criteria[{i}]"
        grader, extra = _criterion(criterion, where)
        why = refusal(request.app.state.settings.sandbox_policy()) if runs_code(grader) else ""
        if why:  # where it is on, the eval worker probes the sandbox before grading
            raise _bad(f"{where}: {why}", where, "unsupported_grader")
        _check_references(grader, where, source)
        parsed.append((where, grader, extra))
    found = [p for where, grader, _ in parsed for p in patterns_in(dump_grader(grader), where)]
    try:
        check_compiles(found)  # every regex, in one bounded child
    except PatternError as exc:
        raise _bad(str(exc), exc.param or "testing_criteria", "invalid_grader") from None
    plans = [grading_plan(grader, where, request, tenant) for where, grader, _ in parsed]
    return [{**dump_grader(grader), **extra} for _, grader, extra in parsed], plans


def criterion_spec(criterion: dict[str, Any], where: str = "grader") -> CriterionSpec:
    """A stored criterion as its grader (without the criterion's ``pass_threshold``)."""
    raw = dict(criterion)
    if raw.get("type") in THRESHOLD_CRITERIA:
        raw.pop("pass_threshold", None)
    return parse_criterion(raw, where)


def grading_plan(
    grader: CriterionSpec, where: str, request: Request, tenant: Tenant
) -> dict[str, Any] | None:
    """How a worker grades one criterion, its models checked for ``tenant``: None (in a
    bounded child: the graders that load no model), ``{"how": "local", "grader": ...}``
    (a reward model or an encoder, its paths resolved: in the run's own process) or
    ``{"how": "judge", "model": <inference header>}`` (a generative judge). A model the
    tenant may not use, or one that cannot serve as what it is, is a 400 naming
    ``<where>.model`` (or the field at fault)."""
    if not (isinstance(grader, LabelModelGrader) or needs_model(grader)):
        return None
    access = request.app.state.model_access
    resolved = access.check_grader(grader, tenant, where)
    try:
        check_criterion_models(resolved, where)
    except ModelFileError as exc:
        raise _bad(f"{exc.param}: {exc}", exc.param, "invalid_grader") from None
    if not is_judge(resolved):
        return {"how": "local", "grader": resolved.model_dump(mode="json")}
    judge: LabelModelGrader | ScoreModelGrader = grader  # type: ignore[assignment]
    bound = request.app.state.settings.inference_max_tokens
    asked = judge.sampling_params and judge.sampling_params.max_completions_tokens
    if asked and asked > bound:
        at = f"{where}.sampling_params.max_completions_tokens"
        raise _bad(f"{at}: at most {bound} tokens per judge answer on this server", at)
    try:
        header = inference.resolve(request, judge.model, tenant)
    except APIError:  # e.g. a LoRA checkpoint whose base is gone
        raise _bad(f"{where}.model: {NOT_ALLOWED}", f"{where}.model", "model_not_found") from None
    return {"how": "judge", "model": header}


def _criterion(raw: dict[str, Any], where: str) -> tuple[CriterionSpec, dict[str, Any]]:
    """One criterion as a posttrain grader, and the criterion's fields beyond the grader
    (a score_model's or python grader's ``pass_threshold``)."""
    kind = raw.get("type")
    raw, extra = dict(raw), {}
    if kind in THRESHOLD_CRITERIA and "pass_threshold" in raw:
        threshold = raw.pop("pass_threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise _bad(f"{where}.pass_threshold must be a number", f"{where}.pass_threshold")
        extra["pass_threshold"] = threshold
    if kind == "text_similarity" and raw.get("pass_threshold") is None:
        raise _bad(
            f"{where}.pass_threshold is required: the similarity at which a text_similarity "
            "criterion passes",
            f"{where}.pass_threshold",
        )
    try:
        grader = parse_criterion(raw, where)
    except InvalidGrader as exc:
        raise _bad(exc.message, exc.param, "invalid_grader") from None
    if calls_out(grader):  # an eval's criteria are shown as stored: no place for secrets
        raise _bad(
            f"{where}: an endpoint grader grades grpo and reinforcement jobs (and "
            "/v1/fine_tuning/alpha/graders/run), not an eval's testing criteria",
            where,
            "unsupported_grader",
        )
    return grader, extra


def _check_references(grader: CriterionSpec, where: str, source: dict[str, Any]) -> None:
    """Every ``{{item.x}}`` names a property of the item schema; ``{{sample.*}}`` only
    where the eval has a sample namespace."""
    schema = source["item_schema"]
    for text in grader.templates():
        for ref in parse_template(text):
            shown = "{{" + ".".join((ref.namespace, *ref.path)) + "}}"
            if ref.namespace == "sample":
                if not source["include_sample_schema"]:
                    raise _bad(
                        f"{where}: {shown} reads the sample namespace, which an eval has only "
                        "with data_source_config.include_sample_schema true",
                        where,
                    )
                continue
            missing = _undeclared(ref.path, schema)
            if missing is not None:
                declared = ", ".join(sorted(schema["properties"])) or "none"
                raise _bad(
                    f"{where}: {shown} reads 'item.{missing}', which "
                    f"data_source_config.item_schema does not declare (its properties: "
                    f"{declared})",
                    where,
                )


def _undeclared(path: tuple[str, ...], schema: dict[str, Any]) -> str | None:
    """The first part of ``path`` the schema does not declare (dotted), or None. Checked
    as deep as the schema declares ``properties`` (or ``items``, for an index)."""
    for depth, part in enumerate(path):
        if not isinstance(schema, dict):
            return None
        properties, items = schema.get("properties"), schema.get("items")
        if part.isdigit() and isinstance(items, dict) and not isinstance(properties, dict):
            schema = items
            continue
        if not isinstance(properties, dict):
            return None  # the schema says nothing this deep
        if part not in properties:
            return ".".join(path[: depth + 1])
        schema = properties[part]
    return None
