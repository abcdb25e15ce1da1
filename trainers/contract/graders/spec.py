"""Grader specifications: one pydantic model per grader type, a union on ``type``.

Shapes follow OpenAI's graders (``string_check``, ``text_similarity``,
``score_model``, ``multi``, ``label_model``;
https://platform.openai.com/docs/guides/graders) plus posttrain's own
``math_verify``, ``regex``, ``length_penalty`` and ``endpoint`` (the user's HTTP service
scores each sample: ``remote``). Every type is ``GRADER_TYPES`` (``parse_grader``; an
eval's testing criterion is parsed the same way, ``parse_criterion``). OpenAI's
``python`` grader parses everywhere, and runs in a bubblewrap sandbox where the server
enables it (``python``; the API refuses it at creation elsewhere). Which models a grader
may name depends on where it grades, which the API checks with the server's settings
(``validate.check_grader_models``). Torch-free: the API validates graders with these.

A ``score_model`` is one of three things:

* in a training job (and ``/graders/validate``), a *remote judge* when one of the
  server's judge endpoints (``POSTTRAIN_JUDGE_ENDPOINTS``, ``judgeendpoints``) serves its
  ``model``: the training process sends its rendered ``input`` to that endpoint's chat
  completions and reads the answer as an eval's judge's (below).

Otherwise it is told apart by its ``model`` once the API has resolved it for the caller
(``validate.is_reward_model``):

* a local sequence-classification reward model with one label (its config's
  ``architectures`` name a ``...ForSequenceClassification``): its logit is the score,
  or ``lo + (hi - lo) * sigmoid(logit)`` with a ``range``. Training graders and eval
  runs score it the same way, in the training process or the eval run's own process;
  its ``sampling_params`` are accepted and ignored (a classifier does not sample);
* any other model the caller may use (a base model, an ``ft:`` model, a checkpoint):
  a generative judge, in eval runs only. Its ``input`` is rendered and sent as a chat
  completion through posttrain's inference workers; the first number in the answer,
  clamped to ``range`` (default [0, 1]), is the score (``judging.parse_score``). A
  training job refuses such a model (it is no sequence classifier) unless a judge
  endpoint serves it.

A ``label_model`` is a generative judge too, asked through the inference workers as an
eval's criterion of its own, and through a judge endpoint in a training job (and
``/graders/validate``), which refuse one no endpoint serves: its rendered ``input``
is sent as a chat completion and the answer is read as one of ``labels``
(``judging.parse_label``); the score is 1 when that label is one of
``passing_labels``, else 0. Neither judge adds words to the prompt: it is sent as
written, so it should name the labels, or ask for a number, itself. Judges sample at
temperature 0 unless ``sampling_params`` (an extension on ``label_model``) says
otherwise.

Departures from OpenAI, each refused or documented on its field:

* an eval's ``multi`` grader refuses a ``label_model`` and a generative ``score_model``
  (its sub-graders' models must be local reward models); a training job's ``multi``
  grader takes remote judges, scored like any sub-grader in the training process.
  ``/graders/run`` runs no model grader (the API process asks no model).
* ``text_similarity``: ``meteor`` is refused (NLTK's METEOR needs WordNet, which
  cannot be installed from PyPI); ``cosine`` needs the extension field
  ``embedding_model``, a local encoder.
* ``endpoint`` (``remote``) grades in training jobs, ``multi`` graders and the API's
  grader routes; an eval's criteria and a ``grader`` judge refuse it (their records
  keep no secrets, and its header values are).
* ``python`` grades in training jobs, ``multi`` graders and the API's grader routes,
  on a server with ``POSTTRAIN_PYTHON_GRADER=bwrap``; an eval's criteria and a
  ``grader`` judge refuse it. ``image_tag`` is accepted and ignored; ``on_error`` is an
  extension, as the endpoint grader's.
* ``multi.graders`` is OpenAI's ``{key: grader}`` map (the keys are the names
  ``calculate_output`` reads); a single grader object, as OpenAI's SDK types
  spell it, is accepted as ``{grader.name: grader}``. Sub-graders cannot be
  multi graders themselves, as in OpenAI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from trainers.contract.graders.expr import FUNCTIONS, compile_formula
from trainers.contract.graders.patterns import check_shape
from trainers.contract.graders.python import PythonGrader
from trainers.contract.graders.remote import EndpointGrader
from trainers.contract.graders.templates import TemplateError, parse_template, resolve_path
from trainers.contract.sizes import MAX_DEFINITION_BYTES, at_most

__all__ = [
    "GRADER_TYPES",
    "Grader",
    "GraderSpec",
    "InvalidGrader",
    "dump_grader",
    "missing_item_fields",
    "needs_model",
    "parse_criterion",
    "parse_grader",
    "template_fields",
]

# OpenAI grader types posttrain runs, plus its own. The scoring registry
# (``trainers.contract.graders.scoring.SCORERS``) has one entry each.
GRADER_TYPES: tuple[str, ...] = (
    "string_check",
    "text_similarity",
    "score_model",
    "multi",
    "label_model",
    "math_verify",
    "regex",
    "length_penalty",
    "endpoint",
    "python",
)

# OpenAI's text_similarity metrics, in its order.
SIMILARITY_METRICS = (
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor",
    "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)  # fmt: skip


def _template(text: str) -> str:
    parse_template(text)
    return text


Template = Annotated[str, AfterValidator(_template)]


# A Python regular expression (the ``regex`` module) within the static limits of
# ``patterns.check_shape``; the API compiles it in a bounded child before accepting it
# (``patterns.check_compiles``), never in its own process.
RegexPattern = Annotated[str, AfterValidator(check_shape)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Base(_Strict):
    name: str = Field(min_length=1, description="The grader's name (shown in logs and metrics).")

    def templates(self) -> list[str]:
        """The templated text fields this grader renders."""
        return [self.input]  # type: ignore[attr-defined]


class StringCheckGrader(_Base):
    """1 if ``input`` and ``reference`` pass ``operation``, else 0."""

    type: Literal["string_check"]
    input: Template = Field(description="Text to check; usually '{{sample.output_text}}'.")
    reference: Template = Field(description="Text to check against; usually '{{item.<field>}}'.")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        description="eq/ne: case-sensitive (in)equality; like: reference occurs in input; "
        "ilike: the same, ignoring case."
    )

    def templates(self) -> list[str]:
        return [self.input, self.reference]


class TextSimilarityGrader(_Base):
    """A similarity in [0, 1] between ``input`` and ``reference``."""

    type: Literal["text_similarity"]
    input: Template = Field(description="The text being graded.")
    reference: Template = Field(description="The text being graded against.")
    evaluation_metric: Literal[SIMILARITY_METRICS] = Field(  # type: ignore[valid-type]
        description="How similarity is measured (trainers/contract/graders/text.py documents each)."
    )
    pass_threshold: float | None = Field(
        None, description="OpenAI's pass mark, echoed; the reward is the similarity itself."
    )
    embedding_model: str | None = Field(
        None,
        min_length=1,
        validate_default=True,
        description="Extension, cosine only: a local encoder (path) whose mean-pooled hidden "
        "states are compared. Computed in the training process.",
    )

    def templates(self) -> list[str]:
        return [self.input, self.reference]

    @field_validator("evaluation_metric")
    @classmethod
    def _no_meteor(cls, value: str) -> str:
        if value == "meteor":
            raise ValueError(
                "'meteor' is not supported: NLTK's METEOR needs the WordNet corpus, which "
                "posttrain hosts cannot download; use rouge_l, bleu or gleu"
            )
        return value

    @field_validator("embedding_model")
    @classmethod
    def _cosine_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("evaluation_metric")
        if metric == "cosine" and value is None:
            raise ValueError(
                "evaluation_metric 'cosine' needs 'embedding_model': the path of a local "
                "embedding model (posttrain calls no hosted embedding API)"
            )
        if metric not in (None, "cosine") and value is not None:
            raise ValueError("'embedding_model' is only used by evaluation_metric 'cosine'")
        return value


def _text_part(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("input_image", "input_audio"):
        raise ValueError(f"score_model reads text only; a '{kind}' part cannot be scored")
    return value


class TextPart(_Strict):
    """A text content part of a score_model message."""

    type: Literal["input_text", "output_text"]
    text: Template


def _content_kind(value: Any) -> str:
    if isinstance(value, str):
        return "str-content"
    return "list-content" if isinstance(value, list) else "part-content"


Part = Annotated[TextPart, BeforeValidator(_text_part)]
Content = Annotated[
    Union[  # noqa: UP007  (tagged members need the Union spelling)
        Annotated[Template, Tag("str-content")],
        Annotated[Part, Tag("part-content")],
        Annotated[list[Part], Tag("list-content")],
    ],
    Discriminator(_content_kind),
]


class ScoreModelMessage(_Strict):
    """One chat message given to the reward model; its text may hold templates."""

    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    type: Literal["message"] | None = None

    def texts(self) -> list[str]:
        parts = self.content if isinstance(self.content, list) else [self.content]
        return [p if isinstance(p, str) else p.text for p in parts]


class SamplingParams(_Strict):
    """OpenAI's sampling parameters of a model grader. A generative judge samples with
    them (temperature 0 when unset; ``reasoning_effort`` is accepted and ignored); a
    reward model ignores them all (it does not sample)."""

    max_completions_tokens: int | None = Field(
        None, ge=1, description="The judge's answer is at most this many tokens."
    )
    reasoning_effort: str | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)


class ScoreModelGrader(_Base):
    """The scalar output of a local reward model, or the number a generative judge answers
    (a remote judge in training jobs, any chat model in evals; module docstring)."""

    type: Literal["score_model"]
    model: str = Field(
        min_length=1,
        description="A local reward model (AutoModelForSequenceClassification, one label: "
        "loaded in the training process or an eval run's process); a model a judge endpoint "
        "of the server serves (POSTTRAIN_JUDGE_ENDPOINTS: asked from the training process); "
        "or in an eval's criteria any chat model the caller may use, asked through "
        "posttrain's inference.",
    )
    input: list[ScoreModelMessage] = Field(
        min_length=1,
        description="A reward model: the conversation to score, rendered with its chat "
        "template; usually ends with an assistant turn holding '{{sample.output_text}}'. A "
        "judge: the chat messages it is sent, which should ask for a number.",
    )
    range: list[float] | None = Field(
        None,
        description="[lo, hi]. A reward model: map its raw score s to lo + (hi - lo) * "
        "sigmoid(s); unset: the raw score. A judge: the number it answers is clamped to it "
        "(default [0, 1]).",
    )
    sampling_params: SamplingParams | None = Field(
        None,
        description="A judge's sampling (temperature 0 when unset); a reward model ignores it.",
    )

    def templates(self) -> list[str]:
        return [t for message in self.input for t in message.texts()]

    @field_validator("range")
    @classmethod
    def _range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or value[0] >= value[1]):
            raise ValueError(f"range must be [lo, hi] with lo < hi, got {value}")
        return value


def _label(value: str) -> str:
    if not value.strip():
        raise ValueError("a label must have text (not only spaces)")
    return value


Label = Annotated[str, AfterValidator(_label)]


def label_key(label: str) -> str:
    """How labels compare: without surrounding spaces, ignoring case."""
    return label.strip().casefold()


class LabelModelGrader(_Base):
    """A generative judge picks one of ``labels``: 1 if it is one of ``passing_labels``,
    else 0. An eval's criterion of its own, or a training job's grader served by a judge
    endpoint (module docstring)."""

    type: Literal["label_model"]
    model: str = Field(
        min_length=1,
        description="The judge: in an eval, a chat model the caller may use (a base model "
        "under a model root, an ft: model, a checkpoint), asked through posttrain's "
        "inference workers; in a training job, a model a judge endpoint of the server serves "
        "(POSTTRAIN_JUDGE_ENDPOINTS).",
    )
    input: list[ScoreModelMessage] = Field(
        min_length=1,
        description="The chat messages the judge is sent, with {{item.x}} and "
        "{{sample.output_text}} filled in; sent as written, so they should name the labels.",
    )
    labels: list[Label] = Field(
        min_length=1,
        description="The answers the judge may give; distinct ignoring case and surrounding "
        "spaces.",
    )
    passing_labels: list[Label] = Field(
        min_length=1, description="The labels that pass; each one of 'labels'."
    )
    sampling_params: SamplingParams | None = Field(
        None,
        description="Extension: the judge's sampling parameters (temperature 0 when unset).",
    )

    def templates(self) -> list[str]:
        return [t for message in self.input for t in message.texts()]

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for label in value:
            other = seen.setdefault(label_key(label), label)
            if other is not label:
                raise ValueError(
                    f"labels must be distinct ignoring case and surrounding spaces: {other!r} "
                    f"and {label!r} are the same answer"
                )
        return value

    @field_validator("passing_labels")
    @classmethod
    def _subset(cls, value: list[str], info: ValidationInfo) -> list[str]:
        labels = info.data.get("labels")
        if labels is None:
            return value  # the labels' own error is reported
        known = {label_key(label) for label in labels}
        outside = [p for p in value if label_key(p) not in known]
        if outside:
            raise ValueError(
                f"every passing label must be one of labels ({', '.join(map(repr, labels))}); "
                f"not: {', '.join(map(repr, outside))}"
            )
        return value


class MathVerifyGrader(_Base):
    """1 if ``input`` states the same mathematical answer as ``reference`` (math-verify)."""

    type: Literal["math_verify"]
    input: Template = Field(description="The model's answer text; \\boxed{} is read first.")
    reference: Template = Field(description="The gold answer, LaTeX or plain ('\\frac{1}{2}').")

    def templates(self) -> list[str]:
        return [self.input, self.reference]


class RegexGrader(_Base):
    """1 if ``pattern`` matches anywhere in ``input``, else 0."""

    type: Literal["regex"]
    input: Template = Field(description="The text searched; usually '{{sample.output_text}}'.")
    pattern: RegexPattern = Field(
        min_length=1,
        description="Python regular expression (no templates): anchor with ^/$, flags inline "
        "('(?i)'). Searched with a 1 s timeout per sample.",
    )


class LengthPenaltyGrader(_Base):
    """DAPO's soft overlong penalty in [-1, 0] (formula in ``text.length_penalty``)."""

    type: Literal["length_penalty"]
    input: Template = Field(description="The text measured; usually '{{sample.output_text}}'.")
    max_length: int = Field(ge=1, description="L_max: longer than this scores -1.")
    target_length: int | None = Field(
        None,
        ge=0,
        description="No penalty up to here; linear from 0 to -1 between it and max_length. "
        "Default: max_length (a hard cut-off).",
    )
    unit: Literal["words", "characters"] = Field(
        "words", description="What is counted: whitespace-separated words, or characters."
    )

    @field_validator("target_length")
    @classmethod
    def _order(cls, value: int | None, info: ValidationInfo) -> int | None:
        top = info.data.get("max_length")
        if value is not None and top is not None and value > top:
            raise ValueError(f"target_length ({value}) must not exceed max_length ({top})")
        return value

    @property
    def target(self) -> int:
        return self.max_length if self.target_length is None else self.target_length


