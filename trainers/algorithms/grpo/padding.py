"""Score a left-padded GRPO batch in length groups, each without the padding all its rows share.

XRPO's planner seeds an unsolved prompt with solved exemplars as earlier chat turns, so
a seeded prompt is several times longer than the others, and TRL left-pads every row of
the batch to the longest: the unseeded rows' forward (and backward) then runs mostly on
padding. ``length_groups`` sorts the rows by prompt length and, when that saves at least
``MIN_SAVING`` of the positions, splits them in two at the cheapest point; each group
drops the leading columns that are padding in all of its rows. ``in_length_groups`` runs
TRL's scoring on each group and puts the rows back in order.

Exact: a dropped column is masked out of attention for every row of its group, and the
completion columns (scored) are kept whole. The positions of a row's tokens shift by the
columns dropped (TRL's forward passes no ``position_ids``), which changes nothing for
rotary embeddings (attention sees only relative positions) up to float rounding; the
trainer uses this only for models with rotary embeddings, and not for the MoE aux loss or
image inputs, whose chunking TRL does itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_SAVING = 0.25  # split only when the groups skip at least this share of the positions
LENGTH_GROUPS = True  # False: one padded batch, as TRL scores it (benchmark baseline only)

Score = Callable[[torch.Tensor, torch.Tensor], tuple]


def length_groups(
    attention_mask: torch.Tensor, logits_to_keep: int
) -> list[tuple[list[int] | None, int]]:
    """``[(rows, start)]``: one or two groups of rows (None: every row, in order), each to
    be scored on columns ``start:``. Prompt columns are the first ``width - logits_to_keep``."""
    width = attention_mask.size(1) - logits_to_keep
    prompt = attention_mask[:, :width].bool()
    first = torch.where(prompt.any(1), prompt.int().argmax(1), width)  # first real token
    # at least one prompt column: it gives the first completion token's log-prob
    need = [max(1, width - f) for f in first.tolist()]
    n = len(need)
    order = sorted(range(n), key=need.__getitem__)
    whole = n * (max(need) + logits_to_keep)
    best, split = whole, 0
    for k in range(1, n):
        cost = k * (need[order[k - 1]] + logits_to_keep) + (n - k) * (max(need) + logits_to_keep)
        if cost < best:
            best, split = cost, k
    if split == 0 or best > (1 - MIN_SAVING) * whole:
        return [(None, width - max(need))]
    groups = (order[:split], order[split:])
    return [(sorted(g), width - max(need[i] for i in g)) for g in groups]


def in_length_groups(
    score: Score, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> tuple:
    """``score(ids, mask) -> (logps, entropies or None, _)`` over the length groups, with
    the rows of ``logps`` and ``entropies`` back in the batch's order (no aux loss)."""
    if not LENGTH_GROUPS:
        return score(input_ids, attention_mask)
    groups = length_groups(attention_mask, logits_to_keep)
    if len(groups) == 1:
        start = groups[0][1]
        return score(input_ids[:, start:], attention_mask[:, start:])
    parts, rows = [], []
    for group, start in groups:
        index = torch.tensor(group, device=input_ids.device)
        parts.append(score(input_ids[index, start:], attention_mask[index, start:]))
        rows.append(index)
    back = torch.cat(rows).argsort()
    logps = torch.cat([p[0] for p in parts])[back]
    entropies = None if parts[0][1] is None else torch.cat([p[1] for p in parts])[back]
    return logps, entropies, None
