"""Grading: one scoring function per grader type, and the ways to call it (torch-free).

``SCORERS`` maps each type in ``GRADER_TYPES`` to a function with
one signature, ``(grader, items, samples, notes) -> list[float]``: a batch of
dataset rows, the model's completions as text, and a list collecting the
sample-dependent errors that scored 0 (``GraderError.soft``: the completion was
not the JSON a template asked for, a regex timed out, a formula divided by
zero); inside a multi grader such an error zeroes that sub-grader and the
formula still runs. Data and spec errors (a row without a field a template
reads, an unparseable math reference, a model that will not load) raise.

Callers:

* ``grade`` / ``grade_batch``: plain floats (tests, evaluation code);
* ``grade_report``: OpenAI's run-response content (reward, sub-rewards, error
  flags); ``run_isolated`` runs it in a child process with a deadline, which is
  how the API calls it, so a pathological sample (a regex or a sympy expression
  that explodes) cannot hang an API thread;
* ``trainers.graders.reward``: a TRL ``GRPOTrainer`` reward function (training only).

Graders that run a local model (``score_model``, ``text_similarity`` with
``cosine``) score through ``trainers/graders/model.py``, which this module names by
path and imports only when such a grader is scored: in the training process, or in an
eval run's own process (``workers.evaltasks``). The API refuses to run them
(``needs_model``), so it never loads torch. Generative judges (``label_model``, a
``score_model`` of a chat model) are scored here only when one of the server's judge
endpoints serves their model (``judgeendpoints``: training jobs); an eval run asks them
through the inference workers and reads their answers with ``judging``.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from trainers.contract.graders import text
from trainers.contract.graders.expr import compile_formula
from trainers.contract.graders.judgeendpoints import is_remote_judge, score_judge
from trainers.contract.graders.python import configure as configure_python
from trainers.contract.graders.python import runs_code, score_python
from trainers.contract.graders.remote import configure, score_endpoint
from trainers.contract.graders.spec import GraderSpec, MultiGrader, parse_grader
from trainers.contract.graders.templates import GraderError, render
from trainers.contract.isolation import run_bounded
from trainers.contract.outbound import ToolPolicy
from trainers.contract.sandbox import SandboxPolicy

__all__ = [
    "SCORERS",
    "GradeReport",
    "grade",
    "grade_batch",
    "grade_report",
    "multi_scores",
    "run_isolated",
]
# The torch side of the model graders (training process only).
MODEL_SCORERS = "trainers.graders.model"

ScoreFn = Callable[[Any, list[Any], list[str], list[GraderError]], list[float]]
SCORERS: dict[str, ScoreFn] = {}


def register(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Add a batch scoring function under ``name``."""

    def add(fn: ScoreFn) -> ScoreFn:
        SCORERS[name] = fn
        return fn

    return add


def _per_sample(one: Callable[[Any, Any, str], float]) -> ScoreFn:
    """A batch function mapping ``one(grader, item, sample)`` over the rows."""

    def batch(g, items, samples, notes):
        out = []
        for item, sample in zip(items, samples, strict=True):
            value = _soft(notes, functools.partial(one, g, item, sample))
            out.append(0.0 if value is None else value)
        return out

    return batch


def register_each(name: str) -> Callable[[Callable[[Any, Any, str], float]], ScoreFn]:
    """Add a per-sample function ``(grader, item, sample) -> float`` under ``name``."""

    def add(one: Callable[[Any, Any, str], float]) -> ScoreFn:
        SCORERS[name] = _per_sample(one)
        return SCORERS[name]

    return add


def spec_of(grader: GraderSpec | dict[str, Any]) -> GraderSpec:
    return grader if isinstance(grader, BaseModel) else parse_grader(grader)  # type: ignore[return-value]


def _soft(notes: list[GraderError], score: Callable[[], Any]) -> Any:
    """``score()``, or None (and a note) when it fails because of the sample."""
    try:
        return score()
    except GraderError as exc:
        if not exc.soft:
            raise
        notes.append(exc)
        return None


def _fill(inputs: list[Any], score: Callable[[list[Any]], list[float]]) -> list[float]:
    """Score the rendered inputs in one batch; the ones that failed to render score 0."""
    ok = [x for x in inputs if x is not None]
    scores = iter(score(ok) if ok else [])
    return [0.0 if x is None else next(scores) for x in inputs]


def _model_scorer(name: str) -> Callable[..., list[float]]:
    return getattr(importlib.import_module(MODEL_SCORERS), name)


def _pair(g: Any, item: Any, sample: str) -> tuple[str, str]:
    return render(g.input, item, sample), render(g.reference, item, sample)