def _type_check(allow_multi: bool):
    """A before-validator that names refused and unknown types before the union runs."""

    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        kind = value.get("type")
        if not isinstance(kind, str):
            return value  # the union names the bad type
        if kind == "multi" and not allow_multi:
            raise ValueError("a multi grader's sub-graders cannot be multi graders")
        if kind not in GRADER_TYPES:
            raise ValueError(
                f"unknown grader type {kind!r}; expected one of: {', '.join(GRADER_TYPES)}"
            )
        return value

    return check


_LEAVES = Union[  # noqa: UP007
    StringCheckGrader,
    TextSimilarityGrader,
    ScoreModelGrader,
    LabelModelGrader,
    MathVerifyGrader,
    RegexGrader,
    LengthPenaltyGrader,
    EndpointGrader,
    PythonGrader,
]
SubGrader = Annotated[_LEAVES, Field(discriminator="type"), BeforeValidator(_type_check(False))]


def _graders_map(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return {value.get("name", ""): value}  # OpenAI's SDK types: one grader object
    return value


class MultiGrader(_Base):
    """Sub-graders combined by an arithmetic formula over their keys."""

    type: Literal["multi"]
    graders: Annotated[dict[str, SubGrader], BeforeValidator(_graders_map)] = Field(
        min_length=1, description="{key: grader}; the keys are the names the formula reads."
    )
    calculate_output: str = Field(
        description="Formula over the keys: numbers, + - * / ^, parentheses and "
        f"{', '.join(FUNCTIONS)} (e.g. '0.8 * correct + 0.2 * style')."
    )

    def templates(self) -> list[str]:
        return [t for g in self.graders.values() for t in g.templates()]

    @field_validator("graders")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not key.isidentifier() or key in FUNCTIONS:
                raise ValueError(
                    f"sub-grader key {key!r} cannot be used in calculate_output: keys must be "
                    f"identifiers (letters, digits, _) other than {', '.join(FUNCTIONS)}"
                )
        return value

    @field_validator("calculate_output")
    @classmethod
    def _formula(cls, value: str, info: ValidationInfo) -> str:
        if "graders" in info.data:  # else the graders' own error is reported
            compile_formula(value, set(info.data["graders"]))
        return value


Grader = Annotated[
    Union[_LEAVES, MultiGrader],  # noqa: UP007
    Field(discriminator="type"),
    BeforeValidator(_type_check(True)),
    BeforeValidator(at_most(MAX_DEFINITION_BYTES, "a grader definition")),
]
GraderSpec = Union[_LEAVES, MultiGrader]  # noqa: UP007  (the type of a parsed grader)
_ADAPTER: TypeAdapter = TypeAdapter(Grader)
_TAGS = frozenset(GRADER_TYPES)
_UNION_LABELS = ("str-content", "part-content", "list-content", "function-")


class InvalidGrader(ValueError):
    """A grader spec that does not validate; ``param`` is the offending field's path."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _param(loc: tuple, prefix: str) -> str:
    """``grader.graders.a.input`` from pydantic's loc, without its union tags."""
    out: list[str] = []
    expect_tag = True  # a grader's type tag follows the root and each key under 'graders'
    for part in map(str, loc):
        if (expect_tag and part in _TAGS) or part.startswith(_UNION_LABELS):
            expect_tag = False
            continue
        out.append(part)
        expect_tag = len(out) >= 2 and out[-2] == "graders"
    return prefix + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in out)


