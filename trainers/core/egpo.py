"""EGPO's math (``docs/algorithms/egpo.md``), torch only, no model.

The LLM loss. For a prompt x, two completions y, y' (from the sampling policy μ) and
an opponent y'' (from the policy π_s whose preference is the target), with the
judge's p1 = P(y ≻ y'') and p2 = P(y' ≻ y''):

    h      = [lpθ(y) − lpref(y)] − [lpθ(y') − lpref(y')]
    target = (p1 − p2) / β
    loss   = (h − target)²                       averaged over the prompts

``sequence_logps`` gives lp: the completion tokens' log-probs summed, or with
``normalize`` divided by the completion's token count (up to and including EOS),
as the paper's released code does ("length-normalised log-probs", ``docs/algorithms/egpo.md``).

The tabular game. N responses, a preference matrix P (P[i, j] = P(i ≻ j),
P + Pᵀ = 1), softmax logits θ and θ_ref. One extragradient (mirror-prox)
iteration with step η:

    θ_{t+½} = (1 − ηβ)·θ_t + ηβ·θ_ref + η·P π_t
    θ_{t+1} = (1 − ηβ)·θ_t + ηβ·θ_ref + η·P π_{t+½}       (again from θ_t)

``tabular_online_ipo_loss`` is the exact expectation of the LLM loss when y and y' are
uniform over all N² ordered pairs and y'' ~ π_s, with lp = θ − logsumexp θ. Plain
gradient descent on it from θ_t with step α = ηβN/4 (``sgd_step_for``) reproduces
the mirror-prox step up to a constant shift of the logits (the same policy): the
gradient of the loss is (4/N)·centred(θ − θ_ref − Pπ_s/β).
"""

from __future__ import annotations

import torch


