"""OREO's math: the worked example by hand, its invariants, padding, ragged batches, steps.

Worked numbers: ``docs/algorithms/oreo.md``.
"""

from __future__ import annotations

import pytest
import torch

from trainers.core.objectives import k3_kl
from trainers.core.oreo import (
    MATH_DELIMITERS,
    OREO_VARIANTS,
    ValueHead,
    bellman_residuals,
    first_valid,
    get_oreo_variant,
    policy_loss,
    response_policy_loss,
    sampled_kl_k3,
    split_steps,
    step_policy_loss,
    step_starts,
    suffix_sums,
    token_step_ids,
    value_loss,
)

F64 = torch.float64
BETA, R = 0.1, 1.0
# The worked example of docs/algorithms/oreo.md (T = 3): S = suffix sums = [0.4, −0.1, 0.1];
# res = V − R + β·S = [0.6−1+0.04, 0.7−1−0.01, 0.95−1+0.01] = [−0.36, −0.31, −0.04].
L = torch.tensor([[0.5, -0.2, 0.1]], dtype=F64)
V = torch.tensor([[0.6, 0.7, 0.95]], dtype=F64)
RW = torch.tensor([R], dtype=F64)
M = torch.ones(1, 3, dtype=torch.bool)
RES = torch.tensor([[-0.36, -0.31, -0.04]], dtype=F64)
STEPS = torch.tensor([[0, 1, 1]])  # steps {a0}, {a1, a2}


def grads(fn, values, logratio, *args, **kw):
    """(loss, ∂loss/∂values, ∂loss/∂logratio) of fn(values, rewards, logratio, mask, ...)."""
    v = values.clone().requires_grad_(True)
    lr = logratio.clone().requires_grad_(True)
    loss, _ = fn(v, *args[:1], lr, *args[1:], **kw)
    gv, gl = torch.autograd.grad(loss, (v, lr), allow_unused=True)
    zero = torch.zeros_like(values)
    return loss.detach(), zero if gv is None else gv, zero if gl is None else gl


def test_registry_has_the_three_variants_and_lists_them_on_error():
    assert tuple(OREO_VARIANTS) == ("token", "step", "response")
    assert get_oreo_variant("token") is policy_loss
    with pytest.raises(KeyError, match="token, step, response"):
        get_oreo_variant("trajectory")


def test_worked_example_suffix_sums_and_residuals():
    assert torch.allclose(suffix_sums(L, M), torch.tensor([[0.4, -0.1, 0.1]], dtype=F64))
    assert torch.allclose(bellman_residuals(V, RW, L, M, beta=BETA), RES)


def test_worked_example_value_loss_and_its_gradient():
    # L_V = (0.1296 + 0.0961 + 0.0016)/3 = 0.2273/3 = 0.075767
    # ∂L_V/∂V = 2·res/3 = [−0.24, −0.206667, −0.026667]; l is detached: no gradient.
    loss, gv, gl = grads(value_loss, V, L, RW, M, beta=BETA)
    assert loss.item() == pytest.approx(0.2273 / 3)
    assert round(loss.item(), 6) == 0.075767
    assert torch.allclose(gv, torch.tensor([[-0.24, -0.206667, -0.026667]], dtype=F64), atol=1e-6)
    assert torch.equal(gl, torch.zeros_like(L))


def test_worked_example_policy_loss_gradient_is_own_term_only():
    # forward = L_V = 0.075767; ∂L_π/∂l_t = 2β·res_t/3 = [−0.024, −0.020667, −0.002667];
    # V is detached: no gradient.
    loss, gv, gl = grads(policy_loss, V, L, RW, M, beta=BETA, alpha=0.0)
    assert round(loss.item(), 6) == 0.075767
    assert torch.allclose(gl, torch.tensor([[-0.024, -0.020667, -0.002667]], dtype=F64), atol=1e-6)
    assert torch.equal(gv, torch.zeros_like(V))
    # Without the stop-gradient, l_t would also feed every earlier residual:
    # ∂/∂l_t = 2β/3·Σ_{s≤t} res_s = [−0.024, −0.044667, −0.047333]; the sg matters.
    lr = L.clone().requires_grad_(True)
    naive = (V - R + BETA * suffix_sums(lr, M)).square().mean()
    (g_naive,) = torch.autograd.grad(naive, lr)
    assert naive.item() == pytest.approx(loss.item())
    assert torch.allclose(
        g_naive, torch.tensor([[-0.024, -0.044667, -0.047333]], dtype=F64), atol=1e-6
    )
    assert not torch.allclose(g_naive, gl)


