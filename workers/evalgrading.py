"""How an eval run samples and grades one row (``output_item``), for the run's task
(``workers.evaltasks``, which claims the run, reads its rows and stores what this makes).

A row's sample is the model's answer (a ``completions`` run: the rendered
``input_messages`` sent to a live inference worker, ``http_sampler``) or the row's own
``sample`` (a ``jsonl`` run). It is graded with every criterion of the run
(``criteria_of``); the output item, its counter (passed, failed or errored) and the
counts it adds (per criterion, and the models' usage) are returned for the task to
store.

How a criterion is graded is the run spec's ``grading`` (decided by the API, which
resolved its models for the tenant):

* graders that load no model: a row's are graded together in one bounded child
  (``run_isolated_many``: time and memory capped; one process start per row, not per
  criterion), so a pathological sample costs one errored row, never the worker;
* ``local``: a reward model (``score_model``) or an encoder (cosine ``text_similarity``),
  loaded once in the run's own grading process, which has no memory cap (torch needs
  more than a bounded child may have);
* ``judge``: a ``label_model``, or a ``score_model`` whose model is a chat model: its
  rendered ``input`` is sent as a chat completion to a live inference worker, as a
  completions run's rows are (``http_chat``; ``trainers.contract.graders.judging`` reads
  the answer). The result's ``sample`` holds the judge's input, answer and usage (and a
  label_model's result its ``label``); the judge's calls count into the run's
  ``per_model_usage`` under the judge model's name.

Pass rule (``passes``): a criterion passes when its score >= its ``pass_threshold`` where
it has one (text_similarity, and a score_model or python grader given one), when its
score >= 1.0 for a string_check, and when its score > 0.5 for the other graders (regex,
math_verify, multi, length_penalty, a score_model or python grader without
pass_threshold, and a label_model, whose score is 1 exactly when the judge's label is one
of its passing_labels). An item passes when
every criterion passes. An item is ``errored`` (and its output item's status ``fail``)
when its sample could not be had (the inference worker refused or stayed unreachable, a
template read a field the row lacks) or a criterion could not grade it (a template
variable missing, a grader that failed or ran out of time, a judge that could not be
asked: ``model_grader_server_error``; a python grader whose sandbox could not run:
``python_grader_server_error``); a sample the grader could not parse
(``sample.output_json`` of a non-JSON answer) or a judge's answer that names no label or
holds no number (``model_grader_parse_error``, quoting it) is a fail, not an error, and
so is a sample a python grader's ``grade`` failed on (it raised, returned no number, or
hit a sandbox limit: ``python_grader_runtime_error``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from trainers.contract.graders.judging import (
    judge_messages,
    judge_params,
    label_score,
    parse_label,
    parse_score,
)
from trainers.contract.graders.scoring import (
    GradeReport,
    grade_report,
    run_isolated_many,
)
from trainers.contract.graders.spec import (
    THRESHOLD_CRITERIA,
    LabelModelGrader,
    needs_model,
    parse_criterion,
    parse_grader,
)
from trainers.contract.graders.templates import GraderError, render, resolve_path
from workers.evalruns import NO_ERROR, EvalRunStore, output_item_id, usage_field
from workers.inference.registry import live_workers, pick
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from trainers.contract.sandbox import SandboxPolicy

MODEL_HEADER = "X-Posttrain-Model"
# Grader flags that mean the criterion could not grade the item (an error), as opposed
# to a sample the grader scored 0 (sample_parse_error, formula_parse_error, ...).
HARD_FLAGS = (
    "invalid_variable_error",
    "other_error",
    "unresponsive_reward_error",
    "model_grader_server_error",
    "python_grader_server_error",
)
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # between tries of an unreachable inference worker
RETRY_STATUSES = (429, 502, 503, 504)

Sampler = Callable[[list[dict[str, str]]], dict[str, Any]]
# (model header, messages, request parameters) -> an answer, as a Sampler's
Judge = Callable[[dict[str, Any], list[dict[str, str]], dict[str, Any]], dict[str, Any]]


class RunFailed(Exception):
    """The whole run cannot go on (its file or model is gone)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Criterion:
    """One testing criterion as the worker grades it (``grading``: module docstring)."""

    name: str
    kind: str
    grader: Any  # a local plan's grader has its models' directories
    threshold: float | None
    how: str = "bounded"  # or "local", "judge"
    model: dict[str, Any] | None = None  # a judge's inference header