def parse_grader(raw: Any, param: str = "grader") -> GraderSpec:
    """Validate a grader object; raises ``InvalidGrader`` naming the field at fault."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise InvalidGrader(*describe_errors(exc, lambda loc: _param(loc, param), param)) from None


CriterionSpec = GraderSpec  # an eval's testing criterion: any grader


# Eval criteria whose ``pass_threshold`` is the criterion's, not a field of the grader (as
# in OpenAI's testing criteria); a text_similarity's is its grader's own.
THRESHOLD_CRITERIA = frozenset({"score_model", "python"})


def parse_criterion(raw: Any, param: str = "grader") -> CriterionSpec:
    """An eval's testing criterion: any grader ``parse_grader`` accepts (a label_model and a
    generative score_model are asked through inference workers there); ``InvalidGrader``
    names the field."""
    return parse_grader(raw, param)


def describe_errors(
    exc: ValidationError, locate: Callable[[tuple], str], fallback: str
) -> tuple[str, str]:
    """pydantic's errors as ``"path: message; ..."`` (the first five), with each path named
    by ``locate(loc)``, and the first path (``fallback`` if none)."""
    errs = exc.errors(include_url=False)
    paths = [locate(tuple(e["loc"])) for e in errs]
    msgs = [e["msg"].removeprefix("Value error, ") for e in errs]
    text = "; ".join(f"{p}: {m}" for p, m in list(zip(paths, msgs, strict=True))[:5])
    return text, paths[0] if paths else fallback


def dump_grader(grader: GraderSpec) -> dict[str, Any]:
    """The grader as JSON with the fields the request set: what ``validate`` echoes."""
    return grader.model_dump(mode="json", exclude_unset=True)


def _walk(grader: GraderSpec):
    yield grader
    if isinstance(grader, MultiGrader):
        yield from grader.graders.values()


def reward_range(grader: GraderSpec) -> tuple[float, float] | None:
    """The [lo, hi] a grader's reward can take, or None where it cannot be known before
    it runs (a score_model without ``range``, a multi grader's formula)."""
    if isinstance(grader, LengthPenaltyGrader):
        return (-1.0, 0.0)
    if isinstance(grader, TextSimilarityGrader) and grader.evaluation_metric == "cosine":
        return (-1.0, 1.0)
    if isinstance(grader, ScoreModelGrader):
        return tuple(grader.range) if grader.range else None
    if isinstance(grader, LabelModelGrader):
        return (0.0, 1.0)
    if isinstance(grader, MultiGrader | EndpointGrader | PythonGrader):
        return None
    return (0.0, 1.0)  # string_check, text_similarity, math_verify, regex


def needs_model(grader: GraderSpec) -> bool:
    """True if the grader scores with a model (score_model: a reward model or a judge;
    label_model: a judge; cosine similarity: an encoder): never in the API process, nor in
    a bounded child."""
    return any(
        isinstance(g, ScoreModelGrader | LabelModelGrader)
        or (isinstance(g, TextSimilarityGrader) and g.evaluation_metric == "cosine")
        for g in _walk(grader)
    )


def template_fields(grader: GraderSpec) -> set[str]:
    """The dataset-row fields the grader reads, as dotted paths (``{{item.a.b}}`` -> 'a.b')."""
    refs = (ref for text in grader.templates() for ref in parse_template(text))
    return {ref.dotted for ref in refs if ref.namespace == "item"}


def missing_item_fields(grader: GraderSpec, row: dict[str, Any]) -> list[str]:
    """The ``template_fields`` that ``row`` lacks, sorted; [] when the row suits the grader."""
    missing = []
    for path in sorted(template_fields(grader)):
        try:
            resolve_path(row, tuple(path.split(".")), "item")
        except TemplateError:
            missing.append(path)
    return missing
