"""Generative judges: the prompt they are sent and how their answer is read.

Two graders ask a chat model: in eval runs through posttrain's inference workers (the
asking is ``workers.evalgrading``'), in training jobs through a judge endpoint the server
names (``judgeendpoints``); this module is pure and torch-free:

* ``label_model``: the answer is read as one of the grader's ``labels`` by
  ``parse_label``: the whole answer, trimmed, equal to a label ignoring case; else the
  one label that occurs in it as a whole phrase (not inside a longer word, and not
  inside a longer label that also occurs there). No label, or two different ones,
  is a ``JudgeParseError``. The score is 1 when the label is one of
  ``passing_labels``, else 0 (``label_score``).
* ``score_model`` with a chat model: the first number in the answer (``parse_score``:
  ``7``, ``-0.5``, ``8.25``, ``1e-3``), clamped to ``range`` (default [0, 1]); no number
  is a ``JudgeParseError``.

A ``JudgeParseError`` is OpenAI's ``model_grader_parse_error`` and soft: the criterion
fails (score 0) and the result says what the judge answered; the row is not an error.
The judge samples at temperature 0 unless the grader's ``sampling_params`` say
otherwise (``judge_params``).
"""

from __future__ import annotations

import re
from typing import Any

from trainers.contract.graders.spec import LabelModelGrader, ScoreModelGrader, label_key
from trainers.contract.graders.templates import GraderError, render

__all__ = [
    "DEFAULT_JUDGE_RANGE",
    "JudgeParseError",
    "judge_messages",
    "judge_params",
    "label_score",
    "parse_label",
    "parse_score",
]

DEFAULT_JUDGE_RANGE = (0.0, 1.0)
SHOWN_ANSWER = 200  # characters of the judge's answer an error quotes
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class JudgeParseError(GraderError):
    """The judge's answer could not be read as a label or a number."""

    flag = "model_grader_parse_error"
    soft = True


def _shown(answer: str) -> str:
    text = answer.strip()
    cut = text[:SHOWN_ANSWER] + ("..." if len(text) > SHOWN_ANSWER else "")
    return repr(cut)


def judge_messages(
    grader: LabelModelGrader | ScoreModelGrader, item: Any, sample_text: str
) -> list[dict[str, str]]:
    """The chat messages the judge is sent: ``input`` with its templates filled in (a
    message of several text parts is their texts joined)."""
    return [
        {"role": m.role, "content": "".join(render(t, item, sample_text) for t in m.texts())}
        for m in grader.input
    ]


def judge_params(grader: LabelModelGrader | ScoreModelGrader) -> dict[str, Any]:
    """The chat completion parameters of the judge's request (beyond model and messages)."""
    sp = grader.sampling_params
    params: dict[str, Any] = {"temperature": 0.0}
    if sp is None:
        return params
    if sp.temperature is not None:
        params["temperature"] = sp.temperature
    if sp.top_p is not None:
        params["top_p"] = sp.top_p
    if sp.seed is not None:
        params["seed"] = sp.seed
    if sp.max_completions_tokens is not None:
        params["max_completion_tokens"] = sp.max_completions_tokens
    return params


def _occurrences(answer: str, label: str) -> list[tuple[int, int]]:
    pattern = r"(?<!\w)" + re.escape(label.strip()) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, answer, re.IGNORECASE)]


def parse_label(answer: str, labels: list[str]) -> str:
    """The label the judge chose (as the grader spells it); ``JudgeParseError`` when the
    answer names none of them or more than one (module docstring)."""
    key = label_key(answer)
    for label in labels:
        if label_key(label) == key:
            return label
    spans = [(s, e, label) for label in labels for s, e in _occurrences(answer, label)]
    # an occurrence inside a longer label's occurrence ("good" in "very good") is that one
    outer = [
        (s, e, label)
        for s, e, label in spans
        if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)
    ]
    found = list(dict.fromkeys(label for _, _, label in outer))
    if len(found) == 1:
        return found[0]
    choices = ", ".join(map(repr, labels))
    if not found:
        raise JudgeParseError(
            f"the judge's answer names none of the labels ({choices}): {_shown(answer)}"
        )
    raise JudgeParseError(
        f"the judge's answer names more than one label ({', '.join(map(repr, found))}): "
        f"{_shown(answer)}"
    )


def label_score(grader: LabelModelGrader, label: str) -> float:
    """1.0 when ``label`` is one of the grader's passing labels, else 0.0."""
    return 1.0 if label_key(label) in {label_key(p) for p in grader.passing_labels} else 0.0


def parse_score(answer: str, bounds: list[float] | tuple[float, float] | None) -> float:
    """The first number in the answer, clamped to ``bounds`` (default [0, 1])."""
    lo, hi = bounds if bounds else DEFAULT_JUDGE_RANGE
    match = _NUMBER.search(answer)
    if match is None:
        raise JudgeParseError(f"the judge's answer holds no number: {_shown(answer)}")
    return min(max(float(match.group()), lo), hi)  # 1e999 is inf: clamped to hi