def test_worked_example_response_level():
    # res_0² = 0.36² = 0.1296; no sg: every l_i gets 2β·res_0 = 2·0.1·(−0.36) = −0.072.
    loss, gv, gl = grads(response_policy_loss, V, L, RW, M, beta=BETA, alpha=0.0)
    assert loss.item() == pytest.approx(0.1296)
    assert torch.allclose(gl, torch.full_like(L, -0.072))
    assert torch.equal(gv, torch.zeros_like(V))


def test_worked_example_step_level():
    # states s_0, s_1: res = [−0.36, −0.31]; loss = (0.1296 + 0.0961)/2 = 0.11285.
    # ∂/∂l_0 = 2β·res_0/2 = −0.036; l_1, l_2 are step 2's own tokens: 2β·res_1/2 = −0.031.
    st = step_starts(M, STEPS)
    assert st.tolist() == [[True, True, False]]
    assert torch.allclose(bellman_residuals(V, RW, L, M, beta=BETA, states=st), RES * st)
    loss, _, gl = grads(step_policy_loss, V, L, RW, M, beta=BETA, alpha=0.0, step_ids=STEPS)
    assert loss.item() == pytest.approx(0.11285)
    assert torch.allclose(gl, torch.tensor([[-0.036, -0.031, -0.031]], dtype=F64))
    # the critic at step level: same states, ∂L_V/∂V = 2·res/2 at the starts, 0 at a2
    lv, gv, _ = grads(value_loss, V, L, RW, M, beta=BETA, step_ids=STEPS)
    assert lv.item() == pytest.approx(0.11285)
    assert torch.allclose(gv, torch.tensor([[-0.36, -0.31, 0.0]], dtype=F64))


def one_step_residuals(values, reward, logratio, beta):
    """V(s_t) − r_t − V(s_{t+1}) + β·l_t with r_t = R at the last token, V(s_T) = 0 (one row)."""
    T = values.shape[0]
    out = []
    for t in range(T):
        v_next = values[t + 1] if t + 1 < T else 0.0
        r_t = reward if t == T - 1 else 0.0
        out.append(values[t] - r_t - v_next + beta * logratio[t])
    return torch.stack(out)


def test_consistent_critic_zeroes_every_loss_and_one_step_residual():
    # V* = R − β·S = [1 − 0.04, 1 + 0.01, 1 − 0.01] = [0.96, 1.01, 0.99]
    v_star = R - BETA * suffix_sums(L, M)
    assert torch.allclose(v_star, torch.tensor([[0.96, 1.01, 0.99]], dtype=F64))
    assert value_loss(v_star, RW, L, M, beta=BETA)[0].item() == pytest.approx(0.0, abs=1e-30)
    for name, fn in OREO_VARIANTS.items():
        kw = {"step_ids": STEPS} if name == "step" else {}
        assert fn(v_star, RW, L, M, beta=BETA, alpha=0.0, **kw)[0].item() == pytest.approx(
            0.0, abs=1e-30
        )
    assert torch.allclose(one_step_residuals(v_star[0], R, L[0], BETA), torch.zeros(3, dtype=F64))


def random_batch(seed, B=4, T=7, left=False):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    pos = torch.arange(T)[None, :]
    mask = pos >= T - lengths[:, None] if left else pos < lengths[:, None]
    junk = torch.full((B, T), float("nan"), dtype=F64)
    values = torch.where(mask, torch.randn(B, T, generator=gen, dtype=F64), junk)
    logratio = torch.where(mask, 0.5 * torch.randn(B, T, generator=gen, dtype=F64), junk)
    rewards = torch.randint(0, 2, (B,), generator=gen).to(F64)
    step_ids = torch.randint(0, 2, (B, T), generator=gen).cumsum(-1)  # runs of equal ids
    return values, rewards, logratio, mask, step_ids


