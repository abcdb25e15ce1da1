"""EGPO's math against the worked examples of ``docs/algorithms/egpo.md``.

The tabular game: N=3 answers, cyclic preferences 0 ≻ 1 ≻ 2 ≻ 0 at 0.8, β=0.1, η=1,
θ_ref = [0.5, 0, −0.5]. Numbers are the page's (6 decimals).
"""

from __future__ import annotations

import pytest
import torch

from trainers.core.egpo import (
    centred,
    duality_gap,
    egpo_h,
    egpo_loss,
    equilibrium_residual,
    extragradient_iteration,
    omd_iteration,
    regularised_equilibrium,
    sequence_logps,
    sgd_step_for,
    tabular_online_ipo_loss,
)

BETA, ETA = 0.1, 1.0
T = torch.float64


def cyclic(p: float = 0.8) -> torch.Tensor:
    P = torch.full((3, 3), 0.5, dtype=T)
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        P[i, j], P[j, i] = p, 1 - p
    return P


P = cyclic()
THETA_REF = torch.tensor([0.5, 0.0, -0.5], dtype=T)


def close(x: torch.Tensor, expected: list[float], tol: float = 5e-7) -> None:
    assert torch.allclose(x, torch.tensor(expected, dtype=T), atol=tol, rtol=0), x


def test_worked_example_half_and_full_step():
    close(torch.softmax(THETA_REF, -1), [0.50648, 0.307196, 0.186324], 5e-6)
    close(P @ torch.softmax(THETA_REF, -1), [0.536262, 0.403953, 0.559785])
    half, full = extragradient_iteration(THETA_REF, THETA_REF, P, eta=ETA, beta=BETA)
    pi_half = torch.softmax(half, -1)
    close(pi_half, [0.524109, 0.278493, 0.197398])
    close(P @ pi_half, [0.524328, 0.401987, 0.573685])
    close(torch.softmax(full, -1), [0.519973, 0.279062, 0.200965])


def _sgd_step(theta: torch.Tensor, opponent: torch.Tensor, alpha: float) -> torch.Tensor:
    """θ − α·∇L(θ; opponent), the gradient by autograd on the exact tabular loss."""
    x = theta.clone().requires_grad_(True)
    loss = tabular_online_ipo_loss(x, THETA_REF, P, opponent, beta=BETA)
    (grad,) = torch.autograd.grad(loss, x)
    return theta - alpha * grad


def test_sgd_with_alpha_eta_beta_n_over_4_reproduces_mirror_prox():
    alpha = sgd_step_for(ETA, BETA, 3)
    assert alpha == pytest.approx(0.075)
    half, full = extragradient_iteration(THETA_REF, THETA_REF, P, eta=ETA, beta=BETA)
    sgd_half = _sgd_step(THETA_REF, torch.softmax(THETA_REF, -1), alpha)
    # the full step: gradient at θ_0 (not at θ_½), with the half-step policy as opponent
    sgd_full = _sgd_step(THETA_REF, torch.softmax(half, -1), alpha)
    assert (centred(sgd_half) - centred(half)).abs().max() < 1e-12
    assert (centred(sgd_full) - centred(full)).abs().max() < 1e-12
    close(torch.softmax(sgd_half, -1), [0.524109, 0.278493, 0.197398], 1e-6)
    close(torch.softmax(sgd_full, -1), [0.519973, 0.279062, 0.200965], 1e-6)
    # a different step size does not
    other = _sgd_step(THETA_REF, torch.softmax(THETA_REF, -1), 2 * alpha)
    assert (centred(other) - centred(half)).abs().max() > 1e-3


def test_the_gradient_evaluated_at_theta_half_is_a_different_update():
    alpha = sgd_step_for(ETA, BETA, 3)
    half = _sgd_step(THETA_REF, torch.softmax(THETA_REF, -1), alpha)
    x = half.clone().requires_grad_(True)
    loss = tabular_online_ipo_loss(x, THETA_REF, P, torch.softmax(half, -1), beta=BETA)
    (grad_at_half,) = torch.autograd.grad(loss, x)
    naive = torch.softmax(THETA_REF - alpha * grad_at_half, -1)
    close(naive, [0.518291, 0.281864, 0.199845])
    _, full = extragradient_iteration(THETA_REF, THETA_REF, P, eta=ETA, beta=BETA)
    assert (naive - torch.softmax(full, -1)).abs().max() > 1e-3