@register_each("string_check")
def _string_check(g, item, sample):
    return text.string_check(*_pair(g, item, sample), g.operation)


def _similarity(g, item, sample):
    return text.text_similarity(*_pair(g, item, sample), g.evaluation_metric)


_similarities = _per_sample(_similarity)


@register("text_similarity")
def _text_similarity(g, items, samples, notes):
    if g.evaluation_metric != "cosine":
        return _similarities(g, items, samples, notes)
    rows = zip(items, samples, strict=True)
    pairs = [_soft(notes, functools.partial(_pair, g, i, s)) for i, s in rows]
    return _fill(pairs, lambda ok: _model_scorer("cosine_similarities")(g.embedding_model, ok))


def _conversation(g: Any, item: Any, sample: str) -> list[dict[str, str]]:
    return [
        {"role": m.role, "content": "".join(render(t, item, sample) for t in m.texts())}
        for m in g.input
    ]


@register("score_model")
def _score_model(g, items, samples, notes):
    rows = zip(items, samples, strict=True)
    convs = [_soft(notes, functools.partial(_conversation, g, i, s)) for i, s in rows]
    if is_remote_judge(g):  # a model a judge endpoint of the server serves
        return _fill(convs, lambda ok: score_judge(g, ok, notes))
    return _fill(convs, lambda ok: _model_scorer("reward_scores")(g.model, ok, g.range))


@register("label_model")
def _label_model(g, items, samples, notes):
    """Only through a judge endpoint here (an eval run asks its inference workers)."""
    rows = zip(items, samples, strict=True)
    convs = [_soft(notes, functools.partial(_conversation, g, i, s)) for i, s in rows]
    return _fill(convs, lambda ok: score_judge(g, ok, notes))


@register_each("math_verify")
def _math_verify(g, item, sample):
    return text.math_verify(*_pair(g, item, sample))


@register_each("regex")
def _regex(g, item, sample):
    return text.regex_match(render(g.input, item, sample), g.pattern)


@register_each("length_penalty")
def _length_penalty(g, item, sample):
    return text.length_penalty(render(g.input, item, sample), g.max_length, g.target, g.unit)


register("endpoint")(score_endpoint)  # the user's HTTP service (``remote``)
register("python")(score_python)  # the user's grade(), sandboxed (``python``)


def multi_scores(
    g: MultiGrader, items: list[Any], samples: list[str], notes: list[GraderError]
) -> tuple[list[float], dict[str, list[float]]]:
    """The combined rewards and, per sub-grader key, its scores."""
    subs = {key: SCORERS[sub.type](sub, items, samples, notes) for key, sub in g.graders.items()}
    formula = compile_formula(g.calculate_output, set(subs))
    rewards = []
    for row in range(len(samples)):
        env = {key: scores[row] for key, scores in subs.items()}
        value = _soft(notes, functools.partial(formula.evaluate, env))
        rewards.append(0.0 if value is None else value)
    return rewards, subs


@register("multi")
def _multi(g, items, samples, notes):
    return multi_scores(g, items, samples, notes)[0]


def grade_batch(
    grader: GraderSpec | dict[str, Any], items: list[Any], samples: list[str]
) -> list[float]:
    """One score per (item, sample); sample-dependent errors score 0, others raise."""
    spec = spec_of(grader)
    if len(items) != len(samples):
        raise ValueError(f"{len(items)} items but {len(samples)} samples")
    return SCORERS[spec.type](spec, list(items), list(samples), [])


def grade(grader: GraderSpec | dict[str, Any], item: Any, sample_text: str) -> float:
    """The score of one sample: ``grade_batch`` of one."""
    return grade_batch(grader, [item], [sample_text])[0]


@dataclass
class GradeReport:
    """What OpenAI's ``/graders/run`` reports: reward, sub-rewards, error flags."""

    reward: float
    sub_rewards: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # OpenAI error flag -> detail
    execution_time: float = 0.0


def grade_report(grader: GraderSpec | dict[str, Any], item: Any, sample_text: str) -> GradeReport:
    """Grade one sample, reporting each ``GraderError`` under its OpenAI flag.

    Soft errors zero their (sub-)grader as in training; any other error makes
    the reward 0.
    """
    spec, notes, start = spec_of(grader), [], time.perf_counter()
    report = GradeReport(reward=0.0)
    try:
        if isinstance(spec, MultiGrader):
            rewards, subs = multi_scores(spec, [item], [sample_text], notes)
            report.sub_rewards = {key: scores[0] for key, scores in subs.items()}
        else:
            rewards = SCORERS[spec.type](spec, [item], [sample_text], notes)
        report.reward = rewards[0]
    except GraderError as exc:
        notes.append(exc)
    for exc in notes:
        report.errors.setdefault(exc.flag, str(exc))
    report.execution_time = time.perf_counter() - start
    return report