@pytest.mark.parametrize("left", [False, True])
def test_policy_forward_equals_value_loss_and_gradients_are_the_residuals(left):
    values, rewards, logratio, mask, step_ids = random_batch(1, left=left)
    B, n = mask.shape[0], mask.sum(-1, keepdim=True).to(F64)
    res = bellman_residuals(values, rewards, logratio, mask, beta=0.03)
    lv, gv, _ = grads(value_loss, values, logratio, rewards, mask, beta=0.03)
    lp, _, gl = grads(policy_loss, values, logratio, rewards, mask, beta=0.03, alpha=0.0)
    assert torch.allclose(lv, lp)
    assert torch.allclose(gv, 2 * res / (B * n))  # ∂L_V/∂V_t = 2·res_t/T_b, then 1/B
    assert torch.allclose(gl, 2 * 0.03 * res / (B * n))  # ∂L_π/∂l_t = 2β·res_t/T_b, then 1/B
    # the step variant too: forward equals the step-level critic loss
    ls, _, _ = grads(
        step_policy_loss, values, logratio, rewards, mask, beta=0.03, alpha=0.0, step_ids=step_ids
    )
    lvs, _, _ = grads(value_loss, values, logratio, rewards, mask, beta=0.03, step_ids=step_ids)
    assert torch.allclose(ls, lvs)


def test_step_zero_zero_head_and_reference_policy_give_r_squared():
    # V ≡ 0 (zero-initialised head), l ≡ 0 (πθ = πref): res_t = −R, L_V = mean R² = (0+1+1+0)/4,
    # and the KL term (k3 of l = 0) is 0.
    head = ValueHead(8, dtype=F64)
    hidden = torch.randn(4, 6, 8, dtype=F64)
    state_index = torch.arange(1, 5).expand(4, 4)
    values = head.values_at_states(hidden, state_index)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=F64)
    mask, l0 = torch.ones(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=F64)
    assert value_loss(values, rewards, l0, mask, beta=0.03)[0].item() == 0.5
    lp, metrics = policy_loss(values, rewards, l0, mask, beta=0.03, alpha=0.01)
    assert lp.item() == 0.5 and metrics["kl"].item() == 0.0
    for r in (0.0, 1.0):  # the script's init check: 0.0 for R=0, 1.0 for R=1
        rr = torch.full((4,), r, dtype=F64)
        assert value_loss(values, rr, l0, mask, beta=0.03)[0].item() == r


def test_response_level_is_res0_squared_with_left_padding():
    values, rewards, logratio, mask, _ = random_batch(2, left=True)
    first = first_valid(mask)
    res0 = bellman_residuals(values, rewards, logratio, mask, beta=0.03)[first]
    loss, _ = response_policy_loss(values, rewards, logratio, mask, beta=0.03, alpha=0.0)
    assert torch.allclose(loss, res0.square().mean())


def per_row(fn, values, rewards, logratio, mask, **kw):
    """Loss of each row alone (padding sliced off), averaged over rows."""
    out = []
    for b in range(mask.shape[0]):
        m = mask[b]
        row = {k: (v[b][m][None] if k == "step_ids" else v) for k, v in kw.items()}
        v, lr = values[b][m][None], logratio[b][m][None]
        out.append(fn(v, rewards[b : b + 1], lr, m[m][None], **row)[0])
    return torch.stack(out).mean()


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize(
    "fn,kw",
    [
        (value_loss, {"beta": 0.1}),
        (value_loss, {"beta": 0.1, "step_ids": None}),
        (policy_loss, {"beta": 0.1, "alpha": 0.05}),
        (step_policy_loss, {"beta": 0.1, "alpha": 0.05, "step_ids": None}),
        (response_policy_loss, {"beta": 0.1, "alpha": 0.05}),
    ],
)
def test_ragged_batch_equals_per_row_average_and_padding_never_contributes(fn, kw, left):
    values, rewards, logratio, mask, step_ids = random_batch(3, left=left)
    kw = {**kw, "step_ids": step_ids} if "step_ids" in kw else kw
    v = values.clone().requires_grad_(True)
    lr = logratio.clone().requires_grad_(True)
    loss = fn(v, rewards, lr, mask, **kw)[0]
    assert torch.isfinite(loss)  # NaN padding is ignored
    assert torch.allclose(loss, per_row(fn, values, rewards, logratio, mask, **kw))
    loss.backward()
    # the critic loss detaches l and the policy losses detach V
    g, other = (v.grad, lr.grad) if fn is value_loss else (lr.grad, v.grad)
    assert other is None
    assert torch.isfinite(g).all() and (g[~mask] == 0).all() and (g[mask] != 0).any()


