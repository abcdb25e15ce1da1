"""Creation-time judge checks: torch-free, run by the API before a job is written.

``validate_judge`` parses the spec (unknown types, bad regexes, malformed
matrices and grader errors are pydantic's and the graders' own checks) and
then looks at the file system: a model judge's ``model`` must be a directory
holding a ``config.json`` of a sequence-classification architecture with the
number of labels the judge reads, plus weights and a tokenizer. Nothing is
loaded: a judge that passes may still fail in training if its files are
corrupt, but the common mistakes (a wrong path, a causal LM, a classifier with
the wrong labels) are a 400 at creation.

``model_directory`` is the one place a model path is resolved, so a policy on
where models may live (configured model roots) can replace it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainers.contract.judges.spec import (
    GraderJudge,
    InvalidJudge,
    JudgeSpec,
    PreferenceModelJudge,
    RewardModelJudge,
    parse_judge,
)

__all__ = ["model_directory", "validate_judge"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")  # fmt: skip
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_directory(path: str, param: str) -> Path:
    """The local directory ``path`` names; ``InvalidJudge`` if there is none."""
    directory = Path(path)
    if not directory.is_absolute() or not directory.is_dir():
        raise InvalidJudge(
            f"judge model '{path}' does not load: not an absolute path to a local model directory",
            param,
        )
    return directory


def _read_config(directory: Path, path: str, param: str) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidJudge(f"judge model '{path}' does not load: no config.json", param) from None
    except (OSError, ValueError) as exc:
        raise InvalidJudge(
            f"judge model '{path}' does not load: config.json is unreadable ({exc})",
            param,
        ) from None
    if not isinstance(config, dict):
        raise InvalidJudge(f"judge model '{path}': config.json is not an object", param)
    return config


def _num_labels(config: dict[str, Any]) -> int:
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default


def _check_model(path: str, labels: tuple[int, ...], param: str) -> None:
    directory = model_directory(path, param)
    config = _read_config(directory, path, param)
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise InvalidJudge(
            f"judge model '{path}' is not a sequence-classification model "
            f"(architectures {archs}); a judge needs an AutoModelForSequenceClassification "
            "checkpoint",
            param,
        )
    count = _num_labels(config)
    if count not in labels:
        raise InvalidJudge(
            f"judge model '{path}' has {count} labels; this judge needs "
            f"{' or '.join(map(str, labels))}",
            param,
        )
    if not any((directory / f).is_file() for f in _WEIGHTS):
        raise InvalidJudge(f"judge model '{path}' does not load: no weights", param)
    if not any((directory / f).is_file() for f in _TOKENIZER):
        raise InvalidJudge(f"judge model '{path}' does not load: no tokenizer", param)


def validate_judge(spec: JudgeSpec | dict[str, Any], param: str = "judge") -> None:
    """Raise ``InvalidJudge`` (a ``ValueError``) saying what is wrong; ``.param`` names the
    field (``judge.model``), which the message itself leaves out."""
    parsed = parse_judge(spec, param)
    if isinstance(parsed, PreferenceModelJudge):
        _check_model(parsed.model, (1, 2), f"{param}.model")
        if parsed.a_wins_label != 0:
            count = _num_labels(_read_config(Path(parsed.model), parsed.model, f"{param}.model"))
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
    from trainers.contract.graders.spec import MultiGrader, ScoreModelGrader

    grader = judge.grader
    subs = grader.graders.items() if isinstance(grader, MultiGrader) else [("", grader)]
    for key, sub in subs:
        if isinstance(sub, ScoreModelGrader):
            where = f"{param}.grader" + (f".graders.{key}" if key else "") + ".model"
            _check_model(sub.model, (1,), where)
