"""Reading a local model directory without loading it (torch-free).

The API refuses the common mistakes at creation, before a job could fail in training:
a path that is no model directory, a causal LM where a sequence classifier is needed,
a classifier with the wrong number of labels, no weights, no tokenizer. Nothing is
loaded: a directory that passes may still fail in training if its files are corrupt.
Judges (``trainers.contract.judges.validate``) and ``score_model`` graders
(``trainers.contract.graders.validate``) use these checks, each naming its own kind of
model in the message (``what``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")  # fmt: skip
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelFileError(ValueError):
    """A model directory that cannot serve; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def model_directory(path: str, param: str, what: str = "model") -> Path:
    """The local directory ``path`` names; ``ModelFileError`` if there is none."""
    directory = Path(path)
    if not directory.is_absolute() or not directory.is_dir():
        raise ModelFileError(
            f"{what} does not load: not an absolute path to a local model directory",
            param,
        )
    return directory


def read_config(directory: Path, path: str, param: str, what: str = "model") -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{what} does not load: no config.json", param) from None
    except OSError as exc:  # the reason only: the message never shows a server path
        reason = exc.strerror or type(exc).__name__
        message = f"{what} does not load: config.json is unreadable ({reason})"
        raise ModelFileError(message, param) from None
    except ValueError as exc:
        raise ModelFileError(
            f"{what} does not load: config.json is not valid JSON ({exc})", param
        ) from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{what}: config.json is not an object", param)
    return config


def num_labels(config: dict[str, Any]) -> int:
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default


def check_classifier(
    path: str, labels: tuple[int, ...], param: str, what: str, needs: str = "it needs"
) -> None:
    """``path`` is a sequence classifier with one of ``labels`` label counts, weights and
    a tokenizer (``needs`` says who needs that many labels, in the message)."""
    directory = model_directory(path, param, what)
    config = read_config(directory, path, param, what)
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ModelFileError(
            f"{what} is not a sequence-classification model "
            f"(architectures {archs}); a {what} needs an AutoModelForSequenceClassification "
            "checkpoint",
            param,
        )
    count = num_labels(config)
    if count not in labels:
        raise ModelFileError(
            f"{what} has {count} labels; {needs} {' or '.join(map(str, labels))}",
            param,
        )
    if not any((directory / f).is_file() for f in _WEIGHTS):
        raise ModelFileError(f"{what} does not load: no weights", param)
    if not any((directory / f).is_file() for f in _TOKENIZER):
        raise ModelFileError(f"{what} does not load: no tokenizer", param)
