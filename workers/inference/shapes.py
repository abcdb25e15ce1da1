"""OpenAI's chat and completion shapes over an engine that implements only part of them.

The front sends each request to its engine as one or more *sub-requests* and puts the
answers back together, so that every engine answers the same way:

* ``n`` choices (and several ``prompt`` strings of a completion) become one sub-request
  per choice where the engine has no ``n`` of its own; a given ``seed`` becomes
  ``seed + i`` for choice ``i`` so the choices differ as OpenAI's do;
* ``max_completion_tokens`` is ``max_tokens``; a ``stop`` sequence is cut from the text
  where the engine leaves it in (OpenAI's answers end before it);
* ``usage`` is counted on every answer (the prompt once per prompt); a stream carries it
  in one last chunk with no choices when ``stream_options.include_usage`` asks, and
  always ends with ``data: [DONE]``;
* ``model`` in answers is the name the caller used, never the engine's path;
* engine errors (FastAPI's ``detail``, vLLM's ``error``) become OpenAI's error object.

Parameters the engine lacks and the front cannot supply are refused by ``unsupported``.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

# Parameters that change nothing about the answer: accepted, never sent to an engine.
DROPPED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})

# Parameters an engine without them can still honour at their neutral value.
NEUTRAL = frozenset(
    {
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "echo",
        "best_of",
        "suffix",
        "tool_choice",
        "response_format",
    }
)

# Handled by the front whatever the engine.
FRONT = frozenset({"model", "messages", "prompt", "n", "stream", "stream_options"})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def neutral(key: str, value: Any) -> bool:
    """Whether ``value`` of ``key`` asks for nothing beyond plain sampling."""
    if value is None:
        return True
    if key in ("presence_penalty", "frequency_penalty"):
        return _number(value) and value == 0
    if key == "logprobs":  # a bool in chat, a count in completions
        return value is False or (_number(value) and value == 0)
    if key == "top_logprobs":
        return _number(value) and value == 0
    if key == "logit_bias":
        return value == {}
    if key == "echo":
        return value is False
    if key == "best_of":
        return _number(value) and value == 1
    if key == "suffix":
        return value == ""
    if key == "tool_choice":
        return value == "auto"
    if key == "response_format":
        return isinstance(value, dict) and value.get("type") == "text"
    return False


def unsupported(body: dict, native: frozenset[str]) -> list[str]:
    """Parameters of ``body`` with a value the engine cannot honour (sorted)."""
    out = []
    for key, value in body.items():
        if key in FRONT or key in DROPPED or key in native or key == "max_completion_tokens":
            continue
        if key in NEUTRAL and neutral(key, value):
            continue
        out.append(key)
    return sorted(out)


def error(status: int, message: str, *, type: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def engine_error(status: int, payload: Any) -> tuple[int, dict]:
    """An engine's error answer as OpenAI's error object (4xx stay the caller's fault)."""
    message = None
    param = code = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            message, param, code = err.get("message"), err.get("param"), err.get("code")
        elif isinstance(err, str):
            message = err
        elif isinstance(payload.get("message"), str):
            message = payload["message"]
        elif payload.get("detail") is not None:
            detail = payload["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)[:500]
    if status < 500:
        return status, error(
            status,
            message or "the engine refused the request",
            type="invalid_request_error",
            code=str(code) if code else "invalid_request",
            param=param,
        )
    return 500, error(
        500, "the inference engine failed to answer", type="server_error", code="engine_error"
    )


def sub_requests(body: dict, kind: str, engine_model: str, native: frozenset[str]) -> list[dict]:
    """The requests the engine gets for ``body``; each carries ``_prompt`` (its prompt's
    index) and ``_choice`` (its first choice index) for ``merge``."""
    base = {k: v for k, v in body.items() if k not in DROPPED and k != "stream_options"}
    base["model"] = engine_model
    if "max_completion_tokens" in base:
        value = base.pop("max_completion_tokens")
        if value is not None and base.get("max_tokens") is None:
            base["max_tokens"] = value
    for key in list(base):  # neutral values an engine without them must not see
        if key in NEUTRAL and key not in native:
            del base[key]
    if body.get("stream") and "stream_options" in native:
        base["stream_options"] = {"include_usage": True}
    prompts: list[Any]
    if (
        kind == "completion"
        and isinstance(body.get("prompt"), list)
        and body["prompt"]
        and all(isinstance(p, str) for p in body["prompt"])
    ):
        prompts = list(body["prompt"])
    else:
        prompts = [None]
    n = int(body.get("n") or 1)
    out = []
    choice = 0
    for p_index, prompt in enumerate(prompts):
        req = copy.deepcopy(base)
        if prompt is not None:
            req["prompt"] = prompt
        if "n" in native:
            req["_prompt"], req["_choice"] = p_index, choice
            out.append(req)
            choice += n
            continue
        req.pop("n", None)
        for i in range(n):
            one = copy.deepcopy(req)
            if body.get("seed") is not None:
                one["seed"] = int(body["seed"]) + i
            one["_prompt"], one["_choice"] = p_index, choice
            out.append(one)
            choice += 1
    return out


def engine_body(sub: dict) -> dict:
    return {k: v for k, v in sub.items() if not k.startswith("_")}


def stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    return [s for s in stop or [] if s]


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


class StopTrimmer:
    """Streams text, holding back what could be the start of a stop sequence, and ends
    the text before the first stop sequence."""

    def __init__(self, stop: list[str]):
        self.stop, self.held, self.done = stop, "", False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def feed(self, text: str) -> str:
        if self.done or not self.stop:
            return "" if self.done else text
        self.held += text
        cut, hit = cut_at_stop(self.held, self.stop)
        if hit:
            self.done, self.held = True, ""
            return cut
        keep = len(self.held) - self.hold if self.hold else len(self.held)
        out, self.held = self.held[: max(keep, 0)], self.held[max(keep, 0) :]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.done else self.held), ""
        return out


class Answer:
    """Puts the sub-requests' answers back into one OpenAI object (or one stream)."""

    def __init__(self, kind: str, name: str, body: dict, trim_stops: bool):
        self.kind, self.name = kind, name
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.stop = stops(body) if trim_stops else []
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    # ---- usage
    def count(self, sub: dict, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt_tokens.setdefault(sub["_prompt"], int(usage.get("prompt_tokens") or 0))
        self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    # ---- whole answers
    def merge(self, parts: Iterable[tuple[dict, dict]]) -> dict:
        choices = []
        fingerprint = None
        for sub, answer in parts:
            self.count(sub, answer.get("usage"))
            fingerprint = fingerprint or answer.get("system_fingerprint")
            for c in answer.get("choices") or []:
                c = dict(c)
                c["index"] = sub["_choice"] + int(c.get("index") or 0)
                if self.stop:
                    self._trim_choice(c)
                c.setdefault("logprobs", None)
                choices.append(c)
        choices.sort(key=lambda c: c["index"])
        out = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.name,
            "choices": choices,
            "usage": self.usage(),
        }
        if fingerprint:
            out["system_fingerprint"] = fingerprint
        return out

    def _trim_choice(self, c: dict) -> None:
        if self.kind == "chat":
            msg = dict(c.get("message") or {})
            if isinstance(msg.get("content"), str):
                msg["content"], hit = cut_at_stop(msg["content"], self.stop)
                if hit:
                    c["finish_reason"] = "stop"
            c["message"] = msg
        elif isinstance(c.get("text"), str):
            c["text"], hit = cut_at_stop(c["text"], self.stop)
            if hit:
                c["finish_reason"] = "stop"

    # ---- streams
    def chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.name,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return sse(obj)

    def rewrite_chunk(self, sub: dict, event: dict, trimmers: dict[int, StopTrimmer]) -> bytes:
        """One engine chunk as the caller's chunk (b"" when nothing is left of it)."""
        self.count(sub, event.get("usage"))
        choices = []
        for c in event.get("choices") or []:
            c = dict(c)
            index = sub["_choice"] + int(c.get("index") or 0)
            c["index"] = index
            if self.stop:
                trimmer = trimmers.setdefault(index, StopTrimmer(self.stop))
                if self.kind == "chat":
                    delta = dict(c.get("delta") or {})
                    if isinstance(delta.get("content"), str):
                        delta["content"] = trimmer.feed(delta["content"])
                        if c.get("finish_reason"):
                            delta["content"] += trimmer.flush()
                        if trimmer.done and not c.get("finish_reason"):
                            c["finish_reason"] = None
                    elif c.get("finish_reason"):
                        rest = trimmer.flush()
                        if rest:
                            delta["content"] = rest
                    c["delta"] = delta
                elif isinstance(c.get("text"), str):
                    c["text"] = trimmer.feed(c["text"])
                    if c.get("finish_reason"):
                        c["text"] += trimmer.flush()
                if c.get("finish_reason") and trimmer.done:
                    c["finish_reason"] = "stop"
            c.setdefault("logprobs", None)
            choices.append(c)
        if not choices:
            return b""
        return self.chunk(choices)

    def usage_chunk(self) -> bytes:
        return self.chunk([], self.usage()) if self.include_usage else b""


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