# ----------------------------------------------------------------------------- LLM loss
def sequence_logps(logp: torch.Tensor, mask: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """[B] completion log-prob: Σ_t logp·mask, divided by Σ_t mask when ``normalize``."""
    total = (logp * mask).sum(-1)
    if not normalize:
        return total
    return total / mask.sum(-1).clamp(min=1).to(total.dtype)


def egpo_h(
    policy_y: torch.Tensor, policy_yp: torch.Tensor, ref_y: torch.Tensor, ref_yp: torch.Tensor
) -> torch.Tensor:
    """h = (lpθ(y) − lpref(y)) − (lpθ(y') − lpref(y')), per prompt."""
    return (policy_y - ref_y) - (policy_yp - ref_yp)


def egpo_target(p1: torch.Tensor, p2: torch.Tensor, beta: float) -> torch.Tensor:
    """(P(y ≻ y'') − P(y' ≻ y'')) / β, per prompt."""
    return (p1 - p2) / beta


def egpo_loss(
    policy_y: torch.Tensor,
    policy_yp: torch.Tensor,
    ref_y: torch.Tensor,
    ref_yp: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The online-IPO loss, mean over prompts, and its no-grad metrics.

    All inputs are [B]; the reference log-probs and the probabilities carry no gradient.
    Metrics: h, target (means), win_rate_y / win_rate_y_prime (mean p1, p2), and kl: the mean
    over y and y' of the log-ratio lpθ − lpref (as given: summed or normalised).
    """
    h = egpo_h(policy_y, policy_yp, ref_y, ref_yp)
    target = egpo_target(p1.to(h.dtype), p2.to(h.dtype), beta)
    per_prompt = (h - target) ** 2
    with torch.no_grad():
        ratios = torch.cat([policy_y - ref_y, policy_yp - ref_yp])
        metrics = {
            "h": h.mean(),
            "target": target.mean(),
            "win_rate_y": p1.float().mean(),
            "win_rate_y_prime": p2.float().mean(),
            "kl": ratios.mean(),
        }
    return per_prompt.mean(), {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------------------- tabular game
def centred(x: torch.Tensor) -> torch.Tensor:
    """Logits modulo the constant shift that leaves the softmax unchanged."""
    return x - x.mean(-1, keepdim=True)


def mirror_prox_step(
    theta: torch.Tensor,
    theta_ref: torch.Tensor,
    P: torch.Tensor,
    opponent: torch.Tensor,
    *,
    eta: float,
    beta: float,
) -> torch.Tensor:
    """(1 − ηβ)·θ + ηβ·θ_ref + η·P·opponent: one mirror step against the policy ``opponent``."""
    return (1 - eta * beta) * theta + eta * beta * theta_ref + eta * (P @ opponent)


def extragradient_iteration(
    theta: torch.Tensor, theta_ref: torch.Tensor, P: torch.Tensor, *, eta: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_{t+½}, θ_{t+1}): both steps start at θ; the full step's opponent is π_{t+½}."""
    half = mirror_prox_step(theta, theta_ref, P, torch.softmax(theta, -1), eta=eta, beta=beta)
    full = mirror_prox_step(theta, theta_ref, P, torch.softmax(half, -1), eta=eta, beta=beta)
    return half, full


def omd_iteration(
    theta: torch.Tensor, theta_ref: torch.Tensor, P: torch.Tensor, *, eta: float, beta: float
) -> torch.Tensor:
    """One step of online mirror descent (online IPO): the opponent is the current policy."""
    return mirror_prox_step(theta, theta_ref, P, torch.softmax(theta, -1), eta=eta, beta=beta)


def tabular_online_ipo_loss(
    theta: torch.Tensor,
    theta_ref: torch.Tensor,
    P: torch.Tensor,
    opponent: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """E_{y,y' uniform over ordered pairs} E_{y''~opponent} (h(y,y') − (P(y≻y'') − P(y'≻y''))/β)².

    lp = θ − logsumexp θ (the normalisers cancel in h, but are kept: this is the exact loss).
    Differentiable in ``theta``; ``opponent`` is a constant.
    """
    lp = theta - torch.logsumexp(theta, -1)
    lp_ref = theta_ref - torch.logsumexp(theta_ref, -1)
    r = lp - lp_ref  # [N]
    h = r[:, None] - r[None, :]  # [N, N]: y = row, y' = column
    # target[i, j, k] = (P[i, k] − P[j, k]) / β for opponent answer k
    target = (P[:, None, :] - P[None, :, :]) / beta
    sq = (h[:, :, None] - target) ** 2  # [N, N, N]
    return (sq.mean((0, 1)) * opponent.detach()).sum()


def sgd_step_for(eta: float, beta: float, n: int) -> float:
    """The SGD step α = ηβN/4 under which the tabular loss reproduces mirror-prox with step η."""
    return eta * beta * n / 4


def game_value(
    P: torch.Tensor, beta: float, pi1: torch.Tensor, pi2: torch.Tensor, ref: torch.Tensor
) -> torch.Tensor:
    """J(π1, π2) = π1ᵀPπ2 − β·KL(π1‖ref) + β·KL(π2‖ref)."""

    def kl(p: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - ref.log())).sum()

    return pi1 @ P @ pi2 - beta * kl(pi1) + beta * kl(pi2)


def duality_gap(
    P: torch.Tensor, beta: float, theta: torch.Tensor, theta_ref: torch.Tensor
) -> torch.Tensor:
    """max_π' J(π', π) − min_π' J(π, π'): 0 exactly at the regularised equilibrium."""
    pi, ref = torch.softmax(theta, -1), torch.softmax(theta_ref, -1)
    best = torch.softmax(theta_ref + (P @ pi) / beta, -1)  # the best response to π
    return game_value(P, beta, best, pi, ref) - game_value(P, beta, pi, best, ref)


def equilibrium_residual(
    theta: torch.Tensor, theta_ref: torch.Tensor, P: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """max |centred(θ − θ_ref − P·softmax(θ)/β)|: 0 at the regularised equilibrium θ*."""
    return centred(theta - theta_ref - (P @ torch.softmax(theta, -1)) / beta).abs().max()


def regularised_equilibrium(
    theta_ref: torch.Tensor,
    P: torch.Tensor,
    *,
    beta: float,
    eta: float = 1.0,
    iterations: int = 5000,
) -> torch.Tensor:
    """θ* by running extragradient iterations from θ_ref (they converge for ηβ small enough)."""
    theta = theta_ref.clone()
    for _ in range(iterations):
        _, theta = extragradient_iteration(theta, theta_ref, P, eta=eta, beta=beta)
    return theta
