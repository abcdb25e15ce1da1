"""Creation-time judge checks: torch-free, run by the API before a job is written.

``validate_judge`` parses the spec (unknown types, bad regexes, malformed
matrices and grader errors are pydantic's and the graders' own checks) and
then looks at the file system (``trainers.contract.modelfiles``): a model judge's
``model`` must be a directory holding a ``config.json`` of a sequence-classification
architecture with the number of labels the judge reads, plus weights and a tokenizer,
and a grader judge's ``score_model`` graders are checked as graders are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.contract.graders.validate import check_grader_models
from trainers.contract.judges.spec import (
    GraderJudge,
    InvalidJudge,
    JudgeSpec,
    PreferenceModelJudge,
    RewardModelJudge,
    parse_judge,
)
from trainers.contract.modelfiles import ModelFileError, check_classifier, num_labels, read_config

__all__ = ["validate_judge"]


def _check_model(path: str, labels: tuple[int, ...], param: str) -> None:
    try:
        check_classifier(path, labels, param, "judge model", needs="this judge needs")
    except ModelFileError as exc:
        raise InvalidJudge(str(exc), exc.param) from None


def validate_judge(spec: JudgeSpec | dict[str, Any], param: str = "judge") -> None:
    """Raise ``InvalidJudge`` (a ``ValueError``) saying what is wrong; ``.param`` names the
    field (``judge.model``), which the message itself leaves out."""
    parsed = parse_judge(spec, param)
    if isinstance(parsed, PreferenceModelJudge):
        _check_model(parsed.model, (1, 2), f"{param}.model")
        if parsed.a_wins_label != 0:
            where = f"{param}.model"
            count = num_labels(read_config(Path(parsed.model), parsed.model, where))
            if parsed.a_wins_label >= count:
                raise InvalidJudge(
                    f"{parsed.a_wins_label} is not a label of a {count}-label model",
                    f"{param}.a_wins_label",
                )
    elif isinstance(parsed, RewardModelJudge):
        _check_model(parsed.model, (1,), f"{param}.model")
    elif isinstance(parsed, GraderJudge):
        _check_grader_models(parsed, param)


def _check_grader_models(judge: GraderJudge, param: str) -> None:
    """A grader judge's score_model must be a one-label classifier directory too."""
    try:
        check_grader_models(judge.grader, f"{param}.grader")
    except ModelFileError as exc:
        raise InvalidJudge(str(exc), exc.param) from None
