"""The OpenAPI document, made to say what the API really does.

FastAPI's generated document is the starting point; this module corrects it:

* ``POST /v1/fine_tuning/jobs`` takes the job spec (``trainers.contract.spec.JobSpec``: the
  method union with every method's hyperparameters), not a free-form object. The
  route still receives the raw body and validates it itself (``service.jobrequest``),
  so the messages of a bad body stay the ones the API has always given, as 400s.
* ``POST /v1/files`` is a multipart form the route parses while streaming
  (``service.upload``); its fields are declared here.
* Error answers are declared by each route (``service.errors.error_responses``) as
  the OpenAI error object; this module adds 401 to every ``/v1/`` operation when the
  API has keys. FastAPI's 422 never occurs (validation errors are 400s) and is removed.
* Content routes declare the media type they stream; bearer auth is declared when
  the API has keys.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.errors import ERROR_SCHEMA, error_responses
from trainers.contract.methods import DEFAULT_METHOD, METHOD_ALIASES
from trainers.contract.spec import JobSpec

_SPEC_PREFIX = "spec."


def _job_body(components: dict[str, Any]) -> dict[str, Any]:
    """JobSpec's schema as a request body: what a caller may send (``spec_version`` is the
    server's; ``method`` defaults to supervised; OpenAI's deprecated ``hyperparameters``
    field is accepted as the API accepts it)."""
    schema = JobSpec.model_json_schema(
        ref_template=f"#/components/schemas/{_SPEC_PREFIX}{{model}}", mode="validation"
    )
    for name, sub in schema.pop("$defs", {}).items():
        components[f"{_SPEC_PREFIX}{name}"] = sub
    schema["properties"].pop("spec_version", None)
    schema["required"] = [r for r in schema.get("required", []) if r not in ("method",)]
    aliases = ", ".join(f"'{a}' for '{m}'" for a, m in METHOD_ALIASES.items())
    schema["properties"]["method"]["description"] = (
        f"The training method; default {DEFAULT_METHOD} (aliases: {aliases})."
    )
    schema["properties"]["hyperparameters"] = {
        "type": "object",
        "deprecated": True,
        "description": f"OpenAI's deprecated top-level field: the {DEFAULT_METHOD} method's "
        "hyperparameters, used when 'method' is not given.",
    }
    schema["title"] = "JobCreateRequest"
    components["JobCreateRequest"] = schema
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreateRequest"}}
        },
    }


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "JSONL, one training row per line (UTF-8; a BOM is "
                        "accepted).",
                    },
                    "purpose": {"type": "string", "enum": ["fine-tune", "evals"]},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {
                        "type": "integer",
                        "minimum": 3600,
                        "maximum": 2592000,
                        "description": "The file is deleted this long after its creation.",
                    },
                },
            }
        }
    },
}

_METADATA_FILTER = {
    "name": "metadata",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "description": "Only jobs whose metadata holds every given pair: metadata[key]=value "
    "(keys of 1 to 64 characters; a value is compared as the text the query carries).",
    # Values are any JSON: a query carries only text, so `false` and "false" arrive alike;
    # declaring strings would call the text of a boolean a schema violation.
    "schema": {
        "type": "object",
        "propertyNames": {"minLength": 1, "maxLength": 64},
        "additionalProperties": {},
    },
}


def _ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


# The uploaded file's id feeds the routes that take one (stateful API testing follows them).
_FILE_LINKS = {
    name: {"operationRef": _ref(path, method), "parameters": {"file_id": "$response.body#/id"}}
    for name, path, method in (
        ("RetrieveFile", "/v1/files/{file_id}", "get"),
        ("FileContent", "/v1/files/{file_id}/content", "get"),
        ("DeleteFile", "/v1/files/{file_id}", "delete"),
    )
}


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["Error"] = ERROR_SCHEMA
    auth = bool(app.state.keyring.enabled) if hasattr(app.state, "keyring") else False
    if auth:
        schema["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer"}
        }
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/v1/fine_tuning/jobs" and method == "post":
                op["requestBody"] = _job_body(components)
            if path == "/v1/fine_tuning/jobs" and method == "get":
                op.setdefault("parameters", []).append(copy.deepcopy(_METADATA_FILTER))
            if path == "/v1/files" and method == "post":
                op["requestBody"] = copy.deepcopy(_UPLOAD_BODY)
                responses["200"]["links"] = copy.deepcopy(_FILE_LINKS)
            if path == "/v1/files/{file_id}/content":
                responses["200"]["content"] = {
                    "application/jsonl": {"schema": {"type": "string", "format": "binary"}}
                }
            if path.endswith("/checkpoints/{checkpoint_id}/content"):
                responses["200"]["content"] = {
                    "application/x-tar": {"schema": {"type": "string", "format": "binary"}}
                }
            if auth and path.startswith("/v1/"):
                responses.update(error_responses(401))
            if auth and path.startswith("/v1/"):
                op["security"] = [{"bearerAuth": []}]
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
