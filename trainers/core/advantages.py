"""Advantage estimators (a normaliser per prompt group) and shapers, as registries.

Formulas: ``docs/algorithms/grpo.md`` (E1, E2), ``ngrpo.md`` (E3), ``hapo.md`` (E4),
``xrpo.md`` (E5), all under ``docs/algorithms/``. Every estimator maps
``AdvantageInputs`` (rewards [B], group ids [B], mask [B,T], ...) to token
advantages A [B,T], exactly 0 where the mask is 0, plus a metrics dict; every
shaper maps (inputs, A) to A'. Groups are found from the ids, so they may be
ragged and unordered; all group statistics are vectorised with ``index_add``.

==========  ===================================================  ==================
name        formula (per group g)                                source
==========  ===================================================  ==================
grpo        (r − μ_g)/(σ_g + δ), σ unbiased, δ = 1e-4             DeepSeekMath; TRL
dr_grpo     r − μ_g                                               Dr.GRPO; TRL
ngrpo       (r − μ′)/(σ′ + 1e-6) over r ∪ {k × r_max}             NGRPO code
hapo        token-weighted (r − μ_tok)/(σ_tok + 1e-6), guard→E1   HAPO code
==========  ===================================================  ==================

Departures and choices:
- A group of one response has σ = 0 and so A = 0 for ``grpo`` and ``hapo`` (TRL's
  arithmetic); ``ngrpo`` follows its authors' verl code there, μ = 0 and σ = 1, so A = r.
- ``grpo``'s ``scale`` mirrors TRL's ``scale_rewards``: "batch" divides by the
  unbiased std of all B rewards (the mean stays per group), "none" is Dr.GRPO.
- HAPO's |A| ≥ 5 guard (code only, not in the paper) looks at the group's members
  that have at least one valid token; empty responses carry no loss.
- XRPO's novelty bonus (all forms third-party, ``docs/algorithms/xrpo.md``): s_i is the
  mean old-policy token log-prob (our choice), s̄ the mean of s_i over the group's non-empty members,
  and "correct" means r_i ≥ ``correct_threshold`` (default 0.5, i.e. r_i = 1 for
  binary rewards). The cap is κ·max(A, 0), so the bonus is never negative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from trainers.core.types import AdvantageInputs, Metrics, lookup, registration

AdvantageFn = Callable[..., tuple[torch.Tensor, Metrics]]
ShaperFn = Callable[..., tuple[torch.Tensor, Metrics]]

ADVANTAGES: dict[str, AdvantageFn] = {}
SHAPERS: dict[str, ShaperFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an estimator ``fn(inp: AdvantageInputs, **hp) -> (A [B,T], metrics)``."""
    return registration(ADVANTAGES, "advantage estimator", name)


def register_shaper(name: str) -> Callable[[ShaperFn], ShaperFn]:
    """Register a shaper ``fn(inp: AdvantageInputs, A [B,T], **hp) -> (A' [B,T], metrics)``."""
    return registration(SHAPERS, "advantage shaper", name)


def get_advantage(name: str) -> AdvantageFn:
    return lookup(ADVANTAGES, "advantage estimator", name)


def get_shaper(name: str) -> ShaperFn:
    return lookup(SHAPERS, "advantage shaper", name)


# ----------------------------------------------------------------------------- group helpers
class _Groups:
    """Group index of a batch: ``index`` [B] in 0..G−1, and per-group sums."""

    def __init__(self, groups: torch.Tensor):
        ids, self.index = torch.unique(groups, return_inverse=True)
        self.count = ids.numel()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[B] -> [G]: the sum of ``x`` over each group's members."""
        return x.new_zeros(self.count).index_add_(0, self.index, x)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[G] -> [B]: each response gets its group's value."""
        return x[self.index]

    def mean_std(self, r: torch.Tensor, weight: torch.Tensor | None = None):
        """Per-response group mean and std [B] of ``r``, optionally ``weight``-ed (population).

        Unweighted: the unbiased (Bessel) std, 0 for a group of one.
        Weighted: μ = Σwr/Σw, σ² = Σw(r−μ)²/Σw (the token-level form of HAPO's E4).
        """
        w = torch.ones_like(r) if weight is None else weight
        total = self.sum(w)
        mean = self.spread(self.sum(w * r) / total.clamp(min=1e-12))
        sq = self.spread(self.sum(w * (r - mean) ** 2))
        denom = self.spread(total - 1 if weight is None else total)
        std = torch.sqrt(torch.where(denom > 0, sq / denom.clamp(min=1e-12), 0.0))
        return mean, std


