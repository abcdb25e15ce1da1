"""Per-token clipped surrogate objectives (clipping rules) and the k3 KL term, as a registry.

Formulas: ``docs/algorithms/grpo.md`` and ``docs/algorithms/hapo.md``. With ρ = exp(lp − lo)::

    pg = max(−Â·ρ, −Â·clip(ρ, 1 − e⁻, 1 + e⁺))           PPO clip, asymmetric widths
    pg = min(pg, −c·Â)  where Â < 0                      dual clip (optional), c > 1
    k3 = exp(lr − lp) − (lr − lp) − 1                    ≥ 0, gradient through lp
    ℓ  = (pg + β·k3)·m                                    [B,T], exactly 0 on padding

``ppo_clip`` has constant widths and Â = A; it is TRL 1.16's per-token loss for
``loss_type`` grpo/bnpo/dr_grpo/dapo (token-level importance sampling, no
``delta``, no vLLM importance correction, no ``use_bias_correction_kl``) plus
verl's optional dual clip. ``hapo`` makes the widths per token from the entropy
signal h̃ (Asymmetric Adaptive Clipping) and rescales A (Differential Advantage
Redistribution) before the same clipped term.

Departures and choices:
- HAPO computes h̃ from the entropy passed in, over all valid tokens of the tensor,
  i.e. per micro-batch as the authors' code does, and treats it as a constant
  (detached). The signed h̃ is the default; ``literal_code_sign=True`` reproduces
  the code's sign (see ``trainers.core.entropy``).
- DAR's ratio test and Â carry no gradient (the code runs them under no-grad).
- Clip-fraction metrics follow TRL: low = (ρ < 1 − e⁻) ∧ (A < 0), high =
  (ρ > 1 + e⁺) ∧ (A > 0), with the per-token widths for HAPO; dual = (ρ > c) ∧ (A < 0);
  their token means, and (as TRL) the smallest completion's share of low clipping and
  the largest of high clipping, over this process's non-empty completions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainers.core.entropy import entropy_stats, normalized_entropy
from trainers.core.types import Metrics, ObjectiveInputs, lookup, masked_mean, registration

ObjectiveFn = Callable[..., tuple[torch.Tensor, Metrics]]
Width = float | torch.Tensor

OBJECTIVES: dict[str, ObjectiveFn] = {}


def register_objective(name: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Register ``fn(inp: ObjectiveInputs, *, epsilon_low, epsilon_high, beta, **hp)``."""
    return registration(OBJECTIVES, "objective", name)


def get_objective(name: str) -> ObjectiveFn:
    return lookup(OBJECTIVES, "objective", name)


# ----------------------------------------------------------------------------- shared pieces
def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(d) − d − 1, d = lr − lp.

    Shapes: [B,T] -> [B,T]; ≥ 0, zero iff lp = lr; ∂/∂lp = 1 − exp(d).
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: Width,
    eps_high: Width,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """PPO's clipped policy term (Schulman et al. 2017, arXiv 1707.06347), per token.

    pg = max(−A·ρ, −A·clip(ρ, 1 − e⁻, 1 + e⁺)); with dual clip (Ye et al. 2020,
    arXiv 1912.09729) pg = min(pg, −c·A) where A < 0. Widths are floats or [B,T].
    A clipped token's loss is constant in ρ, so it has zero gradient.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to turn it off); got {dual_clip}")
    low = 1.0 - eps_low
    high = 1.0 + eps_high
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        low = torch.as_tensor(low, dtype=ratio.dtype, device=ratio.device).expand_as(ratio)
        high = torch.as_tensor(high, dtype=ratio.dtype, device=ratio.device).expand_as(ratio)
    pg = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, low, high))
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -dual_clip * advantages), pg)
    return pg


def _finish(
    inp: ObjectiveInputs,
    pg: torch.Tensor,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: Width,
    eps_high: Width,
    beta: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, Metrics]:
    """Add β·k3, zero the padding, and measure the clip fractions and KL."""
    metrics: Metrics = {}
    if inp.ref_logps is not None:
        kl = k3_kl(inp.logps, inp.ref_logps)
        metrics["kl"] = masked_mean(kl, inp.mask)
        if beta != 0.0:
            pg = pg + beta * kl
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ObjectiveInputs.ref_logps")
    r = ratio.detach()
    low = (r < 1.0 - eps_low) & (advantages < 0)
    high = (r > 1.0 + eps_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(low, inp.mask)
    metrics["clip_ratio/high_mean"] = masked_mean(high, inp.mask)
    metrics["clip_ratio/region_mean"] = masked_mean(low | high, inp.mask)
    m = inp.mask.float()
    rows = m.sum(1) > 0
    if bool(rows.any()):  # TRL's too: the most clipped completion's share, each way
        metrics["clip_ratio/low_min"] = _row_means(low, m)[rows].min()
        metrics["clip_ratio/high_max"] = _row_means(high, m)[rows].max()
    if dual_clip is not None:
        metrics["clip_ratio/dual_mean"] = masked_mean((r > dual_clip) & (advantages < 0), inp.mask)
    return pg * inp.mask.to(pg.dtype), metrics


def _row_means(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B]: each row's mean of ``x`` over its valid tokens; detached."""
    return ((x.float() * m).sum(1) / m.sum(1).clamp(min=1.0)).detach()


