"""OREO's trajectories as token ids: tokenisation, step ids, the padding collator, checks.

A trajectory ``{"prompt", "response", "reward"}`` (``trainers.data.oreo_records``)
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
- Truncation to ``max_length``: ``bco_data.truncate`` (the prompt keeps its end, the
  response is cut at its end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainers.algorithms.bco_data import truncate
from trainers.core.oreo import split_steps, token_step_ids
from trainers.logprobs import IGNORE_INDEX
from trainers.plan import JobError


def prompt_ids(tok, prompt: Any) -> list[int]:
    """The prompt's ids: a text prompt as encoded, messages through the chat template."""
    if isinstance(prompt, str):
        return list(tok(prompt)["input_ids"])
    enc = tok.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])


def response_ids(tok, response: str, delimiters: Sequence[str]) -> tuple[list[int], list[int]]:
    """(response ids + EOS, the step id of each)."""
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
        offsets.append((0, 0))  # an empty-offset token joins the previous token's step
    return ids, token_step_ids(offsets, split_steps(response, delimiters))


def tokenize_row(tok, row: dict[str, Any], max_length: int, delimiters: Sequence[str], index: int):
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


def tokenize_dataset(dataset, tok, max_length: int, delimiters: Sequence[str]):
    """Map a ``prompt``/``response``/``reward`` dataset to token ids (columns replaced)."""
    return dataset.map(
        lambda row, i: tokenize_row(tok, row, max_length, delimiters, i),
        with_indices=True,
        remove_columns=dataset.column_names,
    )


def check_steps(records: list[dict[str, Any]], delimiters: Sequence[str], param: str) -> None:
    """The step variant needs every response to hold a delimiter: JobError naming the line."""
    for line, rec in enumerate(records, start=1):
        if not any(d in rec["response"] for d in delimiters):
            raise JobError(
                "invalid_training_file",
                f"{param}: line {line}: the response has no step delimiter "
                f"({', '.join(repr(d) for d in delimiters)}); variant 'step' splits each "
                "response into steps at step_delimiters: add them, or use variant 'token'",
                param,
            )


class OREOCollator:
    """Right-pads rows: input_ids (pad id), attention_mask (0), labels (-100), step_ids (-1)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

        return {
            "input_ids": pad("input_ids", self.pad),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "step_ids": pad("step_ids", -1),
            "reward": torch.tensor([float(r["reward"]) for r in rows]),
        }