def step_loss_loop(values, reward, logratio, beta, ids):
    """Literal step-level residuals for one unpadded row, with explicit .detach()."""
    T = len(ids)
    starts = [t for t in range(T) if t == 0 or ids[t] != ids[t - 1]]
    res = []
    for k, t in enumerate(starts):
        nxt = starts[k + 1] if k + 1 < len(starts) else T
        own = logratio[t:nxt].sum()
        rest = logratio[nxt:].sum().detach()
        res.append(values[t].detach() - reward + beta * (own + rest))
    return torch.stack(res).square().mean()


def test_step_level_matches_a_loop_reference_in_value_and_gradient():
    values, rewards, logratio, mask, step_ids = random_batch(4)
    lr = logratio.clone().requires_grad_(True)
    loss = step_policy_loss(values, rewards, lr, mask, beta=0.2, alpha=0.0, step_ids=step_ids)[0]
    (g,) = torch.autograd.grad(loss, lr)
    lr2 = logratio.clone().requires_grad_(True)
    ref = torch.stack(
        [
            step_loss_loop(
                values[b][mask[b]], rewards[b], lr2[b][mask[b]], 0.2, step_ids[b][mask[b]].tolist()
            )
            for b in range(mask.shape[0])
        ]
    ).mean()
    (g_ref,) = torch.autograd.grad(ref, lr2)
    assert torch.allclose(loss, ref)
    assert torch.allclose(g, torch.nan_to_num(g_ref) * mask)


def test_kl_term_exact_example_and_k3_fallback():
    # One state, π = [0.7, 0.2, 0.1], πref = [0.5, 0.3, 0.2]:
    # KL = 0.7·ln1.4 + 0.2·ln(2/3) + 0.1·ln0.5 = 0.235532 − 0.081093 − 0.069315 = 0.085123.
    pi, ref = torch.tensor([0.7, 0.2, 0.1], dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    kl_state = (pi * (pi / ref).log()).sum()
    assert round(kl_state.item(), 6) == 0.085123
    kl = kl_state.expand(1, 3).clone().requires_grad_(True)  # same KL at all 3 states
    base = policy_loss(V, RW, L, M, beta=BETA, alpha=0.0)[0]
    loss, metrics = policy_loss(V, RW, L, M, beta=BETA, alpha=0.01, kl=kl)
    assert (loss - base).item() == pytest.approx(0.00085123, abs=1e-8)  # α·KL
    assert metrics["kl"].item() == pytest.approx(0.085123, abs=1e-6)
    (gk,) = torch.autograd.grad(loss, kl)
    assert torch.allclose(gk, torch.full_like(kl, 0.01 / 3))  # α/T per token
    # without kl: k3(l) = exp(−l) + l − 1 = [0.106531, 0.021403, 0.004837], mean 0.044257
    k3 = sampled_kl_k3(L)
    assert torch.allclose(k3, torch.tensor([[0.106531, 0.021403, 0.004837]], dtype=F64), atol=1e-6)
    assert torch.allclose(k3, k3_kl(L, torch.zeros_like(L)))
    fallback = policy_loss(V, RW, L, M, beta=BETA, alpha=0.01)[0]
    assert (fallback - base).item() == pytest.approx(0.01 * k3.mean().item())


def test_step_starts_skips_padding_and_restarts_on_changed_ids():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 1, 0]], dtype=torch.bool)
    ids = torch.tensor([[9, 0, 0, 1, 1], [3, 4, 7, 4, 7]])
    # row 0: first valid token, then ids change 0→1; row 1: 3→4 starts, 4 (pad skipped) 4 does not
    assert step_starts(mask, ids).tolist() == [
        [False, True, False, True, False],
        [True, True, False, False, False],
    ]


