"""Loss aggregation: per-token loss [B,T] -> the scalar one micro-batch backpropagates.

Formulas: ``docs/algorithms/grpo.md``; names and formulas are TRL 1.16's ``loss_type``
(``GRPOTrainer._compute_loss``), with ℓ already zero on padding and L_i = Σ_t m_{i,t}:

=========  ==================================  ======================================
name       formula                             paper
=========  ==================================  ======================================
grpo       (1/B) Σ_i (1/L_i) Σ_t ℓ_{i,t}        DeepSeekMath (arXiv 2402.03300)
bnpo       Σ ℓ / Σ m  (micro-batch)             verl ``token-mean``; NGRPO, HAPO
dr_grpo    Σ ℓ / (B · L_max)                    Dr.GRPO (arXiv 2503.20783)
dapo       Σ ℓ / (N_tok / world_size)           DAPO (arXiv 2503.14476)
=========  ==================================  ======================================

Gradient accumulation is the caller's: like TRL, divide ``grpo``, ``bnpo`` and
``dr_grpo`` by the number of accumulation steps. ``dapo``'s ``num_items`` already
counts the valid tokens of the whole optimiser step (all ranks, all accumulation
steps), so its micro-batch losses are summed as they are; ``world_size`` undoes
DDP's gradient averaging, making the step's gradient that of Σℓ / N_tok
(TRL passes ``num_items_in_batch / num_processes`` for the same reason).
``GLOBAL_NORMALISED`` names the modes that need no accumulation scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainers.core.types import lookup, registration

AggregationFn = Callable[..., torch.Tensor]

AGGREGATIONS: dict[str, AggregationFn] = {}
GLOBAL_NORMALISED: frozenset[str] = frozenset({"dapo"})


def register_aggregation(name: str) -> Callable[[AggregationFn], AggregationFn]:
    """Register ``fn(per_token_loss [B,T], mask [B,T], **hp) -> scalar``."""
    return registration(AGGREGATIONS, "aggregation", name)


def get_aggregation(name: str) -> AggregationFn:
    return lookup(AGGREGATIONS, "aggregation", name)


def _masked(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_token_loss * mask.to(per_token_loss.dtype)


@register_aggregation("grpo")
def grpo(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence mean, then batch mean: (1/B) Σ_i Σ_t ℓ_{i,t} / max(L_i, 1)."""
    lengths = mask.to(per_token_loss.dtype).sum(-1).clamp(min=1.0)
    return (_masked(per_token_loss, mask).sum(-1) / lengths).mean()


@register_aggregation("bnpo")
def bnpo(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean over the micro-batch: Σ ℓ / max(Σ m, 1)."""
    return _masked(per_token_loss, mask).sum() / mask.to(per_token_loss.dtype).sum().clamp(min=1.0)


@register_aggregation("dr_grpo")
def dr_grpo(
    per_token_loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int
) -> torch.Tensor:
    """Constant normaliser: Σ ℓ / (B · L_max), L_max the configured maximum completion length."""
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1; got {max_completion_length}")
    return _masked(per_token_loss, mask).sum() / (per_token_loss.shape[0] * max_completion_length)


@register_aggregation("dapo")
def dapo(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items: int | float | torch.Tensor,
    world_size: int = 1,
) -> torch.Tensor:
    """Global token mean: Σ ℓ / (N_tok / world_size).

    num_items: N_tok, the valid tokens of the whole optimiser-step batch (all ranks,
    all accumulation steps); clamped to ≥ 1. With one rank and one micro-batch this is
    ``bnpo``; summed over accumulation steps (and averaged over ranks) it is Σℓ / N_tok.
    """
    n = torch.as_tensor(num_items, dtype=per_token_loss.dtype, device=per_token_loss.device)
    return _masked(per_token_loss, mask).sum() / (n.clamp(min=1.0) / world_size)
