"""Tools of an RL job: OpenAI function definitions, each bound to the user's HTTP endpoint.

A ``grpo`` or ``reinforcement`` job may list ``tools`` in its method block. Each is an
OpenAI function tool (``type: function``, ``function: {name, description, parameters}``,
``parameters`` a JSON schema of an object) plus an ``endpoint`` posttrain calls when the
model calls the function during a rollout: ``url``, ``method`` (POST or PUT) and
``headers``. The request body is the call's arguments as JSON; the reply's text (at most
``tool_max_reply_bytes``) becomes the tool message the model reads next.

Only the function definition reaches the model (the chat template's tools section);
the endpoint never does. Header values are secrets: the API moves them out of the job
spec before it is stored (``split_secrets``), so the job record, its GET, events and the
run plan on disk carry ``[redacted]`` in their place, and the worker hands the values to
the training process beside the plan (``merge_secrets``).

The URL must pass the server's outbound policy (``trainers.contract.outbound``) at
creation and again before every call. Pure pydantic plus ``jsonschema``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import Field, field_validator

from trainers.contract.hparams import Strict

REDACTED = "[redacted]"
MAX_TOOLS = 32
# The environment variable the worker passes a run's secrets in (JSON, the job's secrets
# key: {"tool_headers": {tool: {header: value}}, "grader_headers": {position: {...}},
# "environment_headers": {header: value}});
# the training process reads it and removes it.
SECRETS_ENV = "POSTTRAIN_TOOL_SECRETS"
_HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$"
# Headers posttrain sets itself (or that would change how the body is framed).
_RESERVED_HEADERS = {"content-length", "content-type", "host", "transfer-encoding", "connection"}


def check_headers(value: dict[str, str] | None) -> dict[str, str] | None:
    """Headers sent to a user's endpoint (a tool's, an endpoint grader's): at most 16
    valid names, none that posttrain sets itself, values on one line. The messages never
    quote a value."""
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("headers holds at most 16 entries")
    for name, text in value.items():
        if re.fullmatch(_HEADER_NAME, name) is None:
            raise ValueError(f"header name '{name[:64]}' is not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header '{name}' is set by posttrain; drop it")
        if len(text) > 4096 or any(c in text for c in "\r\n\0"):
            raise ValueError(f"header '{name}': at most 4096 characters, no line breaks")
    return value


class FunctionDef(Strict):
    """OpenAI's function definition: what the model is told about the tool."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$", description="The tool's name.")
    description: str | None = Field(None, max_length=2048, description="What the tool does.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments object; calls are validated against it.",
    )

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as exc:
            raise ValueError(f"parameters is not a valid JSON schema: {exc.message}") from None
        if value.get("type") != "object":
            raise ValueError("parameters must be a JSON schema of type 'object' (the arguments)")
        if len(json.dumps(value)) > 16384:
            raise ValueError("parameters may be at most 16384 characters of JSON")
        return value


class ToolEndpoint(Strict):
    """Where a call of the tool is sent. Header values are secrets (see the module doc)."""

    url: str = Field(min_length=1, max_length=2048, description="http(s) URL of the tool.")
    method: Literal["POST", "PUT"] = Field("POST", description="The arguments go as a JSON body.")
    headers: dict[str, str] | None = Field(
        None, description="Sent with every call (e.g. authorization); values are kept secret."
    )

    _headers = field_validator("headers")(classmethod(lambda cls, v: check_headers(v)))


class Tool(Strict):
    """One tool: an OpenAI function definition bound to an HTTP endpoint."""

    type: Literal["function"] = "function"
    function: FunctionDef
    endpoint: ToolEndpoint

    def schema(self) -> dict[str, Any]:
        """The definition the chat template renders (never the endpoint)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


def check_unique(tools: list[Tool] | None) -> list[Tool] | None:
    names = [t.function.name for t in tools or ()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"tool names must be unique; '{dup[0]}' is given more than once")
    return tools


def split_secrets(tools: list[Tool]) -> tuple[list[Tool], dict[str, dict[str, str]]]:
    """(the tools with every header value replaced by ``[redacted]``, the values by tool
    name). What the API stores, and what it keeps apart."""
    secrets: dict[str, dict[str, str]] = {}
    redacted = []
    for tool in tools:
        headers = tool.endpoint.headers
        if headers:
            secrets[tool.function.name] = dict(headers)
            endpoint = tool.endpoint.model_copy(
                update={"headers": dict.fromkeys(headers, REDACTED)}
            )
            tool = tool.model_copy(update={"endpoint": endpoint})
        redacted.append(tool)
    return redacted, secrets


def merge_secrets(tools: list[Tool], secrets: dict[str, dict[str, str]]) -> list[Tool]:
    """The stored (redacted) tools with their header values back; a value the secrets do
    not hold stays ``[redacted]`` and is not sent."""
    out = []
    for tool in tools:
        headers = tool.endpoint.headers or {}
        given = secrets.get(tool.function.name, {})
        real = {k: given[k] for k in headers if k in given}
        out.append(
            tool.model_copy(update={"endpoint": tool.endpoint.model_copy(update={"headers": real})})
        )
    return out


def pop_secrets_from_env() -> dict[str, Any]:
    """The job's secrets the worker passed this process, as the job's secrets key holds
    them (``tool_headers``: by tool name; ``grader_headers``: by grader position, see
    ``trainers.contract.graders.remote``; ``environment_headers``, see
    ``trainers.contract.environments``), and remove them from the environment, so
    nothing this process starts inherits them."""
    raw = os.environ.pop(SECRETS_ENV, "")
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
