"""Creation-time checks of the models a grader names (torch-free; nothing is loaded).

A ``score_model`` grader's ``model`` must be a one-label sequence classifier directory
with weights and a tokenizer (``trainers.contract.modelfiles``). Job creation runs this
on every grader of a GRPO-family job, and ``/graders/validate`` runs the same check, so
the two answer alike.
"""

from __future__ import annotations

from trainers.contract.graders.spec import GraderSpec, MultiGrader, ScoreModelGrader
from trainers.contract.modelfiles import check_classifier


def check_grader_models(grader: GraderSpec, param: str) -> None:
    """``ModelFileError`` naming the field of the first score_model that cannot serve."""
    subs = grader.graders.items() if isinstance(grader, MultiGrader) else [("", grader)]
    for key, sub in subs:
        if isinstance(sub, ScoreModelGrader):
            where = param + (f".graders.{key}" if key else "") + ".model"
            check_classifier(sub.model, (1,), where, "score_model", needs="a reward model has")