def _tokens(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sequence advantages -> [B,T], zero on padding."""
    return a.unsqueeze(1) * mask.to(a.dtype)


def _zero_std_frac(std: torch.Tensor) -> torch.Tensor:
    """TRL's ``frac_reward_zero_std``: share of responses whose group has zero reward std."""
    return torch.isclose(std, torch.zeros_like(std)).float().mean().detach()


def _z_score(inp: AdvantageInputs, delta: float, scale: str) -> tuple[torch.Tensor, Metrics]:
    """E1 per response [B]: (r − μ_g)/(σ + δ) with σ per ``scale`` (TRL's scale_rewards)."""
    r = inp.rewards
    groups = _Groups(inp.groups)
    mean, std = groups.mean_std(r)
    if scale == "group":
        a = (r - mean) / (std + delta)
    elif scale == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        a = (r - mean) / (batch_std + delta)
    elif scale == "none":
        a = r - mean
    else:
        raise ValueError(f"unknown scale '{scale}'; valid: group, batch, none")
    return a, {"frac_reward_zero_std": _zero_std_frac(std)}


# ----------------------------------------------------------------------------- estimators
@register_advantage("grpo")
def grpo(
    inp: AdvantageInputs,
    *,
    delta: float = 1e-4,
    scale: Literal["group", "batch", "none"] = "group",
) -> tuple[torch.Tensor, Metrics]:
    """E1, group z-score (DeepSeekMath, arXiv 2402.03300; TRL ``scale_rewards``).

    A_{i,t} = m_{i,t} · (r_i − μ_g)/(σ + δ), σ the unbiased std of group g
    ("group"), of the whole batch ("batch"), or no division ("none").
    Shapes: rewards [B], groups [B], mask [B,T] -> A [B,T]. δ = 1e-4 as TRL (verl 1e-6).
    """
    a, metrics = _z_score(inp, delta, scale)
    return _tokens(a, inp.mask), metrics


@register_advantage("dr_grpo")
def dr_grpo(inp: AdvantageInputs) -> tuple[torch.Tensor, Metrics]:
    """E2, centred rewards (Dr.GRPO, arXiv 2503.20783): A_{i,t} = m_{i,t} · (r_i − μ_g).

    Shapes: rewards [B], groups [B], mask [B,T] -> A [B,T].
    """
    a, metrics = _z_score(inp, 0.0, "none")
    return _tokens(a, inp.mask), metrics


@register_advantage("ngrpo")
def ngrpo(
    inp: AdvantageInputs, *, r_max: float = 1.0, n_virtual: int = 1, delta: float = 1e-6
) -> tuple[torch.Tensor, Metrics]:
    """E3, virtual-max calibration (NGRPO, arXiv 2509.18851; authors' ``core_algos.py``).

    μ′, σ′ = mean and unbiased std of {r_j : j ∈ g} ∪ {k copies of r_max}, k = n_virtual;
    A_{i,t} = m_{i,t} · (r_i − μ′)/(σ′ + δ). An all-wrong group gets equal negative
    advantages −μ′/σ′; an all-r_max group gets 0; k = 0 is E1 with the same δ. A group
    of one gets A = r (the authors' verl code: μ = 0, σ = 1 for a lone response).
    Shapes: rewards [B], groups [B], mask [B,T] -> A [B,T].
    """
    if n_virtual < 0:
        raise ValueError(f"n_virtual must be >= 0; got {n_virtual}")
    r = inp.rewards
    groups = _Groups(inp.groups)
    n = groups.sum(torch.ones_like(r))
    mean = (groups.sum(r) + n_virtual * r_max) / (n + n_virtual)
    sq = groups.sum((r - groups.spread(mean)) ** 2) + n_virtual * (r_max - mean) ** 2
    dof = n + n_virtual - 1
    std = torch.sqrt(torch.where(dof > 0, sq / dof.clamp(min=1), 0.0))
    a = (r - groups.spread(mean)) / (groups.spread(std) + delta)
    a = torch.where(groups.spread(n) == 1, r, a)
    _, raw_std = groups.mean_std(r)
    return _tokens(a, inp.mask), {"frac_reward_zero_std": _zero_std_frac(raw_std)}


@register_advantage("hapo")
def hapo(
    inp: AdvantageInputs, *, delta: float = 1e-6, fallback_threshold: float = 5.0
) -> tuple[torch.Tensor, Metrics]:
    """E4, token-level group average (HAPO, arXiv 2509.16591; authors' ``core_algos.py``).

    With L_i = Σ_t m_{i,t}, per group:
        μ_tok = Σ L_i r_i / Σ L_i,   σ_tok = sqrt(Σ L_i (r_i − μ_tok)² / Σ L_i)
        A_{i,t} = m_{i,t} · (r_i − μ_tok)/(σ_tok + δ)
    so Σ_{i,t ∈ g} m·A = 0. If any non-empty member has |A| ≥ fallback_threshold the
    group falls back to E1 with the same δ (code-only guard; ``inf`` turns it off).
    ``inp.entropy`` is accepted and unused. Shapes: rewards [B], mask [B,T] -> A [B,T].
    """
    r = inp.rewards
    lengths = inp.mask.to(r.dtype).sum(1)
    groups = _Groups(inp.groups)
    mean, std = groups.mean_std(r, weight=lengths)
    a = (r - mean) / (std + delta)
    extreme = ((a.abs() >= fallback_threshold) & (lengths > 0)).to(r.dtype)
    fired = groups.sum(extreme) > 0
    e1_mean, e1_std = groups.mean_std(r)
    a = torch.where(groups.spread(fired), (r - e1_mean) / (e1_std + delta), a)
    metrics = {
        "frac_reward_zero_std": _zero_std_frac(e1_std),
        "hapo/fallback_group_frac": fired.float().mean().detach(),
    }
    return _tokens(a, inp.mask), metrics


# ----------------------------------------------------------------------------- shapers
@register_shaper("none")
def no_shaping(inp: AdvantageInputs, advantages: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Identity: A' = A."""
    return advantages, {}


@register_shaper("xrpo_novelty")
def xrpo_novelty(
    inp: AdvantageInputs,
    advantages: torch.Tensor,
    *,
    lambda_novelty: float = 2.5,
    kappa_clip: float = 0.5,
    correct_threshold: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """E5, novelty sharpening (XRPO, arXiv 2510.06672; formulas third-party, see
    ``docs/algorithms/xrpo.md``).

    s_i = Σ_t m·lo / L_i (mean old-policy token log-prob), s̄ = group mean of s_i,
    η_i = exp(s_i − s̄), and for correct responses (r_i ≥ correct_threshold):
        A⁺_{i,t} = A_{i,t} + min( max(λ·(1 − η_i), 0), κ·max(A_{i,t}, 0) )
    Wrong responses and those with s_i ≥ s̄ are unchanged; λ = 0 or κ = 0 is the
    identity. Shapes: old_logps [B,T], mask [B,T], advantages [B,T] -> [B,T].
    """
    if inp.old_logps is None:
        raise ValueError("xrpo_novelty needs AdvantageInputs.old_logps")
    m = inp.mask.to(advantages.dtype)
    lengths = m.sum(1)
    nonempty = (lengths > 0).to(m.dtype)
    s = (inp.old_logps.detach().to(m.dtype) * m).sum(1) / lengths.clamp(min=1)
    groups = _Groups(inp.groups)
    s_bar = groups.sum(s * nonempty) / groups.sum(nonempty).clamp(min=1)
    eta = torch.exp(s - groups.spread(s_bar))
    correct = (inp.rewards >= correct_threshold) & (lengths > 0)
    bonus = torch.where(correct, (lambda_novelty * (1.0 - eta)).clamp(min=0), 0.0)
    token_bonus = torch.minimum(bonus.unsqueeze(1), kappa_clip * advantages.clamp(min=0)) * m
    metrics = {
        "xrpo/bonus_mean": ((token_bonus.sum(1) / lengths.clamp(min=1)).mean()).detach(),
        "xrpo/bonus_frac": (bonus > 0).float().mean().detach(),
    }
    return advantages + token_bonus, metrics
