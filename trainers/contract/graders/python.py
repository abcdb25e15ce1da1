"""OpenAI's ``python`` grader: the user's ``grade(sample, item)`` scores each sample, run
in a bubblewrap sandbox (``trainers.contract.sandbox``) where the server enables it.

The source must define ``grade(sample, item) -> float`` at its top level; ``sample`` is
the view the ``endpoint`` grader sends (``output_text``, ``output_json``, ``messages``,
``tool_calls``) and ``item`` the dataset row. It runs under the sandbox's interpreter
with ``-I -S``: the standard library only, no network, no files but its own ``/tmp``.

How a batch goes: the rows are sent, as JSON on stdin, to one sandboxed process per
``BATCH_ROWS`` rows; ``_RUNNER`` defines the source once and answers one JSON line per
row (``{"score": x}`` or ``{"error": "..."}``), each ``grade`` call in its own
``try``. A row whose ``grade`` raises, or returns anything but a finite number, is an
error for that row. A process killed by a limit (CPU, memory, wall clock, output) fails
the row it was grading; the rows after it go to a fresh process. A source that does not
run at all (an import the sandbox lacks, ``grade`` not callable) fails the grader.

A row's error follows ``on_error`` as the endpoint grader's does: ``"error"`` (the
default) stops grading with ``PythonError`` (the training job fails), ``"zero"``
scores the row 0 and counts it (``graders/<name>/sample_errors``). A server without the
sandbox (``POSTTRAIN_PYTHON_GRADER=off``, or bwrap not working) fails the grader with
an error saying so; the API refuses such graders at creation on a server that has it
off (``python_params``).

Where it grades: grpo and reinforcement jobs (alone or in a multi grader) and the
API's ``/graders`` routes. An eval's criteria and a judge's grader refuse it
(``runs_code``): their processes are not given the sandbox settings.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainers.contract.graders.remote import sample_view
from trainers.contract.graders.templates import GraderError
from trainers.contract.sandbox import SandboxPolicy, SandboxUnavailable, probe, run

__all__ = [
    "MAX_SOURCE_BYTES",
    "PythonError",
    "PythonGrader",
    "configure",
    "python_params",
    "runs_code",
    "score_python",
]

MAX_SOURCE_BYTES = 32 * 1024  # under the whole definition's cap (sizes.MAX_DEFINITION_BYTES)
BATCH_ROWS = 64


def check_source(source: str) -> str:
    """The source parses and defines ``grade`` at its top level; ``ValueError`` if not."""
    size = len(source.encode())
    if size > MAX_SOURCE_BYTES:
        raise ValueError(f"source is {size} bytes; at most {MAX_SOURCE_BYTES} are accepted")
    try:
        tree = ast.parse(source, "<grader>")
    except SyntaxError as exc:
        raise ValueError(f"source does not parse: {exc.msg} (line {exc.lineno})") from None
    except (RecursionError, MemoryError, ValueError):
        raise ValueError("source does not parse: it is nested too deeply") from None
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"]
    if not defs:
        raise ValueError("source must define 'def grade(sample, item)' at its top level")
    args = defs[-1].args
    positional = len(args.posonlyargs) + len(args.args)
    if positional < 2 and args.vararg is None:
        raise ValueError("grade must take two arguments: grade(sample, item)")
    return source


class PythonGrader(BaseModel):
    """The float the user's ``grade(sample, item)`` returns (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The grader's name (shown in logs and metrics).")
    type: Literal["python"]
    source: str = Field(
        description="Python defining grade(sample, item) -> float; standard library only, "
        f"at most {MAX_SOURCE_BYTES} bytes."
    )
    image_tag: str | None = Field(
        None, description="OpenAI's sandbox image; accepted and ignored (one sandbox here)."
    )
    on_error: Literal["error", "zero"] = Field(
        "error",
        description="Extension. A sample grade could not score (it raised, returned no "
        "finite number, or hit a limit): 'error' fails the job; 'zero' scores it 0 and "
        "counts it in graders/<name>/sample_errors.",
    )

    _source = field_validator("source")(classmethod(lambda cls, v: check_source(v)))

    def templates(self) -> list[str]:
        return []  # the whole item and sample are passed; nothing is rendered


class PythonError(GraderError):
    """A python grader could not score a sample (``soft`` under ``on_error: "zero"``),
    or could not run at all (``server``: no sandbox, a source that fails to load)."""

    def __init__(self, message: str, soft: bool = False, server: bool = False):
        super().__init__(message)
        self.soft = soft
        self.flag = "python_grader_server_error" if server else "python_grader_runtime_error"


@dataclass
class _Runtime:
    policy: SandboxPolicy = field(default_factory=SandboxPolicy)


_RUNTIME = _Runtime()


def configure(policy: SandboxPolicy | None) -> None:
    """Run this process's python graders under ``policy`` (the server's settings; until
    one is given, they are off). None keeps the one in use."""
    if policy is not None:
        _RUNTIME.policy = policy