def criteria_of(spec: dict[str, Any]) -> list[Criterion]:
    """The run's criteria with their grading plans; RunFailed when a criterion's model
    has no plan (an eval stored before judges existed) or its directory is gone."""
    criteria = spec["criteria"]
    plans = spec.get("grading") or [None] * len(criteria)
    out = []
    for i, (criterion, plan) in enumerate(zip(criteria, plans, strict=True)):
        raw = dict(criterion)
        threshold = raw.get("pass_threshold")
        if raw.get("type") in THRESHOLD_CRITERIA:
            raw.pop("pass_threshold", None)
        c = Criterion(raw.get("name", ""), raw.get("type", ""), parse_criterion(raw), threshold)
        shown = f"testing_criteria[{i}] ({c.name})"
        if plan is None:
            if isinstance(c.grader, LabelModelGrader) or needs_model(c.grader):
                raise RunFailed(
                    "invalid_eval",
                    f"{shown} names a model that the eval's record does not resolve (the "
                    "eval was stored before eval runs graded with models): create it again",
                )
        elif plan["how"] == "local":
            c.how, c.grader = "local", parse_grader(plan["grader"])
        else:
            c.how, c.model = "judge", plan["model"]
            path = c.model.get("path") or ""
            if path.startswith("/") and not Path(path).exists():
                raise RunFailed(
                    "model_not_found",
                    f"{shown}: the judge model '{c.model.get('name')}' is gone (it was deleted)",
                )
        out.append(c)
    return out


def _grade_bounded(
    criteria: list[Criterion], item: Any, text: str, sandbox: SandboxPolicy | None = None
) -> list[GradeReport]:
    """The criteria that load no model, on one row, in one bounded child (time and memory
    capped): a pathological sample errs the row's criteria, never the worker. A python
    criterion runs in the worker's sandbox (``sandbox``, its settings), inside that child."""
    return run_isolated_many([c.grader for c in criteria], item, text, sandbox=sandbox)


def _grade(c: Criterion, item: Any, text: str, judge: Judge | None, increments: dict):
    """One criterion that loads a model (a judge, or ``local``) on one row: its report and
    what the result adds (a judge's sample). The bounded ones: ``_grade_bounded``."""
    if c.how == "judge":
        return _judged(c, item, text, judge, increments)
    try:
        return grade_report(c.grader, item, text), {}
    except Exception as exc:  # a model that will not load, ...: this row's error
        detail = f"{type(exc).__name__}: {exc}"[:500]
        return GradeReport(reward=0.0, errors={"other_error": detail}), {}


def _judged(c: Criterion, item: Any, text: str, judge: Judge | None, increments: dict):
    """Ask the criterion's judge about one row and read its answer (module docstring)."""
    start = time.perf_counter()
    report = GradeReport(reward=0.0)
    extra: dict[str, Any] = {"sample": None}
    if isinstance(c.grader, LabelModelGrader):
        extra["label"] = None
    try:
        messages = judge_messages(c.grader, item, text)
    except GraderError as exc:
        report.errors[exc.flag] = str(exc)
        return report, extra
    params = judge_params(c.grader)
    sample = _judge_sample(c.grader.model, messages, params)
    extra["sample"] = sample
    answer = judge(c.model, messages, params)  # type: ignore[misc]
    if "error" in answer:
        sample["error"] = answer["error"]
        report.errors["model_grader_server_error"] = (
            f"the judge {c.grader.model} could not be asked: {answer['error'].get('message')}"
        )
        report.execution_time = time.perf_counter() - start
        return report, extra
    content = answer.get("content") or ""
    sample["output"] = [{"role": "assistant", "content": content}]
    sample["finish_reason"] = answer.get("finish_reason") or ""
    sample["usage"] = counts = _usage(answer)
    for key, value in {**counts, "invocation_count": 1}.items():
        field = usage_field(c.grader.model, key)
        increments[field] = increments.get(field, 0) + value
    try:
        if isinstance(c.grader, LabelModelGrader):
            extra["label"] = parse_label(content, c.grader.labels)
            report.reward = label_score(c.grader, extra["label"])
        else:
            report.reward = parse_score(content, c.grader.range)
    except GraderError as exc:
        report.errors[exc.flag] = str(exc)
    report.execution_time = time.perf_counter() - start
    return report, extra


