"""Chunked plain-torch "linear -> token log-prob (+ entropy, ...)": CPU path and test oracle.

What it computes. With ``r = hidden @ weight.T + bias`` and a ``LogitTransform``
(logit scale ``s``, optional soft-cap ``c``, temperature ``T``), the logits are::

    z = r s / T                          (no soft-cap)
    z = (c / T) tanh(r s / c)            (soft-cap c: Gemma 2's final_logit_softcapping)

and per token (row ``i``, target ``y_i``)::

    logp_i = z_{i,y_i} - lse_i,          lse_i = log sum_j exp(z_ij)
    H_i    = -sum_j p_ij log p_ij,       p_ij  = exp(z_ij - lse_i)
    Q_i    = log sum_j p_ij^2            ("log_sum_sq_probs", no gradient)
    mean_i = (1 / V) sum_j z_ij          ("mean_logits", no gradient)
    top1_i = y_i is the first index of the row maximum (argmax semantics: a tie
             with an EARLIER index does not count; no gradient)

without ever holding more than one ``[chunk_n, block_v]`` tile of logits. Both
transforms are one code path: the GEMM computes ``r' = (h pre) W^T + b pre`` with
``pre = s / T`` (no soft-cap) or ``pre = s / c``; a soft-capped tile is then
replaced by ``z = cap tanh(r')`` with ``cap = c / T``.

Forward. Tokens are split into chunks of ``chunk_n`` rows and the vocabulary
into blocks of ``block_v`` columns. Each tile is reduced to per-row statistics
relative to its maximum ``m``: ``s = sum_j e^{z_j - m}``, ``u = sum_j e^{z_j - m}
(z_j - m)``, ``q = sum_j e^{2 (z_j - m)}``, folded into the running ones by the
associative merge (``M = max(m1, m2)``, ``a_k = e^{m_k - M}``)::

    s = a1 s1 + a2 s2     u = a1 (u1 + (m1 - M) s1) + a2 (u2 + (m2 - M) s2)     q = a1² q1 + a2² q2

At the end ``lse = m + log s``, ``H = log s - u / s`` and ``Q = log q - 2 log s``;
the shifted ``u`` stays small even for logits ~1e3, where ``lse - sum_j p_j z_j``
would cancel. The first index of the running maximum is carried along (a later
block wins only with a strictly larger maximum); the target logit is gathered
from the tile that holds it. Without a soft-cap ``mean`` is linear in ``h``:
``(h . mean_j W_j + mean_j b_j) pre``; with one, the tiles' row sums are added.
No gradient is formed in the forward.

Backward. Per row (index i dropped), with d lse / d z_j = p_j and
d p_k / d z_j = p_k ([k = j] - p_j)::

    d logp_y / d z_j = [j = y] - p_j
    d H / d z_j = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + H)

so with upstream per-token grads ``g`` (of logp) and ``e`` (of H)::

    dz_j = p_j (alpha + beta log p_j) + g [j = y],    alpha = -g - e H,  beta = -e

The chain rule through the transform gives ``dr'_j = dz_j J_j`` with ``J = 1``
(no soft-cap) or ``J = cap (1 - tanh² r'_j) = cap - z_j² / cap``, then
``dh = dr' W pre``, ``dW = dr'^T h pre``, ``db = sum_i dr'_i pre``. Each tile is
recomputed, turned into ``p (alpha + beta log p) J`` in place, and fed to the two
gradient GEMMs. The one-hot term never touches a tile: it is ``g_i J_{i,y_i}
W[y_i]`` for dh and an ``index_add`` of ``g_i J_{i,y_i} h_i`` rows into dW
(``J_{i,y_i}`` from the saved target logit). Without an entropy grad
(``beta = 0``) ``alpha`` is a per-row scale, so it is applied to ``h`` (for dW)
and to the ``[n, H]`` result (for dh) and the tile only needs ``exp(z - lse) J``.
GEMMs whose gradient is not needed (frozen head: ``needs_input_grad``) are
skipped. Everything accumulates in fp32 (fp64 when an input is fp64) and the
grads are cast back to the input dtypes; hidden and weight may differ in dtype.

Shapes: hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets
``[N]`` int64, all in ``[0, V)`` (``token_logprobs`` in ``__init__`` removes
``ignore_index`` rows before calling in). Outputs are ``[N]`` fp32 (fp64 for
fp64 inputs). Saved for backward: the inputs plus ``lse``, ``H`` and, with a
soft-cap, the target logits (O(N)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .reference import output_dtype

# Measured on 2 AVX-512 cores (bench/kernels.py); see docs/algorithms/kernels.md.
DEFAULT_CHUNK_N = 1024
DEFAULT_BLOCK_V = 2048
# Optional per-token statistics of ``chunked_forward`` (besides logp and lse).
STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class LogitTransform:
    """``z = r scale / T``, or ``(softcap / T) tanh(r scale / softcap)`` when soft-capped."""

    temperature: float = 1.0
    scale: float = 1.0
    softcap: float | None = None

    @property
    def pre(self) -> float:
        """The factor applied to ``h`` and ``b`` before the GEMM."""
        return self.scale / (self.softcap or self.temperature)

    @property
    def cap(self) -> float | None:
        """The factor on ``tanh`` after the GEMM, or None without a soft-cap."""
        return self.softcap / self.temperature if self.softcap else None


class ChunkedStats(NamedTuple):
    """``[N]`` results of ``chunked_forward``; the optional ones are None unless asked for."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None
    target_z: torch.Tensor


