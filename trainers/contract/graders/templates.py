"""Grader templates: ``{{ item.field }}`` and ``{{ sample.output_text }}``, torch-free.

OpenAI's graders substitute ``{{ namespace.variable }}`` in their text fields
(https://platform.openai.com/docs/guides/graders, "Templating"). Two namespaces
exist:

* ``item``: the dataset row being graded. Nested values are reached with dots
  (``{{ item.meta.answer }}``); list elements with an index, written either
  ``{{ item.answers.0 }}`` or ``{{ item.answers[0] }}``.
* ``sample``: the model's output. posttrain fills ``output_text`` (the completion
  as text) and ``output_json`` (the completion parsed as JSON, which may be
  followed by a path, e.g. ``{{ sample.output_json.name }}``).
* the episode of an RL job with tools (the trajectory; a sample without tools is one
  assistant message and no calls):

  - ``sample.messages``: the completion's messages in order, as JSON: assistant
    turns (``content`` and any ``tool_calls``, each ``{"name", "arguments"}``) and
    ``tool`` turns (``name``, ``content``: the text the model read back);
  - ``sample.tool_calls``: one ``{"name", "arguments", "result"}`` per call the model
    wrote, in order, ``result`` being the tool message that answered it (an ``error:``
    text when the call failed; null when the episode ended before it was run: its
    last turn, or the length limit);
  - ``sample.tool_call_count``: how many calls the model wrote (an integer).

  A path may follow the first two (``{{ sample.tool_calls.0.result }}``); a path the
  episode does not have (no call was made, or none answered) is the sample's fault and
  scores 0.

Departures from OpenAI: ``sample.output_tools``, ``sample.choices`` and
``sample.output_audio`` are rejected when the grader is validated (an RL job's
tool calls are ``sample.tool_calls`` above). Any other namespace, or a ``{{ }}`` that does
not hold ``namespace.variable``, is rejected the same way. Rendering is one
pass: text substituted from a row is never itself re-read as a template.

Strings render as themselves; every other value renders as JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EpisodeText",
    "GraderError",
    "Ref",
    "SampleParseError",
    "TemplateError",
    "parse_template",
    "render",
    "resolve_path",
]

# Fields of the sample namespace posttrain can fill, and those it refuses.
SAMPLE_FIELDS = ("output_text", "output_json", "messages", "tool_calls", "tool_call_count")
_SAMPLE_REFUSED = ("output_tools", "choices", "output_audio")

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*|\d+")
_INDEX = re.compile(r"\[(\d+)\]")


class GraderError(ValueError):
    """A grader could not score a sample.

    ``flag`` names the key of OpenAI's run-response ``metadata.errors`` that
    reports it; ``soft`` errors depend on the sample (the model's output was not
    JSON, a formula divided by zero) and score 0, the others are data or spec
    problems and stop the caller.
    """

    flag = "other_error"
    soft = False


class TemplateError(GraderError):
    """A template names a variable that is missing or malformed."""

    flag = "invalid_variable_error"


class SampleParseError(GraderError):
    """``sample.output_json`` was asked for but the sample is not JSON."""

    flag = "sample_parse_error"
    soft = True


@dataclass(frozen=True)
class Ref:
    """One ``{{ namespace.path }}`` occurrence: ``path`` holds the segments after it."""

    namespace: str
    path: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _split_path(text: str) -> tuple[str, ...]:
    flat = _INDEX.sub(r".\1", text.strip())
    parts = tuple(flat.split("."))
    if not all(_SEGMENT.fullmatch(p) for p in parts):
        raise TemplateError(f"'{{{{ {text.strip()} }}}}' is not of the form namespace.variable")
    return parts


def _ref(inner: str) -> Ref:
    namespace, *path = _split_path(inner)
    if namespace == "item":
        if not path:
            raise TemplateError("'{{ item }}' needs a field: write {{ item.<field> }}")
        return Ref("item", tuple(path))
    if namespace == "sample":
        head = path[0] if path else ""
        if head in _SAMPLE_REFUSED:
            raise TemplateError(
                f"'sample.{head}' is not available in posttrain (an RL job's tool calls are "
                "sample.tool_calls); "
                f"use one of {', '.join('sample.' + f for f in SAMPLE_FIELDS)}"
            )
        if head not in SAMPLE_FIELDS or (
            head in ("output_text", "tool_call_count") and len(path) > 1
        ):
            raise TemplateError(
                f"unknown sample variable '{'.'.join(path) or '(none)'}'; "
                f"use one of {', '.join('sample.' + f for f in SAMPLE_FIELDS)}"
            )
        return Ref("sample", tuple(path))
    raise TemplateError(
        f"unknown template namespace '{namespace}' in '{{{{ {inner.strip()} }}}}'; "
        "the only namespaces are 'item' (the dataset row) and 'sample' (the model's output)"
    )


def parse_template(text: str) -> list[Ref]:
    """Every variable ``text`` reads, in order; raises ``TemplateError`` on a bad one."""
    return [_ref(m.group(1)) for m in _TEMPLATE.finditer(text)]


def resolve_path(value: Any, path: tuple[str, ...], where: str) -> Any:
    """Walk ``path`` into nested dicts and lists; ``where`` names the root in errors."""
    for i, key in enumerate(path):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            missing = ".".join((where, *path[: i + 1]))
            raise TemplateError(f"template variable '{missing}' is not in the {where}")
    return value


class EpisodeText(str):
    """A sample's text that also carries its episode's messages (an RL rollout with
    tools): what ``sample.messages`` and ``sample.tool_calls`` read. A plain ``str``
    sample is one assistant message."""

    messages: list[dict[str, Any]]

    def __new__(cls, text: str, messages: list[dict[str, Any]]):
        out = super().__new__(cls, text)
        out.messages = messages
        return out


def episode_messages(sample: str) -> list[dict[str, Any]]:
    """The episode's messages, normalised: role, content, and the calls' name and
    arguments (assistant) or the tool's name (tool)."""
    raw = getattr(sample, "messages", None)
    if raw is None:
        return [{"role": "assistant", "content": str(sample)}]
    out = []
    for m in raw:
        msg = {"role": m.get("role", "assistant"), "content": _content(m.get("content"))}
        if m.get("role") == "tool":
            msg["name"] = m.get("name")
        calls = [_call(c) for c in m.get("tool_calls") or ()]
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _content(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function", call)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": fn.get("name"), "arguments": args}


def tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``{name, arguments, result}`` per call; the tool messages that follow an
    assistant turn answer its calls in order."""
    calls: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant":
            waiting = [{**c, "result": None} for c in m.get("tool_calls", ())]
            calls += waiting
        elif m["role"] == "tool" and waiting:
            waiting.pop(0)["result"] = m["content"]
    return calls


def _sample_value(ref: Ref, sample_text: str) -> Any:
    head = ref.path[0]
    if head == "output_text":
        return sample_text
    if head in ("messages", "tool_calls", "tool_call_count"):
        messages = episode_messages(sample_text)
        value: Any = messages if head == "messages" else tool_calls(messages)
        if head == "tool_call_count":
            return len(value)
        try:
            value = resolve_path(value, ref.path[1:], f"sample.{head}")
        except TemplateError as exc:  # a call the episode did not make: the sample's fault
            raise SampleParseError(str(exc)) from None
        if value is None:  # a call the episode ended before answering
            raise SampleParseError(f"sample.{ref.dotted} is empty (the call was not answered)")
        return value
    try:
        parsed = json.loads(sample_text)
    except ValueError:
        raise SampleParseError("the sample is not JSON, so sample.output_json is empty") from None
    try:
        return resolve_path(parsed, ref.path[1:], "sample.output_json")
    except TemplateError as exc:  # a field the model left out is the sample's fault
        raise SampleParseError(str(exc)) from None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(text: str, item: Any, sample_text: str) -> str:
    """``text`` with every ``{{ ... }}`` replaced from ``item`` and ``sample_text``."""

    def fill(match: re.Match) -> str:
        ref = _ref(match.group(1))
        if ref.namespace == "item":
            return _as_text(resolve_path(item, ref.path, "item"))
        return _as_text(_sample_value(ref, sample_text))

    return _TEMPLATE.sub(fill, text)
