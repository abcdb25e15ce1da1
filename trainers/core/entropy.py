"""HAPO's normalised token entropy h̃, its saved statistics, and the ATS temperature formula.

Paper: HAPO, arXiv 2509.16591, Eq. 5–6 (signal) and §S3 (adaptive temperature);
authors' code ``compute_entropy_h``. Formulas and worked example: ``docs/algorithms/hapo.md``.

Over the valid tokens of one tensor (one micro-batch in the loss, as the code does)::

    x  = ln(max(H, 1e-8))
    P  = sorted(x)[round(ρ·(n−1))]                      nearest rank, ρ = 0.8, ties to even
    z  = (x − P) / sqrt(max(mean((x − P)²), 1e-8))      RMS about P, not about the mean
    h̃ = z / max(z⁺)  if z > 0,   z / |min(z⁻)|  if z ≤ 0        → h̃ ∈ [−1, 1], h̃(P) = 0

``entropy_stats`` computes (P, RMS, max z⁺, |min z⁻|) as an ``EntropyStats``;
``entropy_signal`` applies saved statistics to any entropy tensor, so the loss
(statistics of the same micro-batch) and the temperature rule (statistics of the
previous step's old-policy entropies) share one implementation.

Departures and choices:
- Sign for z ≤ 0: the code divides by min(z⁻) < 0, so low-entropy tokens get
  h̃ ≥ 0, contradicting the paper's stated range and its h̃ ≤ 0 branches. We use
  the signed form; ``literal_code_sign=True`` reproduces the code.
- ATS signal: the code uses h̃ with τ = 0.05; the paper writes raw z with τ = 0.1.
  ``entropy_signal(kind="h_tilde" | "z")`` selects; the default is the code's.
- Everything here runs without a host sync (the quantile index is a tensor).
"""

from __future__ import annotations

from typing import Literal

import torch

from trainers.core.types import EntropyStats

FLOOR = 1e-8
SIGNALS: tuple[str, ...] = ("h_tilde", "z")


def _log_entropy(entropy: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    return torch.log(entropy.detach().to(dtype).clamp(min=FLOOR))


def entropy_stats(
    entropy: torch.Tensor, mask: torch.Tensor, *, quantile: float = 0.8
) -> EntropyStats:
    """Statistics of ln H over the valid tokens of ``entropy`` (HAPO Eq. 5–6,
    ``docs/algorithms/hapo.md``).

    entropy: [...] next-token entropies (any shape; detached here).
    mask:    same shape, 1 on the tokens that count.
    quantile: ρ of the pivot, a nearest-rank quantile at index round(ρ·(n−1)).
    An empty mask gives P = 0, RMS = 1e-4 and scales 1e-8 (every h̃ then is 0).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1]; got {quantile}")
    valid = mask.bool()
    x = _log_entropy(entropy)
    n = valid.sum()
    # Invalid tokens sort last as +inf, so the n valid values lead the sorted vector.
    ordered = torch.where(valid, x, torch.full_like(x, float("inf"))).flatten().sort().values
    index = torch.round(quantile * (n - 1).to(torch.float64)).long().clamp(min=0)
    pivot = ordered.gather(0, index.view(1)).squeeze(0)
    pivot = torch.where(n > 0, pivot, torch.zeros_like(pivot))
    dev = torch.where(valid, x - pivot, torch.zeros_like(x))
    rms = torch.sqrt(((dev**2).sum() / n.clamp(min=1)).clamp(min=FLOOR))
    z = dev / rms
    pos_scale = z.clamp(min=0).amax().clamp(min=FLOOR)
    neg_scale = (-z).clamp(min=0).amax().clamp(min=FLOOR)
    return EntropyStats(pivot=pivot, rms=rms, pos_scale=pos_scale, neg_scale=neg_scale)


def entropy_z(entropy: torch.Tensor, stats: EntropyStats) -> torch.Tensor:
    """Raw standardised log-entropy z = (ln H − P)/RMS, same shape as ``entropy``; detached."""
    return (_log_entropy(entropy) - stats.pivot) / stats.rms


def normalized_entropy(
    entropy: torch.Tensor, stats: EntropyStats, *, literal_code_sign: bool = False
) -> torch.Tensor:
    """HAPO's h̃, same shape as ``entropy``; detached.

    h̃ = z / max(z⁺) for z > 0 and z / |min(z⁻)| for z ≤ 0, so h̃ ∈ [−1, 1] on the
    tokens the statistics came from (other tokens may fall outside; ATS clips).
    literal_code_sign: divide z ≤ 0 by min(z⁻) as the authors' code does (h̃ ≥ 0).
    """
    z = entropy_z(entropy, stats)
    neg_scale = -stats.neg_scale if literal_code_sign else stats.neg_scale
    return torch.where(z > 0, z / stats.pos_scale, z / neg_scale)


def entropy_signal(
    entropy: torch.Tensor,
    stats: EntropyStats,
    *,
    kind: Literal["h_tilde", "z"] = "h_tilde",
    literal_code_sign: bool = False,
) -> torch.Tensor:
    """The per-token entropy signal ATS reads: h̃ (code) or raw z (paper); detached."""
    if kind == "h_tilde":
        return normalized_entropy(entropy, stats, literal_code_sign=literal_code_sign)
    if kind == "z":
        return entropy_z(entropy, stats)
    raise ValueError(f"unknown entropy signal '{kind}'; valid: {', '.join(SIGNALS)}")


def adaptive_temperature(
    signal: torch.Tensor, *, base_temperature: float = 1.0, tau: float = 0.05
) -> torch.Tensor:
    """HAPO Adaptive Temperature Sampling: T = T_base·(1 + τ·clip(signal, −1, 1)).

    signal: [...] from ``entropy_signal`` (statistics of the previous step's
    old-policy entropies, taken on the untempered logits). Returns T, same shape,
    in [T_base(1−τ), T_base(1+τ)]. Defaults are the code's (τ = 0.05; paper 0.1).
    """
    return base_temperature * (1.0 + tau * signal.clamp(-1.0, 1.0))
