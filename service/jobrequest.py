"""The job-creation request body read into a ``JobSpec``, with a 400 naming the field.

``parse_spec`` walks the raw body first (``check_numbers``: NaN, Infinity, integers
past ±(2**63 - 1), NUL characters), maps OpenAI's legacy fields, refuses a client-set
``spec_version`` and an unknown or planned method, then validates the body in pydantic's
strict mode (``integrations`` included) and turns its first error into an ``APIError``
whose ``param`` is the user's field path (``_user_loc``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ValidationError

from service.errors import APIError, loc_to_param
from trainers.contract.formats import LONE_SURROGATE, lone_surrogate
from trainers.contract.graders.spec import GRADER_TYPES
from trainers.contract.integrations import INTEGRATION_TYPES
from trainers.contract.judges.spec import JUDGE_TYPES
from trainers.contract.methods import METHODS, PLANNED_METHODS
from trainers.contract.spec import JobSpec, legacy_method, normalize_method


def parse_spec(body: dict[str, Any]) -> JobSpec:
    check_numbers(body)
    body = dict(body)
    if "spec_version" in body:
        raise APIError(
            400, "spec_version is set by the server", param="spec_version", code="invalid_value"
        )
    legacy = body.pop("hyperparameters", None)  # OpenAI's deprecated top-level field
    if legacy and body.get("method"):
        raise APIError(
            400,
            "hyperparameters (the deprecated top-level field) and method are both set; put "
            "the hyperparameters in method.<type>.hyperparameters and drop the top-level field",
            param="hyperparameters",
            code="invalid_value",
        )
    if legacy and not body.get("method"):
        body["method"] = legacy_method(legacy)
    _check_method(body)
    try:
        # strict: "3" and true are not numbers, 1 is not a boolean (JSON's own types only)
        return JobSpec.model_validate_json(json.dumps(body), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _user_loc(err["loc"])
        if err["type"].startswith("union_tag") and loc[:1] == ("integrations",):
            loc = (*loc, "type")  # an integration of no or an unknown type
        param = loc_to_param(loc)
        raise APIError(
            400,
            f"{param or 'body'}: {err['msg'].removeprefix('Value error, ')}",
            param=param or None,
            code="invalid_value",
        ) from None


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
        elif isinstance(v, str) and lone_surrogate(v) is not None:
            raise APIError(
                400, f"{path or 'body'}: {LONE_SURROGATE}", param=path or None, code="invalid_value"
            )
        if isinstance(v, dict) and any(lone_surrogate(str(k)) is not None for k in v):
            raise APIError(
                400,
                f"{path or 'body'}: a field name {LONE_SURROGATE}",
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
    # judge.<type>.x -> judge.x, grader.<type>.x -> grader.x, and a grader in a list or
    # map of graders: graders[0].<type>.x -> graders[0].x, graders.<key>.<type>.x -> ...;
    # integrations[0].<type>.<type>.x -> integrations[0].<type>.x
    tags = {"judge": JUDGE_TYPES, "grader": GRADER_TYPES}
    kept = []
    for i, p in enumerate(out):
        prev, before = (out[i - 1] if i else None), (out[i - 2] if i > 1 else None)
        if (
            isinstance(p, str)
            and i
            and (
                p in tags.get(prev, ())
                or (before == "graders" and p in GRADER_TYPES)
                or (before == "integrations" and p in INTEGRATION_TYPES)  # integrations[0].<type>
            )
        ):
            continue
        kept.append(p)
    return tuple(kept)