class _Buffers:
    """Named scratch tiles reused across all chunks (the CPU allocator does not cache).

    Tiles are handed out as contiguous ``[n, v]`` views of flat storage, so the
    ragged last chunk/block is as dense as the others.
    """

    def __init__(self, n: int, v: int, hdim: int, dtype, device, *, names, weight_dtype):
        kw = {"dtype": dtype, "device": device}
        self._flat = {name: torch.empty(n * v, **kw) for name in names}
        self.w = torch.empty(v, hdim, **kw) if weight_dtype != dtype else None

    def tiles(self, n: int, v: int) -> dict[str, torch.Tensor]:
        return {name: flat[: n * v].view(n, v) for name, flat in self._flat.items()}

    def weight_block(self, weight: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        block = weight[v0:v1]
        if self.w is None:
            return block
        return self.w[: v1 - v0].copy_(block)


def _scaled_rows(hidden: torch.Tensor, dtype: torch.dtype, pre: float) -> torch.Tensor:
    """``hidden * pre`` in the compute dtype (a view when nothing changes)."""
    rows = hidden.to(dtype)
    return rows * pre if pre != 1.0 else rows


def _project(tile, h_scaled, w_block, bias_scaled, cap) -> torch.Tensor:
    """tile <- z of this tile: ``h_scaled @ w_block.T (+ bias_scaled)``, soft-capped if ``cap``."""
    if bias_scaled is None:
        torch.mm(h_scaled, w_block.t(), out=tile)
    else:
        torch.addmm(bias_scaled, h_scaled, w_block.t(), out=tile)
    return tile if cap is None else tile.tanh_().mul_(cap)


def _tile_stats(tile, spare, v0: int, want_u: bool, want_q: bool, want_idx: bool):
    """(m, s, u, q, first argmax) of one tile; destroys it (leaves z - m or e^{z-m})."""
    if want_idx:
        m, idx = tile.max(dim=1)  # ties: the first maximal index
        idx = idx + v0
    else:
        m, idx = tile.amax(dim=1), None
    tile.sub_(m.unsqueeze(1))
    e = torch.exp(tile, out=spare) if want_u else tile.exp_()
    s = e.sum(dim=1)
    q = torch.linalg.vector_norm(e, dim=1).square() if want_q else None
    u = e.mul_(tile).sum(dim=1) if want_u else None
    return m, s, u, q, idx


def _merge(run, new):
    """Associative merge of (m, s, u, q, idx) statistics; ``run`` is None on the first block."""
    if run is None:
        return new
    (m1, s1, u1, q1, i1), (m2, s2, u2, q2, i2) = run, new
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    s = a1 * s1 + a2 * s2
    u = None if u1 is None else a1 * (u1 + (m1 - m) * s1) + a2 * (u2 + (m2 - m) * s2)
    q = None if q1 is None else a1 * a1 * q1 + a2 * a2 * q2
    idx = None if i1 is None else torch.where(m2 > m1, i2, i1)  # earlier block wins ties
    return m, s, u, q, idx


def _gather_target(tile, targets, v0: int, current):
    """Target logits of the rows whose target lies in this tile's columns."""
    local = targets - v0
    inside = (local >= 0) & (local < tile.shape[1])
    picked = tile.gather(1, local.clamp(0, tile.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(inside, picked, current)


def linear_mean_logits(hidden, weight, bias, dtype, pre: float, block_v: int = DEFAULT_BLOCK_V):
    """``(h . mean_j W_j + mean_j b_j) pre``: the mean logit when z is linear in r (no grad)."""
    with torch.no_grad():
        vocab = weight.shape[0]
        w_sum = torch.zeros(weight.shape[1], dtype=dtype, device=weight.device)
        for v0 in range(0, vocab, block_v):  # no full-size copy of a low-precision weight
            w_sum += weight[v0 : v0 + block_v].to(dtype).sum(dim=0)
        mean = hidden.to(dtype) @ (w_sum / vocab)
        if bias is not None:
            mean = mean + bias.to(dtype).mean()
        return mean * pre


def chunked_forward(hidden, weight, bias, targets, transform, want, chunk_n, block_v):
    """``ChunkedStats`` of every row; ``want`` lists the optional ``STATS`` to compute."""
    n_rows, vocab, hdim = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dtype = output_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    flags = {name: name in want for name in STATS}
    out = {n: torch.empty(n_rows, dtype=dtype, device=hidden.device) for n in STATS[:2] if flags[n]}
    lse = torch.empty(n_rows, dtype=dtype, device=hidden.device)
    target_z = torch.zeros_like(lse)
    top1 = torch.zeros(n_rows, dtype=torch.bool, device=hidden.device)
    sum_z = torch.zeros_like(lse) if flags["mean_logits"] and transform.cap else None
    names = ("z", "spare") if flags["entropy"] else ("z",)
    bufs = _Buffers(
        min(chunk_n, n_rows), min(block_v, vocab), hdim, dtype, hidden.device,
        names=names, weight_dtype=weight.dtype,
    )  # fmt: skip
    bias_s = None if bias is None else bias.to(dtype) * transform.pre
    for n0 in range(0, n_rows, chunk_n):
        rows = slice(n0, min(n0 + chunk_n, n_rows))
        h_s, tgt, run = _scaled_rows(hidden[rows], dtype, transform.pre), targets[rows], None
        for v0 in range(0, vocab, block_v):
            v1 = min(v0 + block_v, vocab)
            tiles = bufs.tiles(h_s.shape[0], v1 - v0)
            w_blk = bufs.weight_block(weight, v0, v1)
            b_blk = None if bias_s is None else bias_s[v0:v1]
            tile = _project(tiles["z"], h_s, w_blk, b_blk, transform.cap)
            target_z[rows] = _gather_target(tile, tgt, v0, target_z[rows])
            if sum_z is not None:
                sum_z[rows] += tile.sum(dim=1)
            want_stats = (flags["entropy"], flags["log_sum_sq_probs"], flags["is_top1"])
            run = _merge(run, _tile_stats(tile, tiles.get("spare"), v0, *want_stats))
        m, s, u, q, idx = run
        log_s = torch.log(s)
        lse[rows] = m + log_s
        if u is not None:
            out["entropy"][rows] = log_s - u / s
        if q is not None:
            out["log_sum_sq_probs"][rows] = torch.log(q) - 2 * log_s
        if idx is not None:
            top1[rows] = idx == tgt
    mean = None
    if flags["mean_logits"]:
        pre = transform.pre
        mean = sum_z / vocab if sum_z is not None else linear_mean_logits(
            hidden, weight, bias, dtype, pre, block_v
        )  # fmt: skip
    return ChunkedStats(
        target_z - lse,
        lse,
        out.get("entropy"),
        out.get("log_sum_sq_probs"),
        mean,
        top1 if flags["is_top1"] else None,
        target_z,
    )


def _row_coefficients(grad_logp, grad_ent, entropy, n_rows, dtype, device):
    """alpha = -g - e H and beta = -e (None when there is no entropy grad)."""
    g = None if grad_logp is None else grad_logp.to(dtype)
    alpha = torch.zeros(n_rows, dtype=dtype, device=device) if g is None else -g
    if grad_ent is None:
        return g, alpha, None
    e = grad_ent.to(dtype)
    return g, alpha - e * entropy, -e


def _dz_tile(tile, spare, lse, alpha, beta):
    """In place: z -> p (alpha + beta log p), or just p when beta is None."""
    logp = tile.sub_(lse.unsqueeze(1))
    if beta is None:
        return logp.exp_()
    p = torch.exp(logp, out=spare)
    torch.addcmul(alpha.unsqueeze(1), beta.unsqueeze(1), logp, out=logp)
    return logp.mul_(p)


def _softcap_jacobian(z, out, cap: float) -> torch.Tensor:
    """``dz / dr' = cap (1 - tanh² r') = cap - z² / cap``, written to ``out``."""
    return torch.mul(z, z, out=out).mul_(-1.0 / cap).add_(cap)


class _Consts(NamedTuple):
    """What every backward chunk shares."""

    weight: torch.Tensor
    bias_s: torch.Tensor | None
    bufs: _Buffers
    pre: float
    cap: float | None
    block_v: int


def chunked_backward(saved, grad_logp, grad_ent, needs, transform, chunk_n, block_v):
    """Grads (dh, dW, db) in fp32/fp64 accumulators; None where not needed.

    ``saved`` is ``(hidden, weight, bias, targets, lse, entropy, target_z)``; ``target_z``
    is only read with a soft-cap, ``entropy`` only with an entropy grad.
    """
    hidden, weight, bias, targets, lse, entropy, target_z = saved
    n_rows, vocab, hdim = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dtype, dev, cap = lse.dtype, hidden.device, transform.cap
    g, alpha, beta = _row_coefficients(grad_logp, grad_ent, entropy, n_rows, dtype, dev)
    if g is not None and cap is not None:  # the one-hot term goes through J at the target
        g = g * _softcap_jacobian(target_z.to(dtype), torch.empty_like(target_z, dtype=dtype), cap)
    grads = tuple(
        torch.zeros(shape, dtype=dtype, device=dev) if need else None
        for need, shape in zip(needs, ((n_rows, hdim), (vocab, hdim), (vocab,)), strict=True)
    )
    names = ("z", *(("spare",) if beta is not None else ()), *(("jac",) if cap else ()))
    bufs = _Buffers(
        min(chunk_n, n_rows), min(block_v, vocab), hdim, dtype, dev,
        names=names, weight_dtype=weight.dtype,
    )  # fmt: skip
    bias_s = None if bias is None else bias.to(dtype) * transform.pre
    consts = _Consts(weight, bias_s, bufs, transform.pre, cap, block_v)
    for n0 in range(0, n_rows, chunk_n):
        rows = slice(n0, min(n0 + chunk_n, n_rows))
        coefs = (alpha[rows], None if beta is None else beta[rows], None if g is None else g[rows])
        _backward_chunk(hidden[rows], targets[rows], lse[rows], coefs, grads, rows, consts)
    return grads


def _backward_chunk(hidden, targets, lse, coefs, grads, rows, k: _Consts):
    """Adds one chunk of rows' contributions to grads = (dh, dW, db)."""
    (a, b, g), (dh, dw, db) = coefs, grads
    n, vocab = hidden.shape[0], k.weight.shape[0]
    h_s = _scaled_rows(hidden, lse.dtype, k.pre)
    dh_c = None if dh is None else dh[rows]
    # dW multiplies each tile by h pre, pre-scaled by alpha when alpha is a pure row scale.
    h_dw = None if dw is None else (h_s if b is not None else h_s * a.unsqueeze(1))
    for v0 in range(0, vocab, k.block_v):
        v1 = min(v0 + k.block_v, vocab)
        w_blk = k.bufs.weight_block(k.weight, v0, v1)
        tiles = k.bufs.tiles(n, v1 - v0)
        b_blk = None if k.bias_s is None else k.bias_s[v0:v1]
        tile = _project(tiles["z"], h_s, w_blk, b_blk, k.cap)
        jac = None if k.cap is None else _softcap_jacobian(tile, tiles["jac"], k.cap)
        dz = _dz_tile(tile, tiles.get("spare"), lse, a, b)
        if jac is not None:
            dz.mul_(jac)
        if dh_c is not None:
            dh_c.addmm_(dz, w_blk)
        if dw is not None:
            dw[v0:v1].addmm_(dz.t(), h_dw)
        if db is not None:
            db[v0:v1] += (dz.t() @ a if b is None else dz.sum(dim=0)) * k.pre
    if dh_c is not None and b is None:
        dh_c.mul_((a * k.pre).unsqueeze(1))
    elif dh_c is not None and k.pre != 1.0:
        dh_c.mul_(k.pre)
    if g is not None:
        _add_onehot_grads(g, h_s, k.weight, targets, dh_c, dw, db, k.pre)


def _add_onehot_grads(g, h_s, weight, targets, dh_c, dw, db, pre):
    """The ``g_i [j = y_i]`` part of dr' (``g`` already has J): one vocabulary row per token."""
    if dh_c is not None:
        w_rows = weight.index_select(0, targets).to(dh_c.dtype)
        dh_c.addcmul_((g * pre).unsqueeze(1), w_rows)
    if dw is not None:
        dw.index_add_(0, targets, h_s * g.unsqueeze(1))
    if db is not None:
        db.index_add_(0, targets, g * pre)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """autograd wrapper of ``chunked_forward`` / ``chunked_backward`` at a plain temperature.

    ``apply(hidden, weight, bias, targets, temperature, want_entropy, chunk_n, block_v,
    want_top1=True)`` returns ``(logp, entropy, top1)``; ``entropy`` is None unless
    ``want_entropy``, ``top1`` (bool, argmax semantics, not differentiable) None unless
    ``want_top1``.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, want_entropy, chunk_n, block_v,
        want_top1=True,
    ):  # fmt: skip
        ctx.set_materialize_grads(False)
        want = [name for name, on in (("entropy", want_entropy), ("is_top1", want_top1)) if on]
        transform = LogitTransform(temperature)
        st = chunked_forward(hidden, weight, bias, targets, transform, want, chunk_n, block_v)
        ctx.save_for_backward(hidden, weight, bias, targets, st.lse, st.entropy)
        ctx.config = (transform, chunk_n, block_v)
        if st.is_top1 is not None:
            ctx.mark_non_differentiable(st.is_top1)
        return st.logp, st.entropy, st.is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_top1=None):
        if grad_logp is None and grad_ent is None:
            return (None,) * 9
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        transform, chunk_n, block_v = ctx.config
        saved = (hidden, weight, bias, targets, lse, entropy, None)
        dh, dw, db = chunked_backward(
            saved, grad_logp, grad_ent, ctx.needs_input_grad[:3], transform, chunk_n, block_v
        )
        dh = None if dh is None else dh.to(hidden.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None


def chunked_token_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    return_entropy=False,
    chunk_n=DEFAULT_CHUNK_N,
    block_v=DEFAULT_BLOCK_V,
):
    """Functional form of ``ChunkedTokenLogprobs`` (targets must all be in ``[0, V)``)."""
    logp, entropy, _ = ChunkedTokenLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), bool(return_entropy), chunk_n,
        block_v, False,
    )  # fmt: skip
    return (logp, entropy) if return_entropy else logp
