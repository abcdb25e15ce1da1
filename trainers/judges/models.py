"""The model judges' torch side: loading a sequence classifier once and running it.

Only the training process imports this module (``registry`` imports it inside
the model judges' first call). A model is loaded once per process and device
(``lru_cache``), in eval mode with gradients off, and every forward pass runs
under ``torch.inference_mode``. Tokenizers pad on the right and truncate on
the left, so an over-long input loses its beginning (the prompt), never the
responses at its end; the classifier reads the last non-padding token, as
transformers' ``*ForSequenceClassification`` heads do.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["choose_device", "load_classifier", "logits"]


def choose_device(device: Any = None) -> str:
    """``device`` as a string; ``None`` means CUDA when there is one, else the CPU."""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=4)
def load_classifier(path: str, device: str) -> tuple[Any, Any]:
    """(tokenizer, model) of the sequence-classification checkpoint at ``path``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"judge model '{path}' could not be loaded: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.truncation_side = "left"
    model.config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    return tok, model.to(device).eval()


def logits(
    path: str, device: str, texts: list[str], batch_size: int, max_length: int, special: bool
):
    """The classifier's logits for ``texts``, as one float32 CPU tensor ``[len(texts), labels]``."""
    import torch

    tok, model = load_classifier(path, device)
    limit = min(max_length, tok.model_max_length)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=limit,
                add_special_tokens=special,
            ).to(device)
            out.append(model(**enc).logits.float().cpu())
    labels = model.config.num_labels
    return torch.cat(out) if out else torch.zeros(0, labels)
