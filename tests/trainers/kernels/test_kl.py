"""Chunked full-vocabulary token KL (trainers.kernels.kl) against a naive fp64 reference.

Small chunk/block sizes force many tiles and ragged last tiles (N, V not
multiples of them).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainers.kernels.kl import token_kl

F64 = torch.float64


def naive_kl(h, w, hr, wr, bias=None, ref_bias=None, temperature=1.0, dtype=F64):
    """Full ``[N, V]`` logits of both heads; ``sum_j p_j (log p_j - log q_j)`` in ``dtype``."""
    z = F.linear(h.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))
    zr = F.linear(hr.to(dtype), wr.to(dtype), None if ref_bias is None else ref_bias.to(dtype))
    logp = F.log_softmax(z / temperature, dim=-1)
    logq = F.log_softmax(zr / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def make(n, hdim, ref_hdim, vocab, dtype=F64, *, bias=False, scale=1.0, seed=0):
    """Policy (h, w, b) requiring grad and a frozen reference (hr, wr, br)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * s).to(dtype)

    h = rnd(n, hdim, s=scale).requires_grad_()
    w = rnd(vocab, hdim, s=1 / math.sqrt(hdim)).requires_grad_()
    b = rnd(vocab, s=0.5).requires_grad_() if bias else None
    hr, wr = rnd(n, ref_hdim, s=scale), rnd(vocab, ref_hdim, s=1 / math.sqrt(ref_hdim))
    br = rnd(vocab, s=0.5) if bias else None
    return (h, w, b), (hr, wr, br)


def run_kl(policy, reference, **kw):
    (h, w, b), (hr, wr, br) = policy, reference
    return token_kl(h, w, hr, wr, bias=b, ref_bias=br, **kw)


@pytest.mark.parametrize(
    "n,hdim,ref_hdim,vocab,chunk_n,block_v,bias,temperature",
    [
        (13, 6, 9, 29, 5, 7, False, 1.0),
        (17, 8, 5, 50, 4, 11, True, 0.7),
        (9, 4, 4, 31, 16, 64, True, 1.5),  # one tile
        (1, 3, 7, 10, 1, 1, True, 1.0),  # one-column blocks
    ],
)
def test_matches_naive_fp64(n, hdim, ref_hdim, vocab, chunk_n, block_v, bias, temperature):
    policy, reference = make(n, hdim, ref_hdim, vocab, bias=bias, scale=2.0)
    kl = run_kl(policy, reference, temperature=temperature, chunk_n=chunk_n, block_v=block_v)
    expected = naive_kl(*policy[:2], *reference[:2], policy[2], reference[2], temperature)
    assert kl.dtype == F64 and kl.shape == (n,)
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-12)
    assert (kl >= 0).all()


def test_fp32_output_and_bf16_inputs():
    policy, reference = make(11, 8, 6, 37, dtype=torch.float32, bias=True)
    kl = run_kl(policy, reference, chunk_n=4, block_v=8)
    assert kl.dtype == torch.float32
    expected = naive_kl(*policy[:2], *reference[:2], policy[2], reference[2])
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    bf = [t.detach().to(torch.bfloat16) for t in (*policy, *reference)]
    kl_bf = token_kl(bf[0], bf[1], bf[3], bf[4], bias=bf[2], ref_bias=bf[5], chunk_n=4, block_v=8)
    assert kl_bf.dtype == torch.float32
    expected_bf = naive_kl(*bf[:2], *bf[3:5], bf[2], bf[5])  # same bf16 values, fp64 maths
    torch.testing.assert_close(kl_bf.double(), expected_bf, rtol=1e-5, atol=1e-6)


def test_nonnegative_and_zero_for_identical_heads():
    policy, _ = make(12, 7, 7, 40, dtype=torch.float32, bias=True, scale=3.0)
    h, w, b = (t.detach() for t in policy)
    kl_same = token_kl(h, w, h, w, bias=b, ref_bias=b, chunk_n=5, block_v=9)
    assert torch.equal(kl_same, torch.zeros_like(kl_same))
    for seed in range(3):
        pol, ref = make(12, 7, 5, 40, dtype=torch.float32, bias=True, scale=3.0, seed=seed)
        assert (run_kl(pol, ref, chunk_n=5, block_v=9) >= -1e-6).all()


