"""Token-level helpers posttrain's own trainers share: a prompt's ids, truncation, padding.

``prompt_ids`` encodes a text prompt as the tokenizer does (with its special tokens) and
a message list through the chat template with the generation prompt. ``truncate`` fits
a (prompt, completion) pair of token lists into one length limit. A tokenised row holds
lists of token-aligned values (``input_ids``, ``attention_mask``, ``labels``, and for
OREO ``step_ids``) and per-row scalars (BCO's ``label`` and ``row_index``, OREO's
``reward``). ``PadCollator`` right-pads every list to the longest
row with that field's pad value and stacks the scalars.
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.logprobs import IGNORE_INDEX


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    """The prompt's token ids (see the module docstring)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(ids["input_ids"])


def truncate(prompt: list[int], completion: list[int], max_length: int) -> tuple[list, list]:
    """Cut (prompt, completion) to ``max_length`` tokens in all: the prompt keeps its last
    tokens, as many as the completion leaves room for but at least half of ``max_length``
    (or the whole prompt if shorter); the completion is then cut at its end to fit."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    keep = min(len(prompt), max(max_length - len(completion), max_length // 2))
    prompt = prompt[len(prompt) - keep :]
    return prompt, completion[: max_length - len(prompt)]


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS where it has no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0), ``labels`` (-100) and any
    ``extra_pads`` fields; stacks ``scalars`` (field -> Python type) into tensors."""

    def __init__(
        self,
        pad_token_id: int,
        *,
        extra_pads: dict[str, int] | None = None,
        scalars: dict[str, type] | None = None,
    ):
        self.pad = pad_token_id
        self.pads = {
            "input_ids": pad_token_id,
            "attention_mask": 0,
            "labels": IGNORE_INDEX,
            **(extra_pads or {}),
        }
        self.scalars = dict(scalars or {})

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            key: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])
            for key, value in self.pads.items()
        }
        for key, kind in self.scalars.items():
            batch[key] = torch.tensor([kind(r[key]) for r in rows])
        return batch
