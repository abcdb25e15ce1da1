"""Typed inputs of the GRPO-family math, and the registry helpers every axis shares.

Notation: ``docs/algorithms/README.md``. B responses are padded to T tokens; the
mask is 1 on a response's valid (completion) tokens and 0 on padding. Every
function in ``trainers.core`` reads one of these bundles and returns a tensor
plus a metrics dict of detached 0-dim tensors (no host sync: the caller calls
``.item()`` when it logs).

Axes and their shared signatures (one registry each, keyed by the names in
``trainers.methods``):

- advantage estimator: ``fn(inp: AdvantageInputs, **hp) -> (A [B,T], metrics)``
- advantage shaper:    ``fn(inp: AdvantageInputs, A [B,T], **hp) -> (A' [B,T], metrics)``
- objective:           ``fn(inp: ObjectiveInputs, *, epsilon_low, epsilon_high, beta, **hp)
  -> (per-token loss [B,T], metrics)``
- aggregation:         ``fn(per_token_loss [B,T], mask [B,T], **hp) -> scalar``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

Metrics = dict[str, torch.Tensor]
"""Detached 0-dim tensors keyed by a metric name (TRL's names where TRL logs the same thing)."""

F = TypeVar("F", bound=Callable)


def _check_shape(name: str, tensor: torch.Tensor | None, shape: torch.Size) -> None:
    if tensor is not None and tensor.shape != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator or shaper may read (all detached).

    rewards:   [B] float, one scalar reward per response (binary {0,1} in the papers).
    groups:    [B] int64 group id of each response (responses to the same prompt share
               one); ids need not be contiguous or sorted, and groups may be ragged.
    mask:      [B,T] bool or {0,1} float, 1 on valid completion tokens.
    old_logps: [B,T] behaviour-policy token log-probs, or None (XRPO's novelty needs them).
    entropy:   [B,T] next-token entropy, or None (accepted by HAPO's E4, unused).
    """

    rewards: torch.Tensor
    groups: torch.Tensor
    mask: torch.Tensor
    old_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1 or not self.rewards.is_floating_point():
            raise ValueError("rewards must be a 1-D float tensor [B]")
        if self.groups.dim() != 1 or self.groups.is_floating_point():
            raise ValueError("groups must be a 1-D integer tensor [B] of group ids")
        if self.mask.dim() != 2 or self.mask.shape[0] != self.rewards.shape[0]:
            raise ValueError(f"mask must be [B,T] with B={self.rewards.shape[0]}")
        _check_shape("groups", self.groups, self.rewards.shape)
        _check_shape("old_logps", self.old_logps, self.mask.shape)
        _check_shape("entropy", self.entropy, self.mask.shape)


@dataclass(frozen=True)
class ObjectiveInputs:
    """What a per-token surrogate objective reads.

    logps:      [B,T] current-policy token log-probs (differentiable).
    old_logps:  [B,T] behaviour-policy log-probs, detached (``logps.detach()`` when the
                batch is used for a single update, so that the ratio is 1).
    advantages: [B,T] token advantages from an estimator (and shaper).
    mask:       [B,T] bool or {0,1} float, 1 on valid completion tokens.
    ref_logps:  [B,T] reference-policy log-probs, or None (needed when beta != 0).
    entropy:    [B,T] current-policy next-token entropy, or None (needed by HAPO;
                detached inside the objective).
    Padded positions must hold finite values; the loss is zeroed there by the mask.
    """

    logps: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logps.dim() != 2:
            raise ValueError("logps must be [B,T]")
        for name in ("old_logps", "advantages", "mask", "ref_logps", "entropy"):
            _check_shape(name, getattr(self, name), self.logps.shape)


@dataclass(frozen=True)
class EntropyStats:
    """Statistics that define HAPO's normalised entropy h̃ (``docs/algorithms/hapo.md``),
    as 0-dim tensors.

    pivot:     P, the nearest-rank ρ-quantile of ln H over the valid tokens.
    rms:       sqrt(max(mean((ln H − P)²), 1e-8)), the RMS about the pivot.
    pos_scale: max(z⁺) (at least 1e-8): positive z are divided by it.
    neg_scale: |min(z⁻)| (at least 1e-8): negative z are divided by it.

    Saved from one batch, they map another batch's entropies onto the same scale
    (HAPO's adaptive temperature uses the previous step's old-policy statistics).
    """

    pivot: torch.Tensor
    rms: torch.Tensor
    pos_scale: torch.Tensor
    neg_scale: torch.Tensor


def registration(table: dict[str, F], axis: str, name: str) -> Callable[[F], F]:
    """Decorator factory: add ``fn`` to ``table`` under ``name``; a name registers once."""

    def decorator(fn: F) -> F:
        if name in table:
            raise ValueError(f"{axis} '{name}' is already registered")
        table[name] = fn
        return fn

    return decorator


def lookup(table: dict[str, F], axis: str, name: str) -> F:
    """``table[name]``, or a KeyError that lists the valid names."""
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {axis} '{name}'; valid: {', '.join(table)}") from None


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the tokens where ``mask`` is 1 (0 for an empty mask); detached."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    x = x.to(m.dtype)
    return ((x * m).sum() / m.sum().clamp(min=1.0)).detach()
