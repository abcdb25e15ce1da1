"""Chunked torch path of trainers.kernels (and the public token_logprobs wrapper).

Truth is the naive materialised-logits reference in fp64. Small chunk/block
sizes force many tiles and ragged last tiles (N, V not multiples of them).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainers.kernels import naive_token_logprobs, token_logprobs
from trainers.kernels.chunked import chunked_token_logprobs

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the upstream per-token grads below use the global generator


def make(n, hdim, vocab, dtype=F64, *, bias=False, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=gen, dtype=F64) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen, dtype=F64) / math.sqrt(hdim)).to(dtype)
    b = (torch.randn(vocab, generator=gen, dtype=F64) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n,), generator=gen)
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    return h, w, b, y


def grads(fn, h, w, b, y, gl, ge, **kw):
    """Outputs and (dh, dW, db) of sum(gl * logp + ge * entropy)."""
    logp, ent = fn(h, w, y, bias=b, return_entropy=True, **kw)
    loss = (logp * gl).sum() + (ent * ge).sum()
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    return (logp, ent), torch.autograd.grad(loss, leaves)


def max_err(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 1.0), (True, 0.6)])
def test_gradcheck_ragged_tiles(outputs, bias, temperature):
    h, w, b, y = make(13, 6, 29, bias=bias, scale=2.0)

    def f(*params):
        hh, ww, bb = (*params, None) if b is None else params
        logp, ent = chunked_token_logprobs(
            hh, ww, y, bias=bb, temperature=temperature, return_entropy=True, chunk_n=5, block_v=7
        )
        return {"logp": (logp,), "entropy": (ent,), "both": (logp, ent)}[outputs]

    params = (h, w) if b is None else (h, w, b)
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("chunk_n,block_v", [(1, 1), (4, 7), (16, 64), (64, 1000), (7, 50)])
def test_fp64_matches_naive_tightly(chunk_n, block_v):
    h, w, b, y = make(37, 16, 257, bias=True, scale=3.0)
    gl, ge = torch.randn(37, dtype=F64), torch.randn(37, dtype=F64)
    out, g = grads(
        chunked_token_logprobs,
        h,
        w,
        b,
        y,
        gl,
        ge,
        temperature=0.8,
        chunk_n=chunk_n,
        block_v=block_v,
    )
    ref_out, ref_g = grads(naive_token_logprobs, h, w, b, y, gl, ge, temperature=0.8)
    assert out[0].dtype == F64
    assert max_err(out, ref_out) <= 1e-10
    assert max_err(g, ref_g) <= 1e-10


def test_fp32_matches_naive():
    h, w, b, y = make(300, 64, 5000, torch.float32, bias=True, scale=2.0)
    gl, ge = torch.randn(300), torch.randn(300)
    out, g = grads(chunked_token_logprobs, h, w, b, y, gl, ge, chunk_n=128, block_v=1024)
    ref_out, ref_g = grads(naive_token_logprobs, h, w, b, y, gl, ge)
    assert all(t.dtype == torch.float32 for t in (*out, *g))
    for a, r in zip((*out, *g), (*ref_out, *ref_g), strict=True):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5)


def test_bf16_error_no_worse_than_naive_bf16():
    h, w, b, y = make(128, 64, 3000, torch.bfloat16, bias=True, scale=3.0)
    gl, ge = torch.randn(128), torch.randn(128)
    out, g = grads(chunked_token_logprobs, h, w, b, y, gl, ge, chunk_n=32, block_v=512)
    naive_out, naive_g = grads(naive_token_logprobs, h, w, b, y, gl, ge)
    # fp64 truth of the very same bf16 numbers
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    true_out, true_g = grads(naive_token_logprobs, h64, w64, b64, y, gl.double(), ge.double())
    assert all(t.dtype == torch.bfloat16 for t in g)
    triples = zip((*out, *g), (*naive_out, *naive_g), (*true_out, *true_g), strict=True)
    for ours, naive, truth in triples:
        err_ours = (ours.double() - truth).abs().max().item()
        err_naive = (naive.double() - truth).abs().max().item()
        assert err_ours <= 1.1 * err_naive + 1e-6, (err_ours, err_naive)


# ----------------------------------------------------------------------------- edge cases
def test_extreme_logits_hand_worked():
    # z = [1000, 1000, -1000, 0]: p = [1/2, 1/2, ~0, ~0], so logp(0) = -log 2 and
    # logp(2) = -2000 - log 2; entropy = log 2. Blocks of 1 put each max in its own tile.
    h = torch.tensor([[1.0], [1.0], [1.0]], requires_grad=True)
    w = torch.tensor([[1000.0], [1000.0], [-1000.0], [0.0]])
    y = torch.tensor([0, 2, 3])
    for block_v in (1, 3, 4):
        logp, ent = chunked_token_logprobs(h, w, y, return_entropy=True, chunk_n=2, block_v=block_v)
        expected = torch.tensor([-math.log(2), -2000 - math.log(2), -1000 - math.log(2)])
        torch.testing.assert_close(logp, expected, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(ent, torch.full((3,), math.log(2)), rtol=0, atol=1e-6)
        (dh,) = torch.autograd.grad(ent.sum(), h)
        # dH/dz_j = -p_j (log p_j + H) vanishes on the two tied maxima, so dH/dh = 0 up to
        # fp32 rounding of lse ~ 1e3 (6e-5) times |W| = 1e3.
        assert dh.abs().max().item() <= 1e-4 * 1000


def test_extreme_logits_random_match_fp64():
    h, w, _, y = make(40, 8, 300, torch.float32, scale=300.0)  # |z| ~ 1e3
    gl, ge = torch.randn(40), torch.randn(40)
    out, g = grads(chunked_token_logprobs, h, w, None, y, gl, ge, chunk_n=16, block_v=64)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref_out, ref_g = grads(naive_token_logprobs, h64, w64, None, y, gl.double(), ge.double())
    assert all(torch.isfinite(t).all() for t in (*out, *g))
    assert out[0].max().item() <= 0 and out[1].min().item() >= 0
    for a, r in zip((*out, *g), (*ref_out, *ref_g), strict=True):
        # fp32 with |z| ~ 1e3: the entropy of naive fp32 is also ~2e-5 (relative) off here
        torch.testing.assert_close(a.double(), r, rtol=5e-5, atol=5e-5 * r.abs().max().item())


def test_targets_on_block_edges():
    block_v, vocab = 16, 50
    h, w, b, y = make(8, 12, vocab, bias=True)
    y = torch.tensor([0, block_v - 1, block_v, vocab - 1, 2 * block_v - 1, 2 * block_v, 47, 1])
    gl, ge = torch.randn(8, dtype=F64), torch.randn(8, dtype=F64)
    out, g = grads(chunked_token_logprobs, h, w, b, y, gl, ge, chunk_n=3, block_v=block_v)
    ref_out, ref_g = grads(naive_token_logprobs, h, w, b, y, gl, ge)
    assert max_err(out, ref_out) <= 1e-12 and max_err(g, ref_g) <= 1e-12


def test_probabilities_over_all_targets_sum_to_one():
    # One hidden row scored against every vocabulary id: sum_v exp(logp_v) = 1
    # and -sum_v p_v logp_v must equal the entropy the op reports.
    vocab = 37
    h, w, b, _ = make(1, 5, vocab, bias=True, scale=2.0)
    rows = h.detach().expand(vocab, 5).contiguous()
    logp, ent = chunked_token_logprobs(
        rows,
        w.detach(),
        torch.arange(vocab),
        bias=b.detach(),
        temperature=1.7,
        return_entropy=True,
        chunk_n=8,
        block_v=5,
    )
    assert abs(logp.exp().sum().item() - 1.0) <= 1e-12
    assert abs(-(logp.exp() * logp).sum().item() - ent[0].item()) <= 1e-12
    assert torch.allclose(ent, ent[0].expand(vocab), rtol=0, atol=1e-14)


def test_ignore_index_rows_are_zero_and_get_no_grad():
    h, w, b, y = make(12, 8, 40, bias=True)
    y[[0, 5, 11]] = -100
    gl, ge = torch.randn(12, dtype=F64), torch.randn(12, dtype=F64)
    out, g = grads(token_logprobs, h, w, b, y, gl, ge, temperature=1.3)
    ref_out, ref_g = grads(naive_token_logprobs, h, w, b, y, gl, ge, temperature=1.3)
    for t in out:
        assert t[[0, 5, 11]].eq(0).all()
    assert g[0][[0, 5, 11]].eq(0).all()
    assert max_err(out, ref_out) <= 1e-12 and max_err(g, ref_g) <= 1e-12


def test_all_rows_ignored_gives_zeros_and_zero_grads():
    h, w, _, _ = make(4, 8, 40)
    logp, ent = token_logprobs(h, w, torch.full((4,), -1), ignore_index=-1, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert logp.eq(0).all() and ent.eq(0).all()
    assert h.grad.eq(0).all() and w.grad.eq(0).all()


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_single_output_gradients(which):
    h, w, b, y = make(21, 8, 70, bias=True)
    fn = chunked_token_logprobs
    logp, ent = fn(h, w, y, bias=b, temperature=0.9, return_entropy=True, chunk_n=8, block_v=16)
    ref_logp, ref_ent = naive_token_logprobs(h, w, y, bias=b, temperature=0.9, return_entropy=True)
    got = torch.autograd.grad((logp if which == "logp" else ent).sum(), (h, w, b))
    ref = torch.autograd.grad((ref_logp if which == "logp" else ref_ent).sum(), (h, w, b))
    assert max_err(got, ref) <= 1e-12


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).split(".")[-1]
        if name in ("mm", "addmm", "addmm_"):
            self.ops["matmul"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_frozen_weight_skips_the_dw_gemms(with_entropy):
    # 20 rows x 50 vocab in 8 x 16 tiles = 3 x 4 = 12 tiles. A trainable head costs
    # 3 GEMMs per tile in backward (recompute, dh, dW), a frozen one 2.
    counts = {}
    for trainable in (True, False):
        h, w, _, y = make(20, 8, 50)
        w.requires_grad_(trainable)
        logp, ent = chunked_token_logprobs(h, w, y, return_entropy=True, chunk_n=8, block_v=16)
        loss = logp.sum() + (ent.sum() if with_entropy else 0)
        with CountMatmuls() as mode:
            loss.backward()
        counts[trainable] = mode.ops["matmul"]
        assert (w.grad is None) != trainable
    assert counts == {True: 36, False: 24}


def test_bias_grads_match_naive_and_keep_dtype():
    h, w, b, y = make(30, 8, 45, torch.float32, bias=True)
    gl, ge = torch.randn(30), torch.randn(30)
    _, g = grads(token_logprobs, h, w, b, y, gl, ge, temperature=0.7)
    _, ref = grads(naive_token_logprobs, h, w, b, y, gl, ge, temperature=0.7)
    assert g[2].dtype == torch.float32
    torch.testing.assert_close(g[2], ref[2], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- wrapper
def test_token_logprobs_returns_fp32_and_single_tensor_by_default():
    h, w, _, y = make(10, 8, 30, torch.bfloat16)
    logp = token_logprobs(h, w, y)
    assert isinstance(logp, torch.Tensor) and logp.dtype == torch.float32 and logp.shape == (10,)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda h, w, y: (h.unsqueeze(0), w, y), "flatten"),
        (lambda h, w, y: (h, w[:, :-1], y), r"\[V, H\]"),
        (lambda h, w, y: (h, w, y.int()), "int64"),
        (lambda h, w, y: (h, w, y.clone().fill_(30)), "outside"),
        (lambda h, w, y: (h, w.float(), y), "share a dtype"),
    ],
)
def test_bad_inputs_are_rejected_with_a_fix(bad, match):
    h, w, _, y = make(10, 8, 30)
    with pytest.raises((ValueError, TypeError), match=match):
        token_logprobs(*bad(h, w, y))


def test_bad_temperature_and_impl_rejected():
    h, w, _, y = make(4, 8, 30)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(h, w, y, impl="cuda")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top1_flags_the_rows_whose_target_is_the_argmax(temperature):
    from trainers.kernels import token_stats

    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(50, 24, generator=gen), torch.randn(300, 24, generator=gen)
    logits = h @ w.t()
    y = torch.randint(0, 300, (50,), generator=gen)
    y[:25] = logits[:25].argmax(dim=1)  # hits spread over many vocabulary blocks
    y[[3, 30]] = -100
    out = token_stats(h, w, y, temperature=temperature, return_entropy=True)
    want = logits.argmax(dim=1) == y
    want[[3, 30]] = False
    assert out.top1.dtype == torch.bool and torch.equal(out.top1, want)
    assert 20 <= int(out.top1.sum()) <= 25
    assert not out.top1.requires_grad
    # small tiles: the maximum and the target fall in different chunks and blocks
    from trainers.kernels.chunked import ChunkedTokenLogprobs

    keep = y != -100
    _, _, tiled = ChunkedTokenLogprobs.apply(h[keep], w, None, y[keep], temperature, False, 7, 64)
    assert torch.equal(tiled, want[keep])


# ----------------------------------------------------------------------------- fused-head stats
def _head(h, w, b, y, **kw):
    from trainers.kernels import head_stats

    return head_stats(h, w, y, bias=b, impl="torch", **kw)


@pytest.mark.parametrize(
    "outputs,scale,temperature", [("both", 1.0, 1.0), ("both", 0.3, 0.7), ("entropy", 0.3, 0.7)]
)
def test_softcap_gradcheck_ragged_tiles(outputs, scale, temperature):
    # softcap 2 against logits of a few units: tanh is far from linear here
    h, w, b, y = make(9, 5, 23, bias=True, scale=3.0)

    def f(hh, ww, bb):
        st = _head(
            hh, ww, bb, y, temperature=temperature, logit_scale=scale, softcap=2.0,
            outputs=("entropy",), chunk_n=4, block_v=7,
        )  # fmt: skip
        return {"logp": (st.logp,), "entropy": (st.entropy,), "both": (st.logp, st.entropy)}[
            outputs
        ]

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_n,block_v", [(2, 3), (7, 50), (64, 1000)])
def test_head_stats_fp64_match_naive_tightly(softcap, chunk_n, block_v):
    from trainers.kernels.reference import naive_head_stats

    h, w, b, y = make(37, 16, 257, bias=True, scale=3.0)
    y[:12] = torch.addmm(b, h, w.t())[:12].argmax(-1)
    gl, ge = torch.randn(37, dtype=F64), torch.randn(37, dtype=F64)
    kw = {"temperature": 0.8, "logit_scale": 1.7, "softcap": softcap}
    st = _head(h, w, b, y, chunk_n=chunk_n, block_v=block_v, **kw)
    ref = naive_head_stats(h, w, y, bias=b, **kw)
    assert torch.equal(st.is_top1, ref["is_top1"]) and int(st.is_top1.sum()) >= 12
    got = (st.logp, st.entropy, st.log_sum_sq_probs, st.mean_logits)
    want = tuple(ref[k] for k in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"))
    assert max_err(got, want) <= 1e-10
    g = torch.autograd.grad((st.logp * gl).sum() + (st.entropy * ge).sum(), (h, w, b))
    r = torch.autograd.grad((ref["logp"] * gl).sum() + (ref["entropy"] * ge).sum(), (h, w, b))
    assert max_err(g, r) <= 1e-10


def test_log_sum_sq_probs_stays_finite_for_extreme_logits():
    from trainers.kernels.reference import naive_head_stats

    h, w, _, y = make(40, 8, 300, torch.float32, scale=300.0)  # |z| ~ 1e3
    st = _head(h, w, None, y, outputs=("log_sum_sq_probs",), chunk_n=16, block_v=64)
    ref = naive_head_stats(h.detach().double(), w.detach().double(), y)["log_sum_sq_probs"]
    assert torch.isfinite(st.log_sum_sq_probs).all() and st.log_sum_sq_probs.max() <= 0
    torch.testing.assert_close(st.log_sum_sq_probs.double(), ref, rtol=1e-4, atol=1e-4)


def test_top1_is_argmax_first_when_logits_tie():
    from trainers.kernels import token_stats
    from trainers.kernels.chunked import ChunkedTokenLogprobs

    w = torch.zeros(20, 2)
    w[[3, 9, 17]] = torch.tensor([1.0, 1.0])  # three equal maximal logits per row
    h = torch.ones(4, 2)
    y = torch.tensor([3, 9, 17, 0])
    for block_v in (2, 8, 64):
        _, _, top1 = ChunkedTokenLogprobs.apply(h, w, None, y, 1.0, False, 3, block_v)
        assert top1.tolist() == [True, False, False, False]
    assert token_stats(h, w, y).top1.tolist() == [True, False, False, False]


def test_mixed_dtypes_and_autocast_compute_in_fp32():
    h, w, b, y = make(30, 16, 200, torch.float32, bias=True)
    ref = _head(h, w, b, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head turns autocast off inside
        under = _head(h, w, b, y)
    assert under.logp.dtype == torch.float32 and torch.equal(under.logp, ref.logp)
    h16 = h.detach().bfloat16().requires_grad_()
    st = _head(h16, w, b, y, temperature=0.9)  # bf16 hidden, fp32 head: no common-dtype copy
    dh, dw = torch.autograd.grad(st.logp.sum() + st.entropy.sum(), (h16, w))
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32
    truth = _head(
        h16.detach().double(), w.detach().double(), b.detach().double(), y, temperature=0.9
    )
    torch.testing.assert_close(st.logp.double(), truth.logp, rtol=1e-5, atol=1e-5)


def test_gather_context_is_entered_around_the_backward():
    from contextlib import contextmanager

    entered = []

    @contextmanager
    def gather(weight, bias):
        entered.append((weight.shape, None if bias is None else bias.shape))
        yield

    h, w, b, y = make(8, 4, 30, bias=True)
    st = _head(h, w, b, y, gather=gather)
    assert entered == []  # the caller gathers around the forward; the backward recomputes
    (st.logp.sum() + st.entropy.sum()).backward()
    assert entered == [((30, 4), (30,))]
