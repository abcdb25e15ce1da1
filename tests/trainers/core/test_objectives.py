"""Clipped objectives and k3: Ex 2 and Ex 4 by hand, the invariants, gradients, TRL.

Worked numbers: ``docs/algorithms/grpo.md`` (Ex 2) and ``docs/algorithms/hapo.md`` (Ex 4).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from trainers.contract.methods.grpo import OBJECTIVE_NAMES
from trainers.core import (
    OBJECTIVES,
    ObjectiveInputs,
    adaptive_clip_widths,
    entropy_stats,
    get_objective,
    k3_kl,
    normalized_entropy,
    redistribute_advantages,
)

F64 = torch.float64
ppo_clip, hapo = get_objective("ppo_clip"), get_objective("hapo")


def inputs(ratio, adv, mask=None, logps=None, ref=None, entropy=None) -> ObjectiveInputs:
    """Differentiable logps (leaf) and old_logps = logps − ln ρ, so exp(lp − lo) = ρ."""
    ratio = torch.as_tensor(ratio, dtype=F64)
    logps = torch.full_like(ratio, -1.0) if logps is None else torch.as_tensor(logps, dtype=F64)
    logps = logps.clone().requires_grad_(True)
    mask = torch.ones_like(ratio, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    return ObjectiveInputs(
        logps=logps,
        old_logps=(logps - ratio.log()).detach(),
        advantages=torch.as_tensor(adv, dtype=F64).expand_as(ratio).clone(),
        mask=mask,
        ref_logps=None if ref is None else torch.as_tensor(ref, dtype=F64),
        entropy=None if entropy is None else torch.as_tensor(entropy, dtype=F64),
    )


def grad_of(loss: torch.Tensor, inp: ObjectiveInputs) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss.sum(), inp.logps)
    return g


# Spec Ex 2 (padding holds junk advantages that the mask must remove).
EX2 = dict(
    ratio=[[1.10, 1.40, 1.0, 1.0], [0.70, 0.95, 1.00, 1.0]],
    adv=[[0.866, 0.866, 5.0, 5.0], [-0.866, -0.866, -0.866, 5.0]],
    mask=[[1, 1, 0, 0], [1, 1, 1, 0]],
    logps=[[-0.5, -1.0, 0, 0], [-2.0, -0.3, -0.1, 0]],
    ref=[[-0.6, -1.0, 0, 0], [-1.5, -0.3, -0.2, 0]],
)


def test_registry_keys_are_the_names_the_api_accepts():
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES
    with pytest.raises(KeyError, match="ppo_clip, hapo"):
        get_objective("grpo")


# ----------------------------------------------------------------------------- Ex 2 by hand
def test_ex2_policy_term_kl_and_total():
    # pg: 1.10 inside → −0.866·1.10 = −0.9526; 1.40 > 1.28 → −0.866·1.28 = −1.1085
    #     0.70 < 0.80 with A < 0 → max(0.866·0.70, 0.866·0.80) = 0.6928; 0.8227; 0.866
    # k3: d = −0.1 → e^{−0.1} + 0.1 − 1 = 0.0048; d = 0.5 → e^{0.5} − 1.5 = 0.1487; d = 0 → 0
    inp = inputs(**EX2)
    pg = [[-0.866 * 1.10, -0.866 * 1.28, 0, 0], [0.866 * 0.8, 0.866 * 0.95, 0.866, 0]]
    k3 = [[math.exp(-0.1) - 0.9, 0, 0, 0], [math.exp(0.5) - 1.5, 0, math.exp(-0.1) - 0.9, 0]]
    loss, metrics = ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
    expected = torch.tensor(pg, dtype=F64) + 0.04 * torch.tensor(k3, dtype=F64)
    assert torch.allclose(loss, expected, atol=1e-12)
    rounded = [[-0.9524, -1.1085, 0, 0], [0.6987, 0.8227, 0.8662, 0]]
    assert torch.allclose(loss, torch.tensor(rounded, dtype=F64), atol=1e-4)
    # one of five tokens clipped low (0.70 with A < 0), one high (1.40 with A > 0)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.2)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.2)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.4)
    assert metrics["kl"].item() == pytest.approx(
        (2 * (math.exp(-0.1) - 0.9) + math.exp(0.5) - 1.5) / 5
    )


def test_ex2_symmetric_clip_caps_the_token_at_1_2():
    # −0.866·1.2 = −1.0392; ε⁻ = ε⁺ is symmetric PPO
    loss, _ = ppo_clip(inputs([[1.40]], [[0.866]]), epsilon_low=0.2, epsilon_high=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.0392, abs=1e-4)


# ----------------------------------------------------------------------------- TRL parity
def trl_per_token_loss(lp, old, ref, adv, eps_low, eps_high, beta):
    """TRL 1.16 ``GRPOTrainer._compute_loss``, loss_type in grpo/bnpo/dr_grpo/dapo, transcribed."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    return per_token_loss