# ----------------------------------------------------------------------------- objectives
@register_objective("ppo_clip")
def ppo_clip(
    inp: ObjectiveInputs,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Asymmetric PPO clip + k3 KL (GRPO, DAPO's clip-higher arXiv 2503.14476, NGRPO).

    ℓ = (max(−A·ρ, −A·clip(ρ, 1 − ε⁻, 1 + ε⁺)) + β·k3)·m, optional dual clip c.
    Shapes: all [B,T] -> per-token loss [B,T]. Defaults are TRL's (0.2/0.2, β = 0, no
    dual clip); ε⁻ = ε⁺ is symmetric PPO.
    """
    ratio = torch.exp(inp.logps - inp.old_logps)
    a = inp.advantages
    pg = clipped_surrogate(ratio, a, epsilon_low, epsilon_high, dual_clip)
    return _finish(inp, pg, ratio, a, epsilon_low, epsilon_high, beta, dual_clip)


def adaptive_clip_widths(
    h: torch.Tensor, epsilon_low: float, epsilon_high: float, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """HAPO Asymmetric Adaptive Clipping (Eq. 12–13): per-token widths from h̃ [B,T].

    e⁻ = ε_L·(1 − α·h̃) where h̃ ≤ 0, else ε_L;   e⁺ = ε_R·(1 + α·h̃) where h̃ > 0, else ε_R.
    Low-entropy tokens may fall further, high-entropy tokens rise further; h̃ = 0
    (the pivot quantile of ln H) and α = 0 give the base widths.
    """
    e_low = torch.where(h <= 0, epsilon_low * (1.0 - alpha * h), epsilon_low)
    e_high = torch.where(h > 0, epsilon_high * (1.0 + alpha * h), epsilon_high)
    return e_low, e_high


@torch.no_grad()
def redistribute_advantages(
    advantages: torch.Tensor,
    h: torch.Tensor,
    ratio: torch.Tensor,
    e_low: torch.Tensor,
    e_high: torch.Tensor,
    beta_adv: float = 1.0,
) -> torch.Tensor:
    """HAPO Differential Advantage Redistribution (Eq. 10–11), no gradient; all [B,T].

    inside = (1 − e⁻/2) < ρ < (1 + e⁺/2);  Â = A·(1 + β_A·h̃) where
    (h̃ > 0 ∧ ¬inside) ∨ (h̃ ≤ 0 ∧ inside), else Â = A. For β_A ≤ 1 (signed h̃) the
    sign of A is kept and |Â| ≤ 2|A|; a low-entropy token with h̃ = −1 inside gets 0.
    """
    inside = (ratio > 1.0 - e_low / 2) & (ratio < 1.0 + e_high / 2)
    scaled = (h > 0) ^ inside
    return torch.where(scaled, advantages * (1.0 + beta_adv * h), advantages)


@register_objective("hapo")
def hapo(
    inp: ObjectiveInputs,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    beta: float = 0.0,
    alpha: float = 1.0,
    beta_adv: float = 1.0,
    dual_clip: float | None = 10.0,
    pivot_quantile: float = 0.8,
    literal_code_sign: bool = False,
) -> tuple[torch.Tensor, Metrics]:
    """HAPO's objective (arXiv 2509.16591 Eq. 10–13; authors' ``core_algos.py``).

    h̃ from ``inp.entropy`` over the valid tokens (``trainers.core.entropy``), then
    AAC widths e⁻, e⁺ (α), then DAR Â (β_A), then the clipped term with dual clip c:
        ℓ = (max(−Â·ρ, −Â·clip(ρ, 1 − e⁻, 1 + e⁺)) [min −c·Â if Â < 0] + β·k3)·m
    Shapes: all [B,T] -> [B,T]. Defaults: ε 0.2/0.28 (paper; the recipe uses 0.2/0.2),
    α = β_A = 1, c = 10, ρ_pivot = 0.8, β = 0.
    """
    if inp.entropy is None:
        raise ValueError("the hapo objective needs ObjectiveInputs.entropy")
    stats = entropy_stats(inp.entropy, inp.mask, quantile=pivot_quantile)
    h = normalized_entropy(inp.entropy, stats, literal_code_sign=literal_code_sign)
    h = h.to(inp.logps.dtype)
    e_low, e_high = adaptive_clip_widths(h, epsilon_low, epsilon_high, alpha)
    ratio = torch.exp(inp.logps - inp.old_logps)
    a_hat = redistribute_advantages(inp.advantages, h, ratio.detach(), e_low, e_high, beta_adv)
    pg = clipped_surrogate(ratio, a_hat, e_low, e_high, dual_clip)
    loss, metrics = _finish(inp, pg, ratio, a_hat, e_low, e_high, beta, dual_clip)
    metrics["hapo/eps_low_mean"] = masked_mean(e_low, inp.mask)
    metrics["hapo/eps_high_mean"] = masked_mean(e_high, inp.mask)
    metrics["hapo/redistributed_frac"] = masked_mean(a_hat != inp.advantages, inp.mask)
    metrics["hapo/entropy_pivot"] = stats.pivot.detach()
    metrics["hapo/entropy_rms"] = stats.rms.detach()
    return loss, metrics
