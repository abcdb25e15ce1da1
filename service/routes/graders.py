"""OpenAI's grader test endpoints: ``/v1/fine_tuning/alpha/graders/{run,validate}``.

``validate`` checks a grader's shape and answers ``{"grader": ...}``. ``run``
grades one ``model_sample`` against one ``item`` and answers OpenAI's
``GraderRunResponse``. Grading runs in a child process with a deadline
(``trainers.contract.graders.scoring.run_isolated``). Graders that load a model
(``score_model``, ``text_similarity`` with ``cosine``) validate here but run
only in the training process: this process never imports torch. An ``endpoint``
grader's URL must pass the server's outbound policy (the tools' settings: a 400 naming
``grader.url``); ``run`` calls it from the bounded child, and ``validate`` echoes its
header values as ``[redacted]``. A ``python`` grader is a 400 on a server whose
``POSTTRAIN_PYTHON_GRADER`` is off; elsewhere ``run`` starts its sandbox from the bounded
child (so this host needs bwrap too; without it the run reports
``python_grader_server_error``).

Extension: ``metadata.errors.details`` maps each raised error flag to a
sentence saying what went wrong (OpenAI's flags alone do not say which
variable was missing).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.deps import Auth, TenantDep
from service.errors import APIError, error_responses
from service.jobrequest import check_numbers
from trainers.contract.graders.patterns import PatternError, check_compiles, patterns_in
from trainers.contract.graders.python import python_params, refusal
from trainers.contract.graders.remote import endpoint_urls, split_grader_secrets
from trainers.contract.graders.scoring import GradeReport, run_isolated
from trainers.contract.graders.spec import (
    GRADER_TYPES,
    GraderSpec,
    InvalidGrader,
    MultiGrader,
    dump_grader,
    needs_model,
    parse_grader,
)
from trainers.contract.graders.validate import check_grader_models
from trainers.contract.modelfiles import ModelFileError
from trainers.contract.outbound import AddressRefused, ToolPolicy
from trainers.contract.sandbox import SandboxPolicy

router = APIRouter(
    prefix="/v1/fine_tuning/alpha/graders",
    tags=["graders"],
    dependencies=[Auth],
    responses=error_responses(400, 503),
)

_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
_DETAILS = (
    "model_grader_server_error_details",
    "python_grader_runtime_error_details",
    "python_grader_server_error_type",
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] = Field(
        description="The grader (one of trainers.contract.graders.spec.GRADER_TYPES)."
    )


class RunRequest(_Request):
    model_sample: str = Field(description="The model output graded; fills sample.output_text.")
    item: Any = Field(None, description="The dataset row; fills the item namespace.")


class ValidateRequest(_Request):
    pass


class RunMetadata(BaseModel):
    name: str
    type: str
    errors: dict[str, Any]
    execution_time: float
    scores: dict[str, float]
    token_usage: dict[str, int] | None = None
    sampled_model_name: str | None = None


class RunResponse(BaseModel):
    reward: float
    metadata: RunMetadata
    sub_rewards: dict[str, float]
    model_grader_token_usage_per_model: dict[str, Any]


class ValidateResponse(BaseModel):
    grader: dict[str, Any]


def _parse(raw: dict[str, Any], policy: ToolPolicy, sandbox: SandboxPolicy) -> GraderSpec:
    """The grader, its shape checked, its regexes compiled in a bounded child, its
    endpoint URLs (an endpoint grader's) allowed by the server's outbound policy and a
    python grader allowed by its sandbox setting."""
    try:
        grader = parse_grader(raw)
    except InvalidGrader as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_grader") from None
    try:
        check_compiles(patterns_in(grader.model_dump(mode="json"), "grader"))
    except PatternError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_grader") from None
    for url, param in endpoint_urls([grader], ["grader"]):
        try:
            policy.check(url)
        except AddressRefused as exc:
            raise APIError(400, f"{param}: {exc}", param=param, code="invalid_url") from None
    found, why = python_params([grader], ["grader"]), refusal(sandbox)
    if found and why:
        raise APIError(400, f"{found[0]}: {why}", param=found[0], code="unsupported_grader")
    return grader


def _response(grader: GraderSpec, report: GradeReport) -> RunResponse:
    errors: dict[str, Any] = {flag: flag in report.errors for flag in _FLAGS}
    errors.update(dict.fromkeys(_DETAILS))
    errors["details"] = dict(report.errors)
    multi = isinstance(grader, MultiGrader)
    return RunResponse(
        reward=report.reward,
        metadata=RunMetadata(
            name=grader.name,
            type=grader.type,
            errors=errors,
            execution_time=report.execution_time,
            scores=dict(report.sub_rewards) if multi else {grader.name: report.reward},
        ),
        sub_rewards=dict(report.sub_rewards),
        model_grader_token_usage_per_model={},
    )


@router.post("/run", response_model=RunResponse, responses=error_responses(429))
async def run(body: RunRequest, request: Request, tenant: TenantDep) -> RunResponse:
    """Grade ``model_sample`` (and ``item``) with a torch-free grader, on the grader pool
    (``service.graderpool``: off the request threads, a share per tenant)."""
    kind = body.grader.get("type")
    kind = kind if kind in GRADER_TYPES else "other"  # bounded label values
    runs = request.app.state.metrics.grader_runs
    try:
        settings = request.app.state.settings
        policy = tenant.tool_policy(settings.tool_policy())
        answer = await request.app.state.grader_pool.run(
            tenant, _run, body, policy, settings.sandbox_policy()
        )
    except APIError:
        runs.labels(kind, "refused").inc()
        raise
    runs.labels(kind, "error" if answer.metadata.errors["details"] else "ok").inc()
    return answer


def _run(body: RunRequest, policy: ToolPolicy, sandbox: SandboxPolicy) -> RunResponse:
    check_numbers(body.model_dump())
    grader = _parse(body.grader, policy, sandbox)
    if needs_model(grader):
        raise APIError(
            400,
            "score_model graders (label_model, and text_similarity with 'cosine', too) run only "
            "during training and in eval runs: the API process loads and asks no models. Use "
            "/v1/fine_tuning/alpha/graders/validate to check the grader's shape.",
            param="grader",
            code="unsupported_grader",
        )
    report = run_isolated(grader, body.item, body.model_sample, policy=policy, sandbox=sandbox)
    return _response(grader, report)


@router.post("/validate", response_model=ValidateResponse, responses=error_responses(429))
async def validate(body: ValidateRequest, request: Request, tenant: TenantDep) -> ValidateResponse:
    """Check a grader as job creation does: its shape, templates, formula and regexes, and
    every model it names (the caller's model access, and a score_model must be a one-label
    sequence classifier); echo it back. Runs on the grader pool, as ``run`` does."""
    pool = request.app.state.grader_pool
    state = request.app.state
    policy = tenant.tool_policy(state.settings.tool_policy())
    sandbox = state.settings.sandbox_policy()
    return await pool.run(tenant, _validate, body, state.model_access, tenant, policy, sandbox)


def _validate(
    body: ValidateRequest, access, tenant, policy: ToolPolicy, sandbox: SandboxPolicy
) -> ValidateResponse:
    check_numbers(body.model_dump())
    grader = _parse(body.grader, policy, sandbox)
    resolved = access.check_grader(grader, tenant, training=True)
    try:
        check_grader_models(resolved, "grader", access.judge_models)
    except ModelFileError as exc:
        raise APIError(400, f"{exc.param}: {exc}", param=exc.param, code="invalid_grader") from None
    shown = split_grader_secrets([grader])[0][0]  # an endpoint's header values: redacted
    return ValidateResponse(grader=dump_grader(shown))