def _judge_sample(model: str, messages: list, params: dict[str, Any]) -> dict[str, Any]:
    """A judge's call in the shape of an output item's sample (what it was sent and,
    once answered, its answer and usage)."""
    return {
        "input": messages,
        "output": [],
        "usage": dict.fromkeys(_USAGE_KEYS, 0),
        "error": NO_ERROR,
        "finish_reason": "",
        "model": model,
        "seed": params.get("seed", 0),
        "temperature": float(params.get("temperature", 0.0)),
        "top_p": float(params.get("top_p", 1.0)),
        "max_completion_tokens": int(params.get("max_completion_tokens", 0)),
    }


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")


def _usage(answer: dict[str, Any]) -> dict[str, int]:
    usage = answer.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0),
        "cached_tokens": int(cached),
    }


def passes(kind: str, score: float, threshold: float | None) -> bool:
    """The pass rule (module docstring)."""
    if threshold is not None:
        return score >= threshold
    if kind == "string_check":
        return score >= 1.0
    return score > 0.5


def output_item(run, spec, graders, index, row, sampler, judge=None, sandbox=None):
    """Row ``index`` sampled (``sampler``, a completions run's) and graded with the run's
    criteria (``criteria_of``): the output item, its counter (``passed``, ``failed`` or
    ``errored``) and the counts it adds to the run's."""
    item = row["item"]
    sampling = spec.get("sampling") or {}
    sample = {
        "input": [],
        "output": [],
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cached_tokens": 0,
        },
        "error": NO_ERROR,
        "finish_reason": "",
        "model": run["model"],
        "seed": sampling.get("seed", 0),
        "temperature": float(sampling.get("temperature", 1.0)),
        "top_p": float(sampling.get("top_p", 1.0)),
        "max_completion_tokens": int(sampling.get("max_completion_tokens", 0)),
    }
    increments: dict[str, int] = {}
    text: str | None
    if spec.get("kind") == "completions":
        text = _sampled(spec, item, sample, sampler, increments)
    else:
        text = _given(row.get("sample") or {}, sample)
    results: list[dict[str, Any]] = []
    errored = text is None
    if not errored:
        # the criteria that load no model: graded together in one bounded child
        bounded = [c for c in graders if c.how == "bounded"]
        graded = _grade_bounded(bounded, item, text, sandbox)
        reports = dict(zip(map(id, bounded), graded, strict=True))
        for i, c in enumerate(graders):
            if c.how == "bounded":
                report, extra = reports[id(c)], {}
            else:
                report, extra = _grade(c, item, text, judge, increments)
            hard = {f: d for f, d in report.errors.items() if f in HARD_FLAGS}
            ok = not hard and passes(c.kind, report.reward, c.threshold)
            errored = errored or bool(hard)
            results.append({**_result(c.name, c.kind, report, ok), **extra})
            increments[f"c{i}:{'passed' if ok else 'failed'}"] = 1
    passed = not errored and all(r["passed"] for r in results)
    counter = "errored" if errored else "passed" if passed else "failed"
    out = {
        "object": "eval.run.output_item",
        "id": output_item_id(run["id"], index),
        "created_at": int(time.time()),
        "eval_id": run["eval_id"],
        "run_id": run["id"],
        "datasource_item_id": index,
        "datasource_item": item,
        "status": "pass" if passed else "fail",
        "results": results,
        "sample": sample,
    }
    return out, counter, increments


def _result(name: str, kind: str, report: GradeReport, ok: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "type": kind,
        "score": float(report.reward),
        "passed": ok,
        "sample": None,
    }
    if report.sub_rewards:
        out["sub_rewards"] = report.sub_rewards
    if report.errors:
        out["errors"] = report.errors
    return out