def test_the_transcribed_lines_are_still_trls():
    spec = importlib.util.find_spec("trl")
    source = (Path(spec.origin).parent / "trainer" / "grpo_trainer.py").read_text()
    for line in (
        "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",
        "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)",
        "torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_",
    ):
        assert line in source


@pytest.mark.parametrize(("eps_low", "eps_high", "beta"), [(0.2, 0.2, 0.0), (0.2, 0.28, 0.04)])
def test_ppo_clip_matches_trls_per_token_loss_and_gradient(eps_low, eps_high, beta):
    gen = torch.Generator().manual_seed(0)
    ratio = torch.exp(torch.randn(6, 9, generator=gen, dtype=F64) * 0.3)
    adv = torch.randn(6, 1, generator=gen, dtype=F64).expand(6, 9)
    logps = -torch.rand(6, 9, generator=gen, dtype=F64) * 3
    ref = logps + torch.randn(6, 9, generator=gen, dtype=F64) * 0.2
    mask = torch.rand(6, 9, generator=gen) > 0.2
    inp = inputs(ratio, adv, mask, logps, ref)
    ours, _ = ppo_clip(inp, epsilon_low=eps_low, epsilon_high=eps_high, beta=beta)
    theirs = trl_per_token_loss(inp.logps, inp.old_logps, ref, adv, eps_low, eps_high, beta) * mask
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert torch.allclose(grad_of(ours, inp), grad_of(theirs, inp), atol=1e-12)


# ----------------------------------------------------------------------------- invariants
def test_on_policy_with_reference_equal_is_minus_advantage():
    adv = torch.tensor([[0.7, 0.7, 0.0], [-1.2, -1.2, -1.2]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    inp = inputs(torch.ones(2, 3), adv, mask, ref=torch.full((2, 3), -1.0))
    loss, metrics = ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.1)
    assert torch.allclose(loss, -adv * mask)
    assert metrics["kl"] == 0


def test_k3_is_nonnegative_zero_only_at_equality_and_has_the_stated_gradient():
    lp = torch.linspace(-3, 0, 31, dtype=F64).requires_grad_(True)
    ref = torch.full_like(lp, -1.5)
    k3 = k3_kl(lp, ref)
    assert torch.all(k3 >= 0)
    assert torch.equal(k3 == 0, lp.detach() == ref)
    (g,) = torch.autograd.grad(k3.sum(), lp)
    assert torch.allclose(g, 1 - torch.exp(ref - lp.detach()))


def test_clipped_tokens_have_the_capped_loss_and_zero_gradient():
    # A > 0, ρ = 1.5 > 1.28: ℓ = −1.28·A;  A < 0, ρ = 0.5 < 0.8: ℓ = −0.8·A
    # unclipped ρ = 1.1: ℓ = −A·ρ, ∂ℓ/∂lp = −A·ρ
    ratio = [[1.5, 0.5, 1.1]]
    adv = [[2.0, -3.0, 2.0]]
    inp = inputs(ratio, adv)
    loss, _ = ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
    assert torch.allclose(loss, torch.tensor([[-2.56, 2.4, -2.2]], dtype=F64))
    assert torch.allclose(grad_of(loss, inp), torch.tensor([[0.0, 0.0, -2.2]], dtype=F64))


def test_dual_clip_caps_negative_advantages_at_c_with_zero_gradient():
    # A = −1, ρ = 5 > c = 3: ℓ = min(5, 3) = 3, constant; ρ = 2 < c: ℓ = 2, ∂ℓ/∂lp = 2
    inp = inputs([[5.0, 2.0, 5.0]], [[-1.0, -1.0, 1.0]])
    loss, metrics = ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, dual_clip=3.0)
    assert torch.allclose(loss, torch.tensor([[3.0, 2.0, -1.2]], dtype=F64))
    assert torch.allclose(grad_of(loss, inp), torch.tensor([[0.0, 2.0, 0.0]], dtype=F64))
    assert metrics["clip_ratio/dual_mean"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.2, beta=0.0, dual_clip=1.0)


