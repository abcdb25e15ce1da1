"""Graders that run a local model: score_model (a reward model) and cosine similarity.

The training process calls these, and so does an eval run's own process (a
reward model or encoder criterion); torch and transformers are imported inside the
functions, so the API can import the grader registry without them.
Models are loaded once per process (``lru_cache``) onto the training device.

score_model departs from OpenAI's: OpenAI prompts a hosted chat model to output
a grade (posttrain does that in eval runs, through its inference workers, and in
training jobs through a judge endpoint: ``trainers.contract.graders.judgeendpoints``);
here posttrain runs a sequence-classification
reward model with one label
(``AutoModelForSequenceClassification``, as TRL's reward models are) on the
rendered conversation and takes its logit as the score, mapped into ``range``
by ``lo + (hi - lo) * sigmoid(s)`` when one is given. The conversation is
rendered with the reward model's chat template (``developer`` turns become
``system``); a tokenizer without one gets the message texts joined by newlines.

Cosine similarity mean-pools the encoder's last hidden state over the attention
mask and returns the cosine of the two vectors, in [-1, 1].
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from trainers.contract.graders.templates import GraderError

__all__ = ["cosine_similarities", "reward_scores"]

BATCH_SIZE = 16


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


@lru_cache(maxsize=4)
def _reward_model(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification

    try:
        tok = _tokenizer(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except Exception as exc:
        raise GraderError(f"score_model '{path}' could not be loaded: {exc}") from exc
    if model.config.num_labels != 1:
        raise GraderError(
            f"score_model '{path}' has {model.config.num_labels} labels; a reward model has one"
        )
    model.config.pad_token_id = tok.pad_token_id
    return tok, model.to(_device()).eval()


@lru_cache(maxsize=2)
def _encoder(path: str) -> tuple[Any, Any]:
    from transformers import AutoModel

    try:
        tok, model = _tokenizer(path), AutoModel.from_pretrained(path)
    except Exception as exc:
        raise GraderError(f"embedding_model '{path}' could not be loaded: {exc}") from exc
    return tok, model.to(_device()).eval()


def _chat_text(tok: Any, messages: list[dict[str, str]]) -> str:
    turns = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    if tok.chat_template:
        return tok.apply_chat_template(turns, tokenize=False)
    return "\n".join(m["content"] for m in turns)


def _batches(texts: list[str], tok: Any, special: bool):
    limit = min(tok.model_max_length, 1 << 16)
    for start in range(0, len(texts), BATCH_SIZE):
        chunk = texts[start : start + BATCH_SIZE]
        yield tok(
            chunk,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=limit,
            add_special_tokens=special,
        ).to(_device())


def reward_scores(
    path: str, conversations: list[list[dict[str, str]]], value_range: list[float] | None
) -> list[float]:
    """One score per conversation (``[{role, content}]``) from the reward model at ``path``."""
    import torch

    tok, model = _reward_model(path)
    texts = [_chat_text(tok, c) for c in conversations]
    scores: list[float] = []
    with torch.inference_mode():
        for enc in _batches(texts, tok, special=not tok.chat_template):
            scores.extend(model(**enc).logits[:, 0].float().tolist())
    if value_range is None:
        return scores
    lo, hi = value_range
    return [lo + (hi - lo) / (1.0 + math.exp(-s)) for s in scores]


def cosine_similarities(path: str, pairs: list[tuple[str, str]]) -> list[float]:
    """Cosine of the mean-pooled embeddings of each (input, reference) pair."""
    import torch

    tok, model = _encoder(path)
    flat = [t for pair in pairs for t in pair]
    vectors = []
    with torch.inference_mode():
        for enc in _batches(flat, tok, special=True):
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            vectors.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    emb = torch.cat(vectors) if vectors else torch.zeros(0, 1)
    sims = torch.nn.functional.cosine_similarity(emb[0::2], emb[1::2], dim=-1)
    return sims.tolist()
