"""Judge specifications: one pydantic model per judge type, a union on ``type``.

A judge gives P(A ≻ B), the probability that completion A is preferred to
completion B for a prompt. Four types:

* ``preference_model``: a local pairwise sequence classifier read on
  ``template`` filled with (prompt, A, B);
* ``reward_model``: a local one-label reward model scoring (prompt, response),
  turned into Bradley–Terry probabilities ``sigmoid((r_A - r_B) / temperature)``;
* ``grader``: any grader of ``trainers.graders``, pointwise (Bradley–Terry over
  its scores) or pairwise (its score, read with the other completion in
  ``{{item.other_output_text}}``, is the probability itself);
* ``pattern_table``: rules: regex classes and a preference matrix between them.

Every type has ``flip_order`` (default true): each pair is shown in a random
order, A/B or B/A, and a B/A answer p is read as 1 - p, which removes a
position bias in expectation. Torch-free: the API validates judges with these;
``trainers.contract.judges.validate`` adds the checks that read the file system.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from trainers.contract.graders.remote import calls_out
from trainers.contract.graders.spec import Grader, RegexPattern, describe_errors, template_fields
from trainers.contract.graders.spec import _param as grader_param
from trainers.contract.sizes import MAX_DEFINITION_BYTES, at_most

__all__ = [
    "DEFAULT_PAIR_TEMPLATE",
    "JUDGE_TYPES",
    "OTHER_OUTPUT_FIELD",
    "PAIR_TEMPLATE_FIELDS",
    "GraderJudge",
    "InvalidJudge",
    "JudgeSpec",
    "PatternClass",
    "PatternTableJudge",
    "PreferenceModelJudge",
    "RewardModelJudge",
    "judge_item_fields",
    "parse_judge",
    "render_pair",
]

JUDGE_TYPES = ("preference_model", "reward_model", "grader", "pattern_table")

# The item field a pairwise grader reads the other completion from.
OTHER_OUTPUT_FIELD = "other_output_text"
# The variables of a preference model's template.
PAIR_TEMPLATE_FIELDS = ("prompt", "response_a", "response_b")
DEFAULT_PAIR_TEMPLATE = (
    "Prompt:\n{{prompt}}\n\nResponse A:\n{{response_a}}\n\nResponse B:\n{{response_b}}\n\n"
    "Is response A better than response B?"
)
_PAIR_VAR = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)
# P[i][j] + P[j][i] must be 1 within this.
MATRIX_TOLERANCE = 1e-6
MAX_CLASSES = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Base(_Strict):
    flip_order: bool = Field(
        True,
        description="Show each pair in a random order (seeded): a B/A answer p counts as 1 - p. "
        "Removes a position bias in expectation.",
    )


class _ModelBase(_Base):
    model: str = Field(
        min_length=1,
        description="Local directory of a transformers AutoModelForSequenceClassification "
        "checkpoint with its tokenizer. Loaded once, lazily, in the training process.",
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Inputs per judge forward pass.")
    max_length: int = Field(
        2048,
        ge=16,
        description="Token limit per input (also capped by the tokenizer's model_max_length); "
        "longer inputs lose their beginning, so the responses are kept.",
    )


def render_pair(template: str, prompt: str, a: str, b: str) -> str:
    """``template`` with {{prompt}}, {{response_a}} and {{response_b}} filled, in one pass."""
    values = {"prompt": prompt, "response_a": a, "response_b": b}
    return _PAIR_VAR.sub(lambda m: values[m.group(1)], template)


class PreferenceModelJudge(_ModelBase):
    """A pairwise classifier over (prompt, A, B) rendered by ``template``.

    Two labels: P(A ≻ B) = softmax(logits)[a_wins_label]. One label:
    P(A ≻ B) = sigmoid(logit).
    """

    type: Literal["preference_model"]
    template: str = Field(
        DEFAULT_PAIR_TEMPLATE,
        description="The classifier's input text: {{prompt}}, {{response_a}} and {{response_b}} "
        "are replaced (one pass; substituted text is not re-read); both responses must appear. "
        "Tokenized with the tokenizer's special tokens.",
    )
    a_wins_label: int = Field(
        0,
        ge=0,
        le=1,
        description="With a two-label model, the label index meaning 'A is better'. A one-label "
        "model must leave it 0: its logit is read as log-odds of A being better.",
    )

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        names = [m.group(1) for m in _PAIR_VAR.finditer(value)]
        unknown = sorted({n for n in names if n not in PAIR_TEMPLATE_FIELDS})
        if unknown:
            raise ValueError(
                f"template variable(s) {', '.join('{{' + n + '}}' for n in unknown)} unknown; "
                f"use {', '.join('{{' + n + '}}' for n in PAIR_TEMPLATE_FIELDS)}"
            )
        for needed in ("response_a", "response_b"):
            if needed not in names:
                raise ValueError(f"template must contain {{{{{needed}}}}}")
        return value


class RewardModelJudge(_ModelBase):
    """A one-label reward model scoring each (prompt, response); Bradley–Terry between them."""

    type: Literal["reward_model"]
    temperature: float = Field(
        1.0,
        gt=0,
        description="P(A ≻ B) = sigmoid((r_A - r_B) / temperature).",
    )


class GraderJudge(_Base):
    """A grader as a judge: pointwise scores through Bradley–Terry, or a pairwise score."""

    type: Literal["grader"]
    grader: Grader = Field(description="Any grader spec (see Graders).")
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise",
        validate_default=True,
        description="pointwise: P(A ≻ B) = sigmoid((s_A - s_B) / scale) from the grader's scores "
        "of A and of B. pairwise: the grader scores A with B in {{item.other_output_text}}, and "
        "that score, clipped to [0, 1], is P(A ≻ B).",
    )
    scale: float = Field(
        1.0, gt=0, description="pointwise only: the score difference that makes odds e:1."
    )

    @field_validator("grader")
    @classmethod
    def _local(cls, value: Any) -> Any:
        if calls_out(value):
            raise ValueError(
                "an endpoint grader grades only grpo and reinforcement jobs (its header "
                "secrets are kept for those); use it there, or a grader posttrain runs itself"
            )
        return value  # a python grader: the API checks the server runs its sandbox

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str, info: ValidationInfo) -> str:
        grader = info.data.get("grader")
        if grader is None:  # the grader's own error is reported
            return value
        reads_other = OTHER_OUTPUT_FIELD in {f.split(".")[0] for f in template_fields(grader)}
        if value == "pairwise" and not reads_other:
            raise ValueError(
                f"a pairwise grader judge must read the other completion: use "
                f"{{{{item.{OTHER_OUTPUT_FIELD}}}}} in the grader's templates"
            )
        if value == "pointwise" and reads_other:
            raise ValueError(
                f"the grader reads {{{{item.{OTHER_OUTPUT_FIELD}}}}}, which only a pairwise "
                "judge fills; set mode 'pairwise'"
            )
        return value


class PatternClass(_Strict):
    """One class of completions: those ``pattern`` matches (first class to match wins)."""

    name: str = Field(min_length=1, max_length=64, description="The class's name (metrics).")
    pattern: RegexPattern = Field(
        min_length=1,
        description="Python regular expression searched in the completion with leading and "
        "trailing whitespace stripped: '^' anchors at its first character; flags inline ('(?i)').",
    )


class PatternTableJudge(_Base):
    """Rule preferences: classify each completion, then P(A ≻ B) = P[class(A)][class(B)].

    Classes are tried in order and the first whose pattern matches wins; a
    completion no pattern matches is in class ``other``, the matrix's last row
    and column. Any P with P[i][j] + P[j][i] = 1 is allowed, cyclic ones
    (rock-paper-scissors) included.
    """

    type: Literal["pattern_table"]
    classes: list[PatternClass] = Field(min_length=1, max_length=MAX_CLASSES)
    other: str = Field(
        "other", min_length=1, max_length=64, description="Name of the no-match class."
    )
    preferences: list[list[float]] = Field(
        description="(len(classes) + 1) square matrix, classes in order then 'other': "
        "P[i][j] = P(a completion of class i ≻ one of class j), in [0, 1], with "
        "P[i][j] + P[j][i] = 1 (so the diagonal is 0.5)."
    )

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes] + [self.other]

    @field_validator("preferences")
    @classmethod
    def _matrix(cls, rows: list[list[float]], info: ValidationInfo) -> list[list[float]]:
        if "classes" not in info.data or "other" not in info.data:
            return rows  # their own errors are reported
        names = [c.name for c in info.data["classes"]] + [info.data["other"]]
        if len(set(names)) != len(names):
            raise ValueError(f"class names (with other={names[-1]!r}) must be unique: {names}")
        n = len(names)
        if len(rows) != n or any(len(r) != n for r in rows):
            shape = f"{len(rows)} rows of lengths {[len(r) for r in rows]}"
            raise ValueError(
                f"preferences must be {n}x{n} ({n - 1} classes + {names[-1]!r}), got {shape}"
            )
        for i in range(n):
            for j in range(n):
                p = rows[i][j]
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"preferences[{i}][{j}] = {p} is not in [0, 1]")
                if abs(p + rows[j][i] - 1.0) > MATRIX_TOLERANCE:
                    raise ValueError(
                        f"preferences[{i}][{j}] + preferences[{j}][{i}] must be 1 "
                        f"(P({names[i]} ≻ {names[j]}) + P({names[j]} ≻ {names[i]})), got "
                        f"{p} + {rows[j][i]}"
                    )
        return rows


def _type_check(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") not in JUDGE_TYPES:
        kind = value.get("type")
        raise ValueError(f"unknown judge type {kind!r}; expected one of: {', '.join(JUDGE_TYPES)}")
    return value


_MEMBERS = Union[  # noqa: UP007  (tagged members need the Union spelling)
    PreferenceModelJudge, RewardModelJudge, GraderJudge, PatternTableJudge
]
# The annotated type to use as a field: ``judge: Judge``.
Judge = Annotated[
    _MEMBERS,
    Field(discriminator="type"),
    BeforeValidator(_type_check),
    BeforeValidator(at_most(MAX_DEFINITION_BYTES, "a judge definition")),
]
JudgeSpec = _MEMBERS  # the type of a parsed judge
_ADAPTER: TypeAdapter = TypeAdapter(Judge)


class InvalidJudge(ValueError):
    """A judge that does not validate; ``param`` is the offending field's path."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _param(loc: tuple, prefix: str) -> str:
    """``judge.grader.input`` from pydantic's loc, without its union tags."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in JUDGE_TYPES:
        parts = parts[1:]
    if len(parts) > 1 and parts[0] == "grader":  # the graders' own naming below it
        return grader_param(tuple(parts[1:]), prefix + ".grader")
    parts = [p for p in parts if not p.startswith("function-")]
    return prefix + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)


def parse_judge(raw: Any, param: str = "judge") -> JudgeSpec:
    """Validate a judge object; raises ``InvalidJudge`` naming the field at fault."""
    if isinstance(raw, BaseModel):
        return raw  # type: ignore[return-value]
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise InvalidJudge(*describe_errors(exc, lambda loc: _param(loc, param), param)) from None


def judge_item_fields(spec: JudgeSpec) -> set[str]:
    """Dataset-row fields (dotted) a grader judge reads; the other completion is not one."""
    if not isinstance(spec, GraderJudge):
        return set()
    return {f for f in template_fields(spec.grader) if f.split(".")[0] != OTHER_OUTPUT_FIELD}