def test_split_steps_gsm8k_and_math_delimiters():
    text = "Add 2.\nSo x = 4. Then $y.$ done"
    # GSM8K: one cut after "\n" (index 6): "Add 2.\n" | "So x = 4. Then $y.$ done"
    assert split_steps(text) == [(0, 7), (7, len(text))]
    # MATH: also after ". " (index 15-16) and ".$ " (index 24-26)
    assert split_steps(text, MATH_DELIMITERS) == [(0, 7), (7, 17), (17, 27), (27, len(text))]
    assert split_steps("a\n\nb\n") == [(0, 2), (2, 3), (3, 5)]  # no empty trailing step
    assert split_steps("") == []
    with pytest.raises(ValueError, match="non-empty"):
        split_steps("a", ())


def test_token_step_ids_follow_the_token_holding_each_step_start():
    # "a\n\nb\n" -> steps [0,2) [2,3) [3,5); tokens "a", "\n\n" (holds step 1's start),
    # "b\n", " " past the text, EOS with (0,0) offsets -> [0, 1, 2, 2, 2]
    spans = split_steps("a\n\nb\n")
    assert token_step_ids([(0, 1), (1, 3), (3, 5), (5, 6), (0, 0)], spans) == [0, 1, 2, 2, 2]
    # a token holding two step starts ("\n\n\n" over [1,4)): the middle step has no token and
    # the ids stay dense: steps [0,2) [2,3) [3,4) [4,5) -> tokens "a", "\n\n\n", "b"
    spans = split_steps("a\n\n\nb")
    assert token_step_ids([(0, 1), (1, 4), (4, 5)], spans) == [0, 1, 2]
    assert token_step_ids([(0, 1), (1, 2)], []) == [0, 0]


def test_value_head_is_zero_init_biasless_and_reads_the_prefix_last_token():
    head = ValueHead(4, dtype=F64)
    assert head.linear.bias is None and torch.count_nonzero(head.linear.weight) == 0
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0]], dtype=F64))
    # hidden[b, p] = p·[1,0,0,0] + b·[0,1,0,0]: V at position p of row b = p + 10·b
    hidden = torch.zeros(2, 5, 4, dtype=F64)
    hidden[..., 0] = torch.arange(5, dtype=F64)
    hidden[..., 1] = torch.arange(2, dtype=F64)[:, None]
    # row 0: prompt of 2 tokens, response at positions 2..4 -> states read at 1, 2, 3;
    # row 1: prompt of 3 tokens, response at 3..4 (+1 pad) -> 2, 3, pad 0
    state_index = torch.tensor([[1, 2, 3], [2, 3, 0]])
    assert head.values_at_states(hidden, state_index).tolist() == [
        [1.0, 2.0, 3.0],
        [12.0, 13.0, 10.0],
    ]


def test_bad_inputs_say_how_to_fix_them():
    with pytest.raises(ValueError, match="needs step_ids"):
        step_policy_loss(V, RW, L, M, beta=BETA, alpha=0.0)
    with pytest.raises(ValueError, match="use variant 'step'"):
        policy_loss(V, RW, L, M, beta=BETA, alpha=0.0, step_ids=STEPS)
    with pytest.raises(ValueError, match="logratio has shape"):
        value_loss(V, RW, L[:, :2], M, beta=BETA)
    with pytest.raises(ValueError, match="rewards has shape"):
        value_loss(V, RW.expand(2), L, M, beta=BETA)


def test_bf16_inputs_are_computed_in_float32():
    loss, _ = value_loss(V.bfloat16(), RW.bfloat16(), L.bfloat16(), M, beta=BETA)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.075767, abs=2e-3)
