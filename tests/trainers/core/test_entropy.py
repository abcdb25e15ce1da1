"""HAPO's entropy signal h̃, its saved statistics and the ATS formula.

Worked numbers: Ex 4 of ``docs/algorithms/hapo.md``.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainers.core import (
    adaptive_temperature,
    entropy_signal,
    entropy_stats,
    entropy_z,
    normalized_entropy,
)

F64 = torch.float64
# Spec Ex 4: eight tokens of one response.
H = torch.tensor([[0.01, 0.05, 0.10, 0.30, 0.60, 1.20, 2.00, 3.00]], dtype=F64)
ONES = torch.ones_like(H, dtype=torch.bool)
SIGNED = [-1.0, -0.6962, -0.5654, -0.3581, -0.2272, -0.0964, 0.0, 1.0]


def test_ex4_pivot_and_rms():
    # index round(0.8·7) = round(5.6) = 6 → sorted ln H [6] = ln 2 = 0.6931
    # RMS = sqrt(mean((ln H − ln 2)²)) = 2.6488
    stats = entropy_stats(H, ONES)
    x = [math.log(h) for h in H[0].tolist()]
    rms = math.sqrt(sum((v - math.log(2)) ** 2 for v in x) / 8)
    assert stats.pivot.item() == pytest.approx(math.log(2))
    assert stats.rms.item() == pytest.approx(rms) and round(rms, 4) == 2.6488
    # z⁺ max: (ln 3 − ln 2)/RMS = 0.1531; |z⁻| max: (ln 2 − ln 0.01)/RMS = 2.0003
    assert stats.pos_scale.item() == pytest.approx(math.log(1.5) / rms)
    assert stats.neg_scale.item() == pytest.approx(math.log(200) / rms)


def test_ex4_signed_and_literal_code_h_tilde():
    stats = entropy_stats(H, ONES)
    signed = normalized_entropy(H, stats)
    literal = normalized_entropy(H, stats, literal_code_sign=True)
    assert torch.allclose(signed[0], torch.tensor(SIGNED, dtype=F64), atol=1e-4)
    assert torch.allclose(literal, signed.abs(), atol=1e-12)  # same magnitudes, all ≥ 0
    assert torch.all(literal >= 0)


def test_h_tilde_spans_minus_one_to_one_and_has_the_sign_of_log_entropy_minus_pivot():
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(4, 9, generator=gen, dtype=F64) * 3
    mask = torch.rand(4, 9, generator=gen) > 0.3
    stats = entropy_stats(entropy, mask)
    h = normalized_entropy(entropy, stats)[mask]
    assert h.max().item() == pytest.approx(1.0) and h.min().item() == pytest.approx(-1.0)
    assert torch.equal(torch.sign(h), torch.sign(entropy.log()[mask] - stats.pivot))
    assert (h == 0).sum() >= 1  # the pivot token itself


def test_padding_is_ignored_by_the_statistics():
    gen = torch.Generator().manual_seed(1)
    entropy = torch.rand(3, 7, generator=gen, dtype=F64) + 0.05
    mask = torch.rand(3, 7, generator=gen) > 0.4
    junk = torch.where(mask, entropy, torch.full_like(entropy, 1e6))
    full, valid = (
        entropy_stats(junk, mask),
        entropy_stats(entropy[mask], torch.ones(int(mask.sum()))),
    )
    for field in ("pivot", "rms", "pos_scale", "neg_scale"):
        assert torch.allclose(getattr(full, field), getattr(valid, field))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 11, 12])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.8, 1.0])
def test_pivot_is_the_nearest_rank_quantile_with_pythons_rounding(n, q):
    values = torch.arange(1, n + 1, dtype=F64).flip(0)  # ln H = 1..n, unsorted
    stats = entropy_stats(values.exp(), torch.ones(n), quantile=q)
    assert stats.pivot.item() == pytest.approx(1 + round(q * (n - 1)))  # round(2.5) = 2


def test_saved_statistics_map_another_batch_onto_the_same_scale():
    stats = entropy_stats(H, ONES)
    later = torch.tensor([0.02, 2.0, 6.0], dtype=F64)
    z = (later.log() - math.log(2)) / stats.rms
    assert torch.allclose(entropy_z(later, stats), z)
    expected = torch.where(z > 0, z / stats.pos_scale, z / stats.neg_scale)
    assert torch.allclose(entropy_signal(later, stats), expected)
    assert torch.allclose(entropy_signal(later, stats, kind="z"), z)
    assert entropy_signal(later, stats)[2] > 1  # outside the saved range: ATS clips it
    with pytest.raises(ValueError, match="h_tilde, z"):
        entropy_signal(later, stats, kind="raw")


def test_zero_entropy_is_floored_and_an_empty_mask_gives_zeros():
    stats = entropy_stats(torch.tensor([0.0, 1.0]), torch.ones(2))
    assert torch.isfinite(normalized_entropy(torch.tensor([0.0, 1.0]), stats)).all()
    empty = entropy_stats(torch.rand(2, 3), torch.zeros(2, 3))
    h = normalized_entropy(torch.rand(2, 3), empty)
    assert torch.isfinite(h).all()


def test_signal_is_detached():
    entropy = (H.clone() + 0.0).requires_grad_(True)
    h = normalized_entropy(entropy, entropy_stats(entropy, ONES))
    assert not h.requires_grad


def test_ex4_adaptive_temperature():
    # T = 1·(1 + 0.05·h̃): [0.95, 0.9652, 0.9717, 0.9821, 0.9886, 0.9952, 1, 1.05]
    h = normalized_entropy(H, entropy_stats(H, ONES))
    expected = torch.tensor([0.95, 0.9652, 0.9717, 0.9821, 0.9886, 0.9952, 1.0, 1.05], dtype=F64)
    assert torch.allclose(adaptive_temperature(h)[0], expected, atol=1e-4)


def test_adaptive_temperature_bounds_and_tau_zero():
    signal = torch.linspace(-4, 4, 33)  # raw z goes beyond ±1
    t = adaptive_temperature(signal, base_temperature=0.7, tau=0.1)
    assert t.min().item() == pytest.approx(0.63) and t.max().item() == pytest.approx(0.77)
    assert torch.all(adaptive_temperature(signal, base_temperature=0.7, tau=0.0) == 0.7)