def test_the_regularised_equilibrium_is_a_fixed_point():
    star = regularised_equilibrium(THETA_REF, P, beta=BETA, eta=ETA)
    close(torch.softmax(star, -1), [0.420437, 0.248916, 0.330647])
    assert equilibrium_residual(star, THETA_REF, P, beta=BETA) < 1e-12
    half, full = extragradient_iteration(star, THETA_REF, P, eta=ETA, beta=BETA)
    assert (centred(full) - centred(star)).abs().max() < 1e-12
    assert (centred(half) - centred(star)).abs().max() < 1e-12
    assert abs(float(duality_gap(P, BETA, star, THETA_REF))) < 1e-12
    # and SGD on the exact loss with the equilibrium as opponent does not move it either
    moved = _sgd_step(star, torch.softmax(star, -1), sgd_step_for(ETA, BETA, 3))
    assert (centred(moved) - centred(star)).abs().max() < 1e-12


def test_extragradient_converges_where_online_ipo_does_not():
    beta, eta = 0.01, 5.0
    eg, omd = THETA_REF.clone(), THETA_REF.clone()
    for _ in range(100):
        _, eg = extragradient_iteration(eg, THETA_REF, P, eta=eta, beta=beta)
        omd = omd_iteration(omd, THETA_REF, P, eta=eta, beta=beta)
    assert float(duality_gap(P, beta, eg, THETA_REF)) < 1e-12
    assert float(duality_gap(P, beta, omd, THETA_REF)) == pytest.approx(0.475, abs=5e-4)


def _sample_loss(normalize: bool) -> tuple[float, float]:
    lengths = torch.tensor([[20.0], [19.0]])
    mask = torch.ones(2, 20)
    mask[1, 19] = 0

    # per-token log-probs that sum to the example's sequence values
    def lp(total_y: float, total_yp: float) -> torch.Tensor:
        return torch.tensor([[total_y], [total_yp]]) / lengths * mask

    pol = sequence_logps(lp(-40.0, -38.0), mask, normalize=normalize)
    ref = sequence_logps(lp(-41.0, -37.5), mask, normalize=normalize)
    loss, metrics = egpo_loss(
        pol[:1], pol[1:], ref[:1], ref[1:], torch.tensor([0.7]), torch.tensor([0.4]), beta=0.1
    )
    assert float(metrics["target"]) == pytest.approx(3.0)
    return float(loss), float(metrics["h"])


def test_one_llm_sample_loss_summed_and_length_normalised():
    loss, h = _sample_loss(normalize=False)
    assert h == pytest.approx(1.5, abs=1e-5) and loss == pytest.approx(2.25, abs=1e-4)
    loss, h = _sample_loss(normalize=True)
    assert h == pytest.approx(0.076316, abs=1e-6) and loss == pytest.approx(8.547929, abs=1e-5)


def test_loss_is_symmetric_in_y_and_y_prime_and_zero_iff_h_is_the_target():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(2, 5, generator=g, dtype=T), torch.randn(2, 5, generator=g, dtype=T)
    p1, p2 = torch.rand(5, generator=g, dtype=T), torch.rand(5, generator=g, dtype=T)
    ab, _ = egpo_loss(pol[0], pol[1], ref[0], ref[1], p1, p2, beta=BETA)
    ba, _ = egpo_loss(pol[1], pol[0], ref[1], ref[0], p2, p1, beta=BETA)
    assert float(ab) > 0 and float(ab) == pytest.approx(float(ba), rel=1e-12)
    # move the policy so h equals (p1 − p2)/β exactly: the loss is 0, and only then
    h = egpo_h(pol[0], pol[1], ref[0], ref[1])
    fixed = pol[0] + ((p1 - p2) / BETA - h)
    zero, _ = egpo_loss(fixed, pol[1], ref[0], ref[1], p1, p2, beta=BETA)
    assert float(zero) < 1e-20
    off, _ = egpo_loss(fixed + 1e-3, pol[1], ref[0], ref[1], p1, p2, beta=BETA)
    assert float(off) > 0