def test_padding_gets_zero_loss_and_zero_gradient():
    inp = inputs(**EX2)
    loss, _ = ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
    pad = ~inp.mask.bool()
    assert torch.all(loss[pad] == 0) and torch.all(grad_of(loss, inp)[pad] == 0)


def test_missing_inputs_are_refused():
    with pytest.raises(ValueError, match="ref_logps"):
        ppo_clip(inputs([[1.0]], [[1.0]]), epsilon_low=0.2, epsilon_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        hapo(inputs([[1.0]], [[1.0]]), epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
    with pytest.raises(ValueError, match="advantages"):
        ObjectiveInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3))


# ----------------------------------------------------------------------------- HAPO, Ex 4
H = [[0.01, 0.05, 0.10, 0.30, 0.60, 1.20, 2.00, 3.00]]
RHO = [[1.00, 0.85, 1.02, 1.30, 0.98, 1.00, 1.20, 0.97]]
A_HAT = [0.0, 0.3038, 0.4346, 1.0, 0.7728, 0.9036, 1.0, 1.0]
LOSS = [0.0, -0.2582, -0.4433, -1.28, -0.7573, -0.9036, -1.2, -0.97]


def test_ex4_hapo_widths():
    # e⁻ = 0.2·(1 − h̃) for h̃ ≤ 0: [0.4, 0.3392, 0.3131, 0.2716, 0.2454, 0.2193, 0.2, 0.2]
    # e⁺ = 0.28 except the last token (h̃ = 1): 0.28·2 = 0.56
    h = normalized_entropy(torch.tensor(H), entropy_stats(torch.tensor(H), torch.ones(1, 8)))
    e_low, e_high = adaptive_clip_widths(h, 0.2, 0.28, alpha=1.0)
    low = [0.4, 0.3392, 0.3131, 0.2716, 0.2454, 0.2193, 0.2, 0.2]
    assert torch.allclose(e_low[0], torch.tensor(low), atol=1e-4)
    assert torch.allclose(e_high[0], torch.tensor([0.28] * 7 + [0.56]), atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ex4_hapo_redistributed_advantage_and_token_loss(sign):
    # Token 2: h̃ = −0.6962, e⁻ = 0.3392; inside since 0.8304 < 0.85 < 1.14 → Â = 1 − 0.6962
    #   = 0.3038, ℓ = −0.3038·0.85 = −0.2582. Token 4: ρ = 1.30 ≥ 1.14, h̃ < 0 → Â = A,
    #   ℓ = −1.28 (clipped; for A = −1, +1.30 unclipped). Token 8: h̃ = 1, e⁺ = 0.56,
    #   inside → Â = A, ℓ = −0.97. Token 1: h̃ = −1 inside → Â = 0.
    # A padded second row with extreme entropies must not move the statistics.
    rho = torch.tensor([*RHO, [1.0] * 8], dtype=F64)
    entropy = torch.tensor([*H, [1e-6] * 4 + [50.0] * 4], dtype=F64)
    mask = torch.tensor([[1] * 8, [0] * 8], dtype=torch.bool)
    inp = inputs(rho, sign, mask, entropy=entropy)
    loss, metrics = hapo(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
    expected = torch.tensor(LOSS, dtype=F64) if sign > 0 else -torch.tensor(LOSS, dtype=F64)
    if sign < 0:
        expected[3] = 1.30
    assert torch.allclose(loss[0], expected, atol=1e-4)
    assert torch.all(loss[1] == 0)
    assert metrics["hapo/entropy_pivot"].item() == pytest.approx(math.log(2))
    # Â is a constant: unclipped tokens have ∂ℓ/∂lp = −Â·ρ; the clipped token has none.
    a_hat = sign * torch.tensor(A_HAT, dtype=F64)
    grad = grad_of(loss, inp)[0]
    free = [1, 2, 4, 5, 6, 7] if sign > 0 else [1, 2, 3, 4, 5, 6, 7]
    assert torch.allclose(grad[free], -(a_hat * rho[0])[free], atol=1e-4)
    if sign > 0:
        assert grad[3] == 0


def test_hapo_reduces_to_ppo_clip_without_adaptation():
    gen = torch.Generator().manual_seed(3)
    ratio = torch.exp(torch.randn(4, 6, generator=gen, dtype=F64) * 0.3)
    adv = torch.randn(4, 1, generator=gen, dtype=F64).expand(4, 6)
    entropy = torch.rand(4, 6, generator=gen, dtype=F64) * 2
    inp = inputs(ratio, adv, entropy=entropy)
    ours, _ = hapo(
        inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.0, alpha=0.0, beta_adv=0.0, dual_clip=None
    )
    base, _ = ppo_clip(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
    assert torch.allclose(ours, base, atol=1e-12)


def test_hapo_widths_are_base_at_the_pivot_quantile_not_at_the_mean_entropy():
    entropy = torch.tensor([[0.01, 0.05, 0.10, 0.30, 0.60, 1.20, 2.00, 3.00, 0.9075]], dtype=F64)
    h = normalized_entropy(entropy, entropy_stats(entropy, torch.ones(1, 9)))
    e_low, e_high = adaptive_clip_widths(h, 0.2, 0.28)
    # index round(0.8·8) = 6 of sorted ln H → H = 1.20 (position 5); the last token is the
    # mean entropy, (7.26 + 0.9075)/9 = 0.9075, below the pivot: its e⁻ is widened
    assert (e_low[0, 5].item(), e_high[0, 5].item()) == (0.2, 0.28)
    assert entropy.mean().item() == pytest.approx(0.9075)
    assert e_low[0, 8] > 0.2


def test_hapo_width_and_redistribution_bounds_on_random_tokens():
    gen = torch.Generator().manual_seed(4)
    h = torch.rand(500, generator=gen, dtype=F64) * 2 - 1
    e_low, e_high = adaptive_clip_widths(h, 0.2, 0.28, alpha=1.0)
    assert torch.all((e_low >= 0.2) & (e_low <= 0.4) & (e_high >= 0.28) & (e_high <= 0.56))
    base = adaptive_clip_widths(h, 0.2, 0.28, alpha=0.0)
    assert torch.all(base[0] == 0.2) and torch.all(base[1] == 0.28)
    adv = torch.randn(500, generator=gen, dtype=F64)
    ratio = 1 + torch.randn(500, generator=gen, dtype=F64) * 0.2
    assert torch.equal(redistribute_advantages(adv, h, ratio, e_low, e_high, beta_adv=0.0), adv)
    for beta_adv in (0.5, 1.0):
        a_hat = redistribute_advantages(adv, h, ratio, e_low, e_high, beta_adv=beta_adv)
        assert torch.all(a_hat * adv >= 0) and torch.all(a_hat.abs() <= 2 * adv.abs())


def test_hapo_entropy_and_redistribution_carry_no_gradient():
    inp = inputs(RHO, 1.0, entropy=torch.tensor(H, dtype=F64).requires_grad_(True))
    loss, _ = hapo(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.0)
    loss.sum().backward()
    assert inp.entropy.grad is None and inp.logps.grad is not None


def test_hapo_literal_code_sign_widens_the_upper_bound_of_low_entropy_tokens():
    # Code sign: h̃ = +1 on the lowest-entropy token, so e⁺ = 0.56 there and e⁻ stays 0.2.
    entropy = torch.tensor(H, dtype=F64)
    stats = entropy_stats(entropy, torch.ones(1, 8))
    h = normalized_entropy(entropy, stats, literal_code_sign=True)
    e_low, e_high = adaptive_clip_widths(h, 0.2, 0.28)
    assert e_low[0, 0].item() == pytest.approx(0.2) and e_high[0, 0].item() == pytest.approx(0.56)
    inp = inputs(RHO, 1.0, entropy=entropy)
    loss, _ = hapo(inp, epsilon_low=0.2, epsilon_high=0.28, beta=0.0, literal_code_sign=True)
    rho = torch.tensor(RHO, dtype=F64)
    a_hat = redistribute_advantages(torch.ones(1, 8, dtype=F64), h, rho, e_low, e_high)
    clipped = torch.maximum(-a_hat * rho, -a_hat * torch.clamp(rho, 1 - e_low, 1 + e_high))
    assert torch.allclose(loss, clipped)  # A > 0: the dual clip does not apply