# Runs inside the sandbox, behind its limits (sandbox.limited); stdlib only.
_RUNNER = r"""
import json, math, os, sys
out = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)  # the grader's own prints go to stderr
job = json.loads(sys.stdin.buffer.read())
def why(exc):
    return (type(exc).__name__ + ": " + str(exc))[:500]
def say(obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()
scope = {"__name__": "grader"}
try:
    exec(compile(job["source"], "<grader>", "exec"), scope)
    grade = scope["grade"]
    if not callable(grade):
        raise TypeError("grade is not a function")
except BaseException as exc:
    say({"fatal": why(exc)})
    sys.exit(0)
me = os.getpid()
for row in job["rows"]:
    try:
        try:
            value = grade(row["sample"], row["item"])
        finally:
            if os.getpid() != me:  # a process the grader forked never answers
                os._exit(0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("grade returned %s, not a number" % type(value).__name__)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("grade returned %r; a score must be finite" % value)
        say({"score": value})
    except BaseException as exc:
        say({"error": why(exc)})
"""


def _read(line: str) -> float | str:
    """A runner's answer for one row: the score, or the error text."""
    try:
        answer = json.loads(line)
    except ValueError:
        return "the grader's answer was not JSON"
    score = answer.get("score") if isinstance(answer, dict) else None
    if isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score):
        return float(score)
    error = answer.get("error") if isinstance(answer, dict) else None
    return str(error) if error else "the grader's answer held no finite score"


def _batch(g: PythonGrader, policy: SandboxPolicy, rows: list[dict]) -> list[float | str]:
    """One sandboxed process over ``rows``; the answered rows, then (if it was killed or
    died) the error of the row it was grading. Shorter than ``rows`` when it stopped."""
    data = json.dumps({"source": g.source, "rows": rows}, ensure_ascii=False).encode()
    try:
        res = run(policy, _RUNNER, data)
    except (SandboxUnavailable, OSError) as exc:
        raise PythonError(f"python grader '{g.name}' cannot run: {exc}", server=True) from None
    if res.lines[:1] and res.lines[0].startswith('{"fatal"'):
        fatal = json.loads(res.lines[0])["fatal"]
        raise PythonError(f"python grader '{g.name}': the source failed to load ({fatal})")
    answers: list[float | str] = [_read(line) for line in res.lines[: len(rows)]]
    if len(answers) < len(rows):
        tail = res.stderr.strip().splitlines()[-1:] or [""]
        if res.killed:
            answers.append(f"the grader {res.killed}")
        else:
            answers.append(f"the sandbox exited with status {res.returncode} {tail[0][:300]}")
    return answers


def _rows(items: list[Any], samples: list[str]) -> list[dict]:
    return [{"item": i, "sample": sample_view(s)} for i, s in zip(items, samples, strict=True)]


def score_python(
    g: PythonGrader, items: list[Any], samples: list[str], notes: list[GraderError]
) -> list[float]:
    """The scoring function of ``python`` graders (``scoring.SCORERS``)."""
    if not samples:
        return []
    policy = _RUNTIME.policy
    reason = probe(policy)
    if reason:
        raise PythonError(f"python grader '{g.name}' cannot run: {reason}", server=True)
    rows, results, start = _rows(items, samples), [], 0
    while start < len(rows):
        answers = _batch(g, policy, rows[start : start + BATCH_ROWS])
        failed = next((a for a in answers if isinstance(a, str)), None)
        if failed is not None and g.on_error == "error":
            raise PythonError(
                f"python grader '{g.name}' could not score sample {start + answers.index(failed)}"
                f" ({failed}); set on_error 'zero' to score such samples 0 instead"
            )
        results += answers
        start += len(answers)
    failed_all = [r for r in results if isinstance(r, str)]
    notes.extend(PythonError(f"python grader '{g.name}': {r}", soft=True) for r in failed_all)
    return [0.0 if isinstance(r, str) else r for r in results]


def _walk(grader: Any, param: str):
    yield grader, param
    subs = getattr(grader, "graders", None)
    if isinstance(subs, dict):
        for key, sub in subs.items():
            yield sub, f"{param}.graders.{key}"


def python_params(graders: list[Any], params: list[str]) -> list[str]:
    """The request paths of the python graders among ``graders`` (and their subs)."""
    return [
        p
        for g, base in zip(graders, params, strict=True)
        for sub, p in _walk(g, base)
        if isinstance(sub, PythonGrader)
    ]


def runs_code(grader: Any) -> bool:
    """True if the grader (or a sub-grader) is a python grader."""
    return bool(python_params([grader], ["grader"]))


def refusal(policy: SandboxPolicy) -> str:
    """Why this server refuses python graders at creation ("" if it accepts them)."""
    if policy.mode == "off":
        return (
            "the python grader needs the bubblewrap sandbox on the workers, and this server "
            "has it off (POSTTRAIN_PYTHON_GRADER=off); use another grader type or an "
            "endpoint grader calling your own scoring service"
        )
    return ""
