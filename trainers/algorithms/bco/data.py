"""BCO's records as token ids, and the prompt embeddings UDM classifies.

A record ``{"prompt", "completion", "label"}`` (``trainers/algorithms/bco/method.py``)
becomes
``input_ids`` = prompt + completion and ``labels`` = -100 over the prompt, the
completion's ids after it, so the summed completion log-prob is the sum of the
fused head's per-token log-probs over the label positions.

- Message rows use the tokenizer's chat template: the prompt with the generation
  prompt, then the completion's ids are what the full conversation adds after it.
- Text rows: the prompt as the tokenizer encodes it (with its special tokens), the
  completion without special tokens, plus EOS (TRL's BCO does the same).
- Truncation to ``max_length`` [TRL: keep_end for the prompt]:
  ``trainers.algorithms.tokens.truncate`` (the prompt keeps its end, at least half of
  ``max_length``; the completion is cut at its end). [choice: TRL had a separate
  ``max_prompt_length``; we have one limit.]
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.algorithms.tokens import prompt_ids, truncate
from trainers.core.bco import mean_pooled_embedding
from trainers.logprobs import IGNORE_INDEX


def _prompt_completion_ids(tok, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    p = prompt_ids(tok, prompt)
    if isinstance(prompt, str):
        c = tok(completion, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            c = [*c, tok.eos_token_id]
        return p, list(c)
    full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
    full = list(full["input_ids"])
    if full[: len(p)] != p:
        raise ValueError("the chat template does not extend the prompt with the completion")
    return p, full[len(p) :]


def tokenize_row(tok, max_length: int, row: dict[str, Any], index: int) -> dict[str, Any]:
    """One BCO example: input_ids, attention_mask, labels, prompt_length, label, row_index."""
    p, c = truncate(*_prompt_completion_ids(tok, row["prompt"], row["completion"]), max_length)
    if not c:
        raise ValueError(f"row {index}: no completion token is left within max_length")
    return {
        "input_ids": p + c,
        "attention_mask": [1] * (len(p) + len(c)),
        "labels": [IGNORE_INDEX] * len(p) + c,
        "prompt_length": len(p),
        "label": bool(row["label"]),
        "row_index": index,
    }


# ----------------------------------------------------------------------------- UDM embeddings
def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack under a causal LM (no LM head), through peft/DDP wrappers."""
    from trainers.fused_head import unwrap_model

    inner = unwrap_model(model)
    return getattr(inner, inner.base_model_prefix)


@torch.no_grad()
def reference_prompt_embeddings(
    model: torch.nn.Module, dataset, indices: list[int], pad_id: int, batch_size: int = 16
) -> torch.Tensor:
    """[N, H] mean-pooled, L2-normalised last hidden states of the rows' prompt tokens."""
    backbone, device = _backbone(model), next(model.parameters()).device
    out = []
    for start in range(0, len(indices), batch_size):
        rows = [dataset[i] for i in indices[start : start + batch_size]]
        prompts = [r["input_ids"][: r["prompt_length"]] for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append(mean_pooled_embedding(hidden, mask).cpu())
    return torch.cat(out)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@torch.no_grad()
def external_prompt_embeddings(path: str, prompts: list[Any], batch_size: int = 16) -> torch.Tensor:
    """[N, H] embeddings from a local ``AutoModel`` (mean-pooled last hidden state, L2-normed).

    Message prompts are embedded as ``role: content`` lines.
    """
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [_prompt_text(p) for p in prompts[start : start + batch_size]]
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        out.append(mean_pooled_embedding(hidden, enc["attention_mask"]))
    return torch.cat(out)
