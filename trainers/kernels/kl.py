"""Exact full-vocabulary ``KL(pi_theta || pi_ref)`` per token, without ``[N, V]`` logits.

What it computes. Two LM heads read the same token positions: the policy
(``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None) and the reference
model (its own last hidden state ``ref_hidden [N, H']``, ``ref_weight [V, H']``,
``ref_bias [V]`` or None). With temperature ``T`` dividing both heads' logits::

    z  = (hidden @ weight.T + bias) / T             p = softmax(z)   (pi_theta)
    z' = (ref_hidden @ ref_weight.T + ref_bias) / T  q = softmax(z')  (pi_ref)
    KL_i = sum_j p_ij (log p_ij - log q_ij) = sum_j p_ij (z_ij - z'_ij) - lse(z_i) + lse(z'_i)

as ``[N]`` fp32 (fp64 when any input is fp64), never holding more than one
``[chunk_n, block_v]`` tile of logits per model (plus one scratch tile).

Forward. Tokens are split into chunks of ``chunk_n`` rows, the vocabulary into
blocks of ``block_v`` columns; both heads' tiles of a block are projected and
reduced to per-row statistics relative to their own maxima ``m = max_j z_j`` and
``m' = max_j z'_j``::

    s  = sum_j e^{z_j - m}                      s' = sum_j e^{z'_j - m'}
    u  = sum_j e^{z_j - m} (z_j - m)            w  = sum_j e^{z_j - m} (z'_j - m')
    t  = u - w = sum_j e^{z_j - m} ((z_j - m) - (z'_j - m'))

``t`` is accumulated directly from the per-element difference, so two heads
that agree give ``t`` free of the cancellation ``u - w`` would suffer. Blocks are
folded together with the associative merge of ``chunked.py`` (``M = max(m1, m2)``,
``a_k = e^{m_k - M}``, and the same for the primed statistics)::

    s  = a1 s1 + a2 s2                          s' = a1' s1' + a2' s2'
    t  = a1 (t1 + d1 s1) + a2 (t2 + d2 s2),     d_k = (m_k - M) - (m'_k - M')

(re-basing a block's shifts from ``(m_k, m'_k)`` to ``(M, M')`` adds ``d_k`` to
every difference, weighted by the block's ``e^{z - m_k}``, which sum to ``s_k``).
At the end ``sum_j p_j (z_j - z'_j) = t / s + m - m'``, ``lse(z) = m + log s`` and
``lse(z') = m' + log s'``, so the large maxima cancel exactly on paper::

    KL = (t / s + m - m') - (m + log s) + (m' + log s') = t / s - log s + log s'

All three terms are O(spread of the logits within a row), not O(|z|), so logits
~1e3 stay accurate. Identical heads give exactly 0 (same bits on both sides);
otherwise KL >= 0 up to rounding (it is not clamped, to keep the gradient exact).

Backward. With ``log p_j = z_j - lse``, ``d lse / d z_j = p_j`` and
``d p_k / d z_j = p_k ([k = j] - p_j)``::

    d KL / d z_j = sum_k p_k ([k = j] - p_j)(log p_k - log q_k) + sum_k p_k ([k = j] - p_j)
                 = p_j (log p_j - log q_j) - p_j KL + (p_j - p_j)
                 = p_j ((z_j - lse) - (z'_j - lse') - KL)

Only the policy gets gradients: the reference head is treated as FROZEN, its
inputs (``ref_hidden``, ``ref_weight``, ``ref_bias``) always get None, even when
they require grad (detach them or run it under no_grad; no error is raised).
With the upstream per-token grad ``g`` and ``h_s = h / T``: ``dh = g (dz W) / T``,
``dW = dz^T (g h_s)``, ``db = (dz^T g) / T``. Each block's two tiles are
recomputed from the saved ``lse``, ``lse'`` and ``KL``; ``g`` is applied to the
``[n, H]`` rows, not the tile. GEMMs whose gradient is not needed are skipped.
Accumulation is fp32 (fp64 for fp64) and the grads are cast to the input dtypes.

Shapes: hidden ``[N, H]``, weight ``[V, H]``, ref_hidden ``[N, H']``,
ref_weight ``[V, H']``, biases ``[V]`` or None. Saved for backward: the inputs
plus ``lse``, ``lse'``, ``KL`` (O(N)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .chunked import DEFAULT_BLOCK_V, DEFAULT_CHUNK_N, _Buffers, _project, _scaled_rows
from .reference import output_dtype

__all__ = ["ChunkedTokenKL", "token_kl"]


class _Head(NamedTuple):
    """One LM head prepared for tiling: (weight, scaled bias or None, buffers)."""

    weight: torch.Tensor
    bias_s: torch.Tensor | None
    bufs: _Buffers


def _head(hidden, weight, bias, dtype, pre, chunk_n, block_v, names) -> _Head:
    n, vocab = min(chunk_n, hidden.shape[0]), min(block_v, weight.shape[0])
    bufs = _Buffers(
        n, vocab, hidden.shape[1], dtype, hidden.device, names=names, weight_dtype=weight.dtype
    )
    bias_s = None if bias is None else bias.to(dtype) * pre
    return _Head(weight, bias_s, bufs)


def _tile(head: _Head, name: str, h_s, v0: int, v1: int):
    """(``[n, v1 - v0]`` logits of ``head`` for rows ``h_s`` (scaled by 1/T), tiles, W block)."""
    tiles = head.bufs.tiles(h_s.shape[0], v1 - v0)
    w_blk = head.bufs.weight_block(head.weight, v0, v1)
    b_blk = None if head.bias_s is None else head.bias_s[v0:v1]
    return _project(tiles[name], h_s, w_blk, b_blk, None), tiles, w_blk


def _kl_tile_stats(z, zr, spare):
    """(m, s, t, m', s') of one block; destroys both tiles."""
    m, mr = z.amax(dim=1), zr.amax(dim=1)
    zs, zrs = z.sub_(m.unsqueeze(1)), zr.sub_(mr.unsqueeze(1))
    sr = torch.exp(zrs, out=spare).sum(dim=1)
    diff = torch.sub(zs, zrs, out=zrs)  # (z - m) - (z' - m')
    e = zs.exp_()
    s = e.sum(dim=1)
    t = e.mul_(diff).sum(dim=1)
    return m, s, t, mr, sr


def _kl_merge(run, new):
    """Associative merge of (m, s, t, m', s'); ``run`` is None on the first block."""
    if run is None:
        return new
    (m1, s1, t1, r1, q1), (m2, s2, t2, r2, q2) = run, new
    m, mr = torch.maximum(m1, m2), torch.maximum(r1, r2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    d1, d2 = (m1 - m) - (r1 - mr), (m2 - m) - (r2 - mr)
    s = a1 * s1 + a2 * s2
    t = a1 * (t1 + d1 * s1) + a2 * (t2 + d2 * s2)
    sr = torch.exp(r1 - mr) * q1 + torch.exp(r2 - mr) * q2
    return m, s, t, mr, sr


def kl_forward(policy, reference, pre, chunk_n, block_v):
    """``(kl, lse, lse_ref)``, each ``[N]``; ``policy``/``reference`` are (hidden, weight, bias)."""
    (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias) = policy, reference
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = _compute_dtype(hidden, weight, ref_hidden, ref_weight)
    pol = _head(hidden, weight, bias, dtype, pre, chunk_n, block_v, ("z", "spare"))
    ref = _head(ref_hidden, ref_weight, ref_bias, dtype, pre, chunk_n, block_v, ("z",))
    kl, lse, lse_ref = (torch.empty(n_rows, dtype=dtype, device=hidden.device) for _ in range(3))
    for n0 in range(0, n_rows, chunk_n):
        rows = slice(n0, min(n0 + chunk_n, n_rows))
        h_s = _scaled_rows(hidden[rows], dtype, pre)
        hr_s = _scaled_rows(ref_hidden[rows], dtype, pre)
        run = None
        for v0 in range(0, vocab, block_v):
            v1 = min(v0 + block_v, vocab)
            z, tiles, _ = _tile(pol, "z", h_s, v0, v1)
            zr, _, _ = _tile(ref, "z", hr_s, v0, v1)
            run = _kl_merge(run, _kl_tile_stats(z, zr, tiles["spare"]))
        m, s, t, mr, sr = run
        log_s, log_sr = torch.log(s), torch.log(sr)
        kl[rows] = t / s - log_s + log_sr
        lse[rows], lse_ref[rows] = m + log_s, mr + log_sr
    return kl, lse, lse_ref


def _compute_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return output_dtype(dtype)


def kl_backward(saved, grad_kl, needs, pre, chunk_n, block_v):
    """Policy grads (dh, dW, db) in fp32/fp64 accumulators; None where not needed.

    ``saved`` is ``(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, lse, lse_ref)``.
    """
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, kl, lse, lse_ref = saved
    n_rows, vocab, hdim = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dtype, dev = kl.dtype, hidden.device
    g = grad_kl.to(dtype)
    dh, dw, db = (
        torch.zeros(shape, dtype=dtype, device=dev) if need else None
        for need, shape in zip(needs, ((n_rows, hdim), (vocab, hdim), (vocab,)), strict=True)
    )
    pol = _head(hidden, weight, bias, dtype, pre, chunk_n, block_v, ("z",))
    ref = _head(ref_hidden, ref_weight, ref_bias, dtype, pre, chunk_n, block_v, ("z",))
    for n0 in range(0, n_rows, chunk_n):
        rows = slice(n0, min(n0 + chunk_n, n_rows))
        h_s = _scaled_rows(hidden[rows], dtype, pre)
        hr_s = _scaled_rows(ref_hidden[rows], dtype, pre)
        g_c = g[rows]
        h_dw = None if dw is None else h_s * g_c.unsqueeze(1)
        dh_c = None if dh is None else dh[rows]
        for v0 in range(0, vocab, block_v):
            v1 = min(v0 + block_v, vocab)
            z, _, w_blk = _tile(pol, "z", h_s, v0, v1)
            zr, _, _ = _tile(ref, "z", hr_s, v0, v1)
            dz = _dz_tile(z, zr, lse[rows], lse_ref[rows], kl[rows])
            if dh_c is not None:
                dh_c.addmm_(dz, w_blk)
            if dw is not None:
                dw[v0:v1].addmm_(dz.t(), h_dw)
            if db is not None:
                db[v0:v1] += (dz.t() @ g_c) * pre
        if dh_c is not None:
            dh_c.mul_((g_c * pre).unsqueeze(1))
    return dh, dw, db


def _dz_tile(z, zr, lse, lse_ref, kl):
    """In place: ``p ((z - lse) - (z' - lse') - KL)`` (the upstream grad is applied later)."""
    logp = z.sub_(lse.unsqueeze(1))
    diff = torch.sub(logp, zr.sub_(lse_ref.unsqueeze(1)), out=zr).sub_(kl.unsqueeze(1))
    return logp.exp_().mul_(diff)


class ChunkedTokenKL(torch.autograd.Function):
    """autograd wrapper of ``kl_forward`` / ``kl_backward``.

    ``apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_n,
    block_v)`` returns ``kl [N]``. The reference inputs never receive gradients.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, chunk_n,
        block_v,
    ):  # fmt: skip
        ctx.set_materialize_grads(False)
        pre = 1.0 / temperature
        policy, reference = (hidden, weight, bias), (ref_hidden, ref_weight, ref_bias)
        kl, lse, lse_ref = kl_forward(policy, reference, pre, chunk_n, block_v)
        ctx.save_for_backward(*policy, *reference, kl, lse, lse_ref)
        ctx.config = (pre, chunk_n, block_v)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        needs = ctx.needs_input_grad[:3]
        if grad_kl is None or not any(needs):
            return (None,) * 9
        saved = ctx.saved_tensors
        dh, dw, db = kl_backward(saved, grad_kl, needs, *ctx.config)
        hidden, weight, bias = saved[:3]
        dh = None if dh is None else dh.to(hidden.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None


def _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature):
    for name, h, w in (("", hidden, weight), ("ref_", ref_hidden, ref_weight)):
        if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(
                f"expected {name}hidden [N, H] and {name}weight [V, H], got "
                f"{tuple(h.shape)} and {tuple(w.shape)}"
            )
    if ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"policy and reference must share N and V, got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}, ref_hidden {tuple(ref_hidden.shape)}, "
            f"ref_weight {tuple(ref_weight.shape)}"
        )
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None and b.shape != (weight.shape[0],):
            raise ValueError(f"{name} must be [V={weight.shape[0]}], got {tuple(b.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_n: int = DEFAULT_CHUNK_N,
    block_v: int = DEFAULT_BLOCK_V,
) -> torch.Tensor:
    """Per-token ``KL(softmax(z) || softmax(z'))`` over the full vocabulary (see module doc).

    Args:
        hidden, weight, bias: the policy head, ``[N, H]``, ``[V, H]``, ``[V]`` or None.
        ref_hidden, ref_weight, ref_bias: the frozen reference head, ``[N, H']``,
            ``[V, H']``, ``[V]`` or None; never receives gradients.
        temperature: divides both heads' logits (> 0).
        chunk_n, block_v: tile sizes (rows, vocabulary columns).

    Returns:
        ``kl [N]``, fp32 (fp64 when an input is fp64); gradients reach hidden, weight
        and bias in their own dtypes.
    """
    _check_kl_inputs(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature)
    if chunk_n < 1 or block_v < 1:
        raise ValueError(f"chunk_n and block_v must be >= 1, got {chunk_n} and {block_v}")
    return ChunkedTokenKL.apply(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, float(temperature), int(chunk_n),
        int(block_v),
    )  # fmt: skip
