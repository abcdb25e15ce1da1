"""Creation-time checks of the models a grader names (torch-free; nothing is loaded).

A training job's ``score_model`` must be a one-label sequence classifier directory with
weights and a tokenizer (``trainers.contract.modelfiles``), or a *remote judge*: a model
one of the server's judge endpoints serves (``POSTTRAIN_JUDGE_ENDPOINTS``,
``judgeendpoints``), which is also the only way a ``label_model`` grades a training job.
Job creation runs this on every grader of a GRPO-family job, and ``/graders/validate``
runs the same check, so the two answer alike. An eval's testing criteria
(``check_criterion_models``) may also name a generative judge: a ``label_model``'s model,
and a ``score_model`` whose model is no sequence classifier (``is_reward_model``); those
are asked through inference workers and need no file check beyond the caller's model
access.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from trainers.contract.graders.judgeendpoints import SETTING
from trainers.contract.graders.spec import (
    CriterionSpec,
    GraderSpec,
    LabelModelGrader,
    MultiGrader,
    ScoreModelGrader,
)
from trainers.contract.modelfiles import ModelFileError, check_classifier


def check_grader_models(
    grader: GraderSpec, param: str, judges: Collection[str] | None = None
) -> None:
    """``ModelFileError`` naming the field of the first score_model or label_model that
    cannot serve. ``judges``: for a grpo or reinforcement job's graders (and
    ``/graders/validate``), the models the server's judge endpoints serve (the grader's
    ``model`` as the caller wrote it, never a resolved path); None where no judge endpoint
    is asked (an EGPO grader judge, an eval's multi grader)."""
    subs = grader.graders.items() if isinstance(grader, MultiGrader) else [("", grader)]
    for key, sub in subs:
        where = param + (f".graders.{key}" if key else "") + ".model"
        if isinstance(sub, ScoreModelGrader | LabelModelGrader) and sub.model in (judges or ()):
            continue
        if isinstance(sub, LabelModelGrader):
            raise ModelFileError(_label_refusal(judges), where)
        if isinstance(sub, ScoreModelGrader):
            try:
                check_classifier(sub.model, (1,), where, "score_model", needs="a reward model has")
            except ModelFileError as exc:
                if judges is None:
                    raise
                raise ModelFileError(
                    f"{exc}; a score_model is either a local reward model or a model served by "
                    f"a judge endpoint this server names in {SETTING}",
                    exc.param,
                ) from None


def _label_refusal(judges: Collection[str] | None) -> str:
    if judges is None:
        return (
            "label_model cannot grade here: use it as a testing criterion of an eval "
            "(/v1/evals), on its own, or as a grpo or reinforcement job's grader served by a "
            f"judge endpoint ({SETTING})"
        )
    return (
        "label_model grades a training job, /graders or a multi grader only through a judge "
        f"endpoint, and the model is served by none this server names in {SETTING}; without "
        "one, use it as a testing criterion of an eval (/v1/evals), on its own"
    )


def is_reward_model(path: str) -> bool:
    """True if ``path`` (a resolved model reference) is a local directory whose config
    names a sequence-classification architecture: a ``score_model`` of it is scored by
    the model itself. Anything else (a causal LM, a LoRA checkpoint, a hub id) is a
    generative judge in an eval's criteria."""
    directory = Path(path)
    if not directory.is_absolute():
        return False
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(archs, list) and any(
        str(a).endswith("ForSequenceClassification") for a in archs
    )


def is_judge(criterion: CriterionSpec) -> bool:
    """True if the (resolved) criterion asks a generative judge: a label_model, or a
    score_model whose model is no reward model."""
    if isinstance(criterion, LabelModelGrader):
        return True
    return isinstance(criterion, ScoreModelGrader) and not is_reward_model(criterion.model)


def check_criterion_models(criterion: CriterionSpec, param: str) -> None:
    """An eval's criterion, its models resolved: a judge needs nothing more; a reward
    model (and every score_model inside a multi grader) must serve as a training job's."""
    if is_judge(criterion):
        return
    check_grader_models(criterion, param)  # type: ignore[arg-type]