def test_shifted_logits_give_zero():
    """softmax is shift-invariant: a reference bias of +1e3 on every logit changes nothing."""
    policy, _ = make(6, 5, 5, 23, bias=True)
    h, w, b = (t.detach() for t in policy)
    kl = token_kl(h, w, h, w, bias=b, ref_bias=b + 1e3, chunk_n=4, block_v=5)
    torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0, atol=1e-12)


def test_worked_example():
    """pi = [0.7, 0.2, 0.1], pi_ref = [0.5, 0.3, 0.2]: KL = 0.085123 (logits = log pi)."""
    pi, pi_ref = torch.tensor([0.7, 0.2, 0.1], dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    ones = torch.ones(1, 3, dtype=F64)
    kl = token_kl(ones, torch.diag(pi.log()), ones, torch.diag(pi_ref.log()), block_v=2)
    assert kl.item() == pytest.approx(0.085123, abs=5e-7)
    assert kl.item() == pytest.approx((pi * (pi / pi_ref).log()).sum().item(), rel=1e-12)


@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.6)])
def test_gradcheck(bias, temperature):
    policy, reference = make(7, 4, 3, 13, bias=bias, scale=2.0)
    leaves = [t for t in policy if t is not None]

    def f(*params):
        h, w, b = (*params, None) if not bias else params
        return token_kl(
            h, w, reference[0], reference[1], bias=b, ref_bias=reference[2],
            temperature=temperature, chunk_n=3, block_v=5,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


def test_grads_match_naive_autograd_fp32():
    policy, reference = make(19, 16, 12, 67, dtype=torch.float32, bias=True, scale=1.5)
    leaves = list(policy)
    g = torch.randn(19, generator=torch.Generator().manual_seed(1))
    kl = run_kl(policy, reference, temperature=0.8, chunk_n=6, block_v=16)
    got = torch.autograd.grad((kl * g).sum(), leaves)
    ref_kl = naive_kl(*policy[:2], *reference[:2], policy[2], reference[2], 0.8, torch.float32)
    want = torch.autograd.grad((ref_kl * g).sum(), leaves)
    for a, e in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        rel = (a - e).norm() / e.norm()
        assert rel < 1e-5, rel


def test_reference_gets_no_grad_and_frozen_weight_skipped():
    policy, reference = make(5, 4, 4, 11, bias=True)
    h, w, b = policy
    hr, wr, br = (t.clone().requires_grad_() for t in reference)
    kl = token_kl(h.detach(), w, hr, wr, bias=b, ref_bias=br, chunk_n=2, block_v=4)
    kl.sum().backward()
    assert hr.grad is None and wr.grad is None and br.grad is None
    assert h.grad is None and w.grad is not None and b.grad is not None


def test_extreme_logits_stay_finite():
    """Logits of order +-1e3 (fp32): no overflow, matches the fp64 reference."""
    policy, reference = make(8, 4, 4, 30, dtype=torch.float32, bias=True, scale=600.0)
    kl = run_kl(policy, reference, chunk_n=3, block_v=7)
    (h, w, b), (hr, wr, br) = policy, reference
    assert torch.isfinite(kl).all()
    expected = naive_kl(h, w, hr, wr, b, br)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-4, atol=1e-2)
    grads = torch.autograd.grad(kl.sum(), [h, w, b])
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_input_validation():
    (h, w, _), (hr, wr, _) = make(4, 3, 5, 9)
    with pytest.raises(ValueError, match="share N and V"):
        token_kl(h, w, hr[:3], wr)
    with pytest.raises(ValueError, match="ref_hidden"):
        token_kl(h, w, hr, wr[:, :4])
    with pytest.raises(ValueError, match="bias"):
        token_kl(h, w, hr, wr, bias=torch.zeros(8, dtype=F64))
    with pytest.raises(ValueError, match="temperature"):
        token_kl(h, w, hr, wr, temperature=0.0)
