"""OREO's trajectories as token ids: tokenisation, step ids, the padding collator, checks.

A trajectory ``{"prompt", "response", "reward"}`` (``trainers/algorithms/oreo/method.py``)
becomes ``input_ids`` = prompt + response + EOS and ``labels`` = -100 over the prompt,
the response's ids (and EOS) after it, so the fused head's per-token log-probs over
the label positions are log π(a_t | s_t) for the T response tokens.

- Text prompts: as the tokenizer encodes them (with its special tokens); message
  prompts: the chat template with the generation prompt. The response is encoded
  without special tokens, with character offsets, then EOS is appended.
  [departure: the authors' text is ``prompt + response + " " + eos``; we append EOS
  without the space, as BCO/TRL do, so no stray token is scored.]
- ``step_ids``: the step index of every response token (``trainers.core.oreo.
  split_steps`` + ``token_step_ids``); EOS joins the last step. Only the ``step``
  variant reads them.
- Truncation to ``max_length``: ``trainers.algorithms.tokens.truncate`` (the prompt
  keeps its end, the response is cut at its end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainers.algorithms.tokens import prompt_ids, truncate
from trainers.core.oreo import split_steps, token_step_ids
from trainers.logprobs import IGNORE_INDEX


def response_ids(tok, response: str, delimiters: Sequence[str]) -> tuple[list[int], list[int]]:
    """(response ids + EOS, the step id of each)."""
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        offsets.append((0, 0))  # an empty-offset token joins the previous token's step
    return ids, token_step_ids(offsets, split_steps(response, delimiters))


def tokenize_row(tok, max_length: int, delimiters: Sequence[str], row: dict[str, Any], index: int):
    """One example: input_ids, attention_mask, labels, step_ids (-1 over the prompt), reward."""
    p = prompt_ids(tok, row["prompt"])
    r, steps = response_ids(tok, row["response"], delimiters)
    p, r = truncate(p, r, max_length)
    if not r:
        raise ValueError(f"row {index}: no response token is left within max_length")
    return {
        "input_ids": p + r,
        "attention_mask": [1] * (len(p) + len(r)),
        "labels": [IGNORE_INDEX] * len(p) + r,
        "step_ids": [-1] * len(p) + steps[: len(r)],
        "reward": float(row["reward"]),
    }