def _given(given: dict[str, Any], sample: dict[str, Any]) -> str:
    """A jsonl row's sample: its text (output_text, else the first choice's content, else
    output_json as JSON) into the output item's sample."""
    text = given.get("output_text")
    choices = given.get("choices") if isinstance(given.get("choices"), list) else []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    if not isinstance(text, str):
        content = (first.get("message") or {}).get("content")
        if isinstance(content, str):
            text = content
        elif "output_json" in given:
            text = json.dumps(given["output_json"], ensure_ascii=False)
        else:
            text = ""
    if isinstance(given.get("model"), str):
        sample["model"] = given["model"]
    if isinstance(first.get("finish_reason"), str):
        sample["finish_reason"] = first["finish_reason"]
    usage = given.get("usage")
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                sample["usage"][key] = usage[key]
    sample["output"] = [{"role": "assistant", "content": text}]
    return text


def _sampled(spec, item, sample, sampler, increments) -> str | None:
    """Sample the model for one row; the text, or None (``sample.error`` says why)."""
    try:
        messages = input_messages(spec["input_messages"], item)
    except GraderError as exc:
        sample["error"] = {"code": "invalid_variable_error", "message": str(exc)}
        return None
    sample["input"] = messages
    answer = sampler(messages)
    if "error" in answer:
        sample["error"] = answer["error"]
        return None
    text = answer.get("content") or ""
    counts = _usage(answer)
    sample["usage"] = counts
    sample["finish_reason"] = answer.get("finish_reason") or ""
    sample["output"] = [{"role": "assistant", "content": text}]
    increments.update(counts, invocation_count=1)
    return text


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    return ""


def input_messages(spec: dict[str, Any], item: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages of one row: the template rendered with the row (``{{item.x}}``),
    or the messages the row holds at ``item_reference`` (a string is one user message)."""
    if spec["type"] == "template":
        return [
            {"role": m["role"], "content": render(_text_of(m.get("content")), item, "")}
            for m in spec["template"]
        ]
    path = tuple(spec["item_reference"].split(".")[1:])
    value = resolve_path(item, path, "item")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": str(m["role"]), "content": _text_of(m.get("content"))} for m in value]
    raise GraderError(f"{spec['item_reference']} is not a list of messages or a string")


def http_sampler(runs: EvalRunStore, settings: WorkerSettings, spec: dict[str, Any]) -> Sampler:
    """The run's model, asked with the run's sampling parameters (``http_chat``)."""
    ask = http_chat(runs, settings)
    params = {k: v for k, v in (spec.get("sampling") or {}).items() if v is not None}
    return lambda messages: ask(spec["model"], messages, params)


def http_chat(runs: EvalRunStore, settings: WorkerSettings) -> Judge:
    """One chat completion per call from a live inference worker (``workers.inference``)
    for the model of a header; an unreachable or busy worker is retried with backoff
    (``RETRY_DELAYS``), then the answer is an error."""
    client = httpx.Client(timeout=settings.inference_timeout_seconds)

    def sample(
        header: dict[str, Any], messages: list[dict[str, str]], params: dict[str, Any]
    ) -> dict[str, Any]:
        headers = {MODEL_HEADER: json.dumps(header)}
        if settings.inference_token:
            headers["Authorization"] = f"Bearer {settings.inference_token}"
        body = {"model": header["name"], "messages": messages, **params}
        last = "no inference worker is serving requests; start one with `posttrain inference`"
        for delay in (*RETRY_DELAYS, None):
            workers = live_workers(runs.r, settings.key_prefix, settings.inference_queue)
            worker = pick(workers, header["path"])
            if worker is not None:
                try:
                    resp = client.post(
                        worker["url"] + "/v1/chat/completions", json=body, headers=headers
                    )
                except httpx.HTTPError as exc:
                    last = f"inference worker {worker.get('name')} unreachable: {exc}"
                else:
                    if resp.status_code == 200:
                        return _answer_of(resp)
                    last = _error_message(resp)
                    if resp.status_code not in RETRY_STATUSES:
                        return {"error": {"code": "inference_error", "message": last}}
            if delay is None:
                break
            time.sleep(delay)
        return {"error": {"code": "inference_unavailable", "message": last}}

    return sample


def _answer_of(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        choice = body["choices"][0]
        return {
            "content": choice["message"].get("content") or "",
            "finish_reason": choice.get("finish_reason") or "",
            "usage": body.get("usage") or {},
        }
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return {
            "error": {
                "code": "inference_error",
                "message": "the worker's answer was no chat completion",
            }
        }


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return f"the inference worker answered {resp.status_code}"