RUN_TIMEOUT_S = 20.0
RUN_MEMORY_BYTES = 512 << 20
# Imported once by the fork server, so each child starts with them loaded.
_PRELOAD = [
    "trainers.contract.graders.scoring",
    "rapidfuzz.fuzz",
    "sacrebleu",
    "regex",
    "math_verify",
]


def _grade_each(
    sandbox: dict | None, payloads: list[dict], item: Any, sample_text: str
) -> list[GradeReport]:
    if sandbox is not None:
        configure_python(SandboxPolicy.model_validate(sandbox))
    return [grade_report(p, item, sample_text) for p in payloads]


def run_isolated_many(
    graders: list[GraderSpec],
    item: Any,
    sample_text: str,
    timeout_s: float = RUN_TIMEOUT_S,
    sandbox: SandboxPolicy | None = None,
) -> list[GradeReport]:
    """``run_isolated`` for several graders of one sample in one child (one process start
    instead of one per grader: the start costs more than most grades). The child has
    ``timeout_s`` per grader (at least the sandbox's wall clock and 5 s for a python
    grader run under ``sandbox``) and the same memory cap; if it times out, runs out of
    memory or dies, every grader of the call gets that error."""
    if not graders:
        return []
    payloads = [g.model_dump(mode="json") for g in graders]
    total = timeout_s * len(graders)
    if sandbox is not None:
        slack = max(0.0, sandbox.wall_seconds + 5.0 - timeout_s)
        total += slack * sum(1 for g in graders if runs_code(g))
    out = run_bounded(
        _grade_each,
        (sandbox and sandbox.model_dump(), payloads, item, sample_text),
        timeout_s=total,
        memory_bytes=RUN_MEMORY_BYTES,
        preload=_PRELOAD,
    )
    if out.kind == "ok":
        return out.value
    return [_failed(out, total)] * len(graders)


def _failed(out: Any, timeout_s: float) -> GradeReport:
    if out.kind == "timeout":
        detail = f"the grader did not finish within {timeout_s:g}s"
        flag = "unresponsive_reward_error"
    elif out.kind == "memory":
        detail = f"the grader needed more than {RUN_MEMORY_BYTES >> 20} MiB"
        flag = "other_error"
    elif out.kind == "error":
        detail, flag = out.detail, "other_error"
    else:
        detail, flag = f"the grader process exited ({out.detail})", "other_error"
    return GradeReport(reward=0.0, errors={flag: detail}, execution_time=out.seconds)


def _grade_under(
    policy: dict | None, sandbox: dict | None, payload: dict, item: Any, sample_text: str
) -> GradeReport:
    if policy is not None:
        configure(ToolPolicy.model_validate(policy))
    if sandbox is not None:
        configure_python(SandboxPolicy.model_validate(sandbox))
    return grade_report(payload, item, sample_text)


def run_isolated(
    grader: GraderSpec,
    item: Any,
    sample_text: str,
    timeout_s: float = RUN_TIMEOUT_S,
    policy: ToolPolicy | None = None,
    sandbox: SandboxPolicy | None = None,
) -> GradeReport:
    """``grade_report`` in a child process killed after ``timeout_s`` and capped at
    ``RUN_MEMORY_BYTES`` (``trainers.contract.isolation``): a pathological sample (a regex
    or a sympy expression that explodes) costs the caller nothing.

    A child that does not answer in time is reported as OpenAI's
    ``unresponsive_reward_error`` with reward 0; one over its memory, or that failed or
    died, as ``other_error``. An endpoint grader calls under ``policy`` (the server's
    outbound policy; None: public addresses only); a python grader runs under ``sandbox``
    (None: off), its sandbox inside the child, whose deadline then also covers the
    sandbox's wall clock.
    """
    payload = grader.model_dump(mode="json")
    if sandbox is not None:
        timeout_s = max(timeout_s, sandbox.wall_seconds + 5.0)
    out = run_bounded(
        _grade_under,
        (
            policy and policy.model_dump(),
            sandbox and sandbox.model_dump(),
            payload,
            item,
            sample_text,
        ),
        timeout_s=timeout_s,
        memory_bytes=RUN_MEMORY_BYTES,
        preload=_PRELOAD,
    )
    if out.kind == "ok":
        return out.value
    return _failed(out, timeout_s)
