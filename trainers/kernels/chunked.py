"""Chunked plain-torch "linear -> token log-prob (+ entropy)": CPU path and test oracle.

What it computes, for ``z = (hidden @ weight.T + bias) / T`` (``T`` = temperature)::

    logp_i = z_{i,y_i} - lse_i,          lse_i = log sum_j exp(z_ij)
    H_i    = -sum_j p_ij log p_ij,       p_ij  = exp(z_ij - lse_i)

without ever holding more than one ``[chunk_n, block_v]`` tile of logits.

Forward. Tokens are split into chunks of ``chunk_n`` rows and the vocabulary
into blocks of ``block_v`` columns. Each tile of logits is reduced to per-row
statistics taken relative to the tile maximum ``m``::

    s = sum_j e^{z_j - m}          u = sum_j e^{z_j - m} (z_j - m)

and folded into the running statistics of its rows by the associative merge
(``M = max(m1, m2)``, ``a_k = e^{m_k - M}``)::

    s = a1 s1 + a2 s2              u = a1 (u1 + (m1 - M) s1) + a2 (u2 + (m2 - M) s2)

At the end ``lse = m + log s`` and ``H = log s - u / s``. This "shifted" form
keeps ``u`` small even for logits of magnitude ~1e3, where the unshifted
``lse - sum_j p_j z_j`` would cancel catastrophically. The target logit is
gathered from the tile that holds it. No gradient is formed in the forward.

Backward. Per row (index i dropped), with d lse / d z_j = p_j and
d p_k / d z_j = p_k ([k = j] - p_j)::

    d logp_y / d z_j = [j = y] - p_j
    H = lse - sum_k p_k z_k
    d H / d z_j = p_j - p_j - sum_k z_k p_k ([k = j] - p_j)
                = -p_j (z_j - sum_k p_k z_k) = -p_j (z_j - lse + H) = -p_j (log p_j + H)

so with upstream per-token grads ``g`` (of logp) and ``e`` (of H)::

    dz_j = g ([j = y] - p_j) - e p_j (log p_j + H)
         = p_j (alpha + beta log p_j) + g [j = y],    alpha = -g - e H,  beta = -e

and the chain rule through ``z = r / T`` with ``r = h W^T + b`` gives
``dh = dz W / T``, ``dW = dz^T h / T``, ``db = sum_i dz_i / T``. Each tile is
recomputed, turned into ``p (alpha + beta log p)`` in place, and fed to the two
gradient GEMMs. The one-hot term never touches a tile: it is ``g_i W[y_i]`` for
dh and an ``index_add`` of ``g_i h_i`` rows into dW. Without an entropy grad
(``beta = 0``) ``alpha`` is a per-row scale, so it is applied to ``h`` (for dW)
and to the ``[n, H]`` result (for dh) and the tile only needs ``exp(z - lse)``.
GEMMs whose gradient is not needed (frozen head: ``needs_input_grad``) are
skipped. Everything accumulates in fp32 (fp64 for fp64 inputs) and the grads
are cast back to the input dtypes.

Shapes: hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets
``[N]`` int64, all in ``[0, V)`` (``token_logprobs`` in ``__init__`` removes
``ignore_index`` rows before calling in). Outputs are ``[N]`` fp32 (fp64 for
fp64 inputs). Saved for backward: the inputs plus ``lse`` and ``H`` (O(N)).
"""

from __future__ import annotations

import torch

from .reference import output_dtype

# Measured on 2 AVX-512 cores (bench/kernels.py); see KERNELS.md section 7.
DEFAULT_CHUNK_N = 1024
DEFAULT_BLOCK_V = 2048


class _Buffers:
    """Scratch tiles reused across all chunks (the CPU allocator does not cache).

    Tiles are handed out as contiguous ``[n, v]`` views of flat storage, so the
    ragged last chunk/block is as dense as the others.
    """

    def __init__(self, n: int, v: int, hdim: int, dtype, device, *, second: bool, weight_dtype):
        kw = {"dtype": dtype, "device": device}
        self._flat = [torch.empty(n * v, **kw) for _ in range(2 if second else 1)]
        self.w = torch.empty(v, hdim, **kw) if weight_dtype != dtype else None

    def tiles(self, n: int, v: int):
        """(tile, spare or None), both contiguous ``[n, v]``."""
        views = [flat[: n * v].view(n, v) for flat in self._flat]
        return views[0], (views[1] if len(views) > 1 else None)

    def weight_block(self, weight: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        block = weight[v0:v1]
        if self.w is None:
            return block
        return self.w[: v1 - v0].copy_(block)


def _scaled_rows(hidden: torch.Tensor, dtype: torch.dtype, inv_t: float) -> torch.Tensor:
    """``hidden / T`` in the compute dtype (a view when nothing changes)."""
    rows = hidden.to(dtype)
    return rows * inv_t if inv_t != 1.0 else rows


def _project(tile, h_scaled, w_block, bias_scaled) -> torch.Tensor:
    """tile <- h_scaled @ w_block.T (+ bias_scaled) = z for this tile."""
    if bias_scaled is None:
        return torch.mm(h_scaled, w_block.t(), out=tile)
    return torch.addmm(bias_scaled, h_scaled, w_block.t(), out=tile)


def _tile_stats(tile, spare, want_u: bool):
    """Row max m, s and u of one tile; destroys the tile (leaves z - m or e^{z-m})."""
    m = tile.amax(dim=1)
    tile.sub_(m.unsqueeze(1))
    if not want_u:
        return m, tile.exp_().sum(dim=1), None
    e = torch.exp(tile, out=spare)
    s = e.sum(dim=1)
    u = e.mul_(tile).sum(dim=1)
    return m, s, u


def _merge(run, new):
    """Associative merge of (m, s, u) statistics; ``run`` is None on the first block."""
    if run is None:
        return new
    (m1, s1, u1), (m2, s2, u2) = run, new
    m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - m), torch.exp(m2 - m)
    s = a1 * s1 + a2 * s2
    u = None if u1 is None else a1 * (u1 + (m1 - m) * s1) + a2 * (u2 + (m2 - m) * s2)
    return m, s, u


def _gather_target(tile, targets, v0: int, current):
    """Target logits of the rows whose target lies in this tile's columns."""
    local = targets - v0
    inside = (local >= 0) & (local < tile.shape[1])
    picked = tile.gather(1, local.clamp(0, tile.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(inside, picked, current)


def chunked_forward(hidden, weight, bias, targets, temperature, want_entropy, chunk_n, block_v):
    """Returns (logp, lse, entropy or None, top1), ``[N]`` in the compute dtype (top1: bool).

    ``top1`` says whether the target's logit is the row maximum (greedy decoding would
    have picked it; ties count), which gives token accuracy without an argmax pass.
    """
    n_rows, vocab, hdim = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dtype, inv_t = output_dtype(hidden.dtype), 1.0 / temperature
    lse = torch.empty(n_rows, dtype=dtype, device=hidden.device)
    target_z = torch.zeros_like(lse)
    entropy = torch.empty_like(lse) if want_entropy else None
    top1 = torch.empty(n_rows, dtype=torch.bool, device=hidden.device)
    bufs = _Buffers(
        min(chunk_n, n_rows),
        min(block_v, vocab),
        hdim,
        dtype,
        hidden.device,
        second=want_entropy,
        weight_dtype=weight.dtype,
    )
    bias_s = None if bias is None else bias.to(dtype) * inv_t
    for n0 in range(0, n_rows, chunk_n):
        n1 = min(n0 + chunk_n, n_rows)
        h_s, tgt, run = _scaled_rows(hidden[n0:n1], dtype, inv_t), targets[n0:n1], None
        for v0 in range(0, vocab, block_v):
            v1 = min(v0 + block_v, vocab)
            tile, spare = bufs.tiles(n1 - n0, v1 - v0)
            tile = _project(
                tile,
                h_s,
                bufs.weight_block(weight, v0, v1),
                None if bias_s is None else bias_s[v0:v1],
            )
            target_z[n0:n1] = _gather_target(tile, tgt, v0, target_z[n0:n1])
            run = _merge(run, _tile_stats(tile, spare, want_entropy))
        m, s, u = run
        top1[n0:n1] = target_z[n0:n1] >= m
        log_s = torch.log(s)
        lse[n0:n1] = m + log_s
        if want_entropy:
            entropy[n0:n1] = log_s - u / s
    return target_z - lse, lse, entropy, top1


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


def chunked_backward(saved, grad_logp, grad_ent, needs, temperature, chunk_n, block_v):
    """Grads (dh, dW, db) in fp32/fp64 accumulators; None where not needed."""
    hidden, weight, bias, targets, lse, entropy = saved
    n_rows, vocab, hdim = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dtype, inv_t, dev = lse.dtype, 1.0 / temperature, hidden.device
    g, alpha, beta = _row_coefficients(grad_logp, grad_ent, entropy, n_rows, dtype, dev)
    grads = tuple(
        torch.zeros(shape, dtype=dtype, device=dev) if need else None
        for need, shape in zip(needs, ((n_rows, hdim), (vocab, hdim), (vocab,)), strict=True)
    )
    bufs = _Buffers(
        min(chunk_n, n_rows),
        min(block_v, vocab),
        hdim,
        dtype,
        dev,
        second=beta is not None,
        weight_dtype=weight.dtype,
    )
    bias_s = None if bias is None else bias.to(dtype) * inv_t
    for n0 in range(0, n_rows, chunk_n):
        rows = slice(n0, min(n0 + chunk_n, n_rows))
        coefs = (alpha[rows], None if beta is None else beta[rows], None if g is None else g[rows])
        _backward_chunk(
            hidden[rows],
            weight,
            bias_s,
            targets[rows],
            lse[rows],
            coefs,
            grads,
            rows,
            bufs,
            inv_t,
            block_v,
        )
    return grads


def _backward_chunk(hidden, weight, bias_s, targets, lse, coefs, grads, rows, bufs, inv_t, block_v):
    """Adds one chunk of rows' contributions to grads = (dh, dW, db)."""
    (a, b, g), (dh, dw, db) = coefs, grads
    n, vocab = hidden.shape[0], weight.shape[0]
    h_s = _scaled_rows(hidden, lse.dtype, inv_t)
    dh_c = None if dh is None else dh[rows]
    # dW multiplies each tile by h/T, pre-scaled by alpha when alpha is a pure row scale.
    h_dw = None if dw is None else (h_s if b is not None else h_s * a.unsqueeze(1))
    for v0 in range(0, vocab, block_v):
        v1 = min(v0 + block_v, vocab)
        w_blk = bufs.weight_block(weight, v0, v1)
        tile, spare = bufs.tiles(n, v1 - v0)
        tile = _project(tile, h_s, w_blk, None if bias_s is None else bias_s[v0:v1])
        dz = _dz_tile(tile, spare, lse, a, b)
        if dh_c is not None:
            dh_c.addmm_(dz, w_blk)
        if dw is not None:
            dw[v0:v1].addmm_(dz.t(), h_dw)
        if db is not None:
            db[v0:v1] += (dz.t() @ a if b is None else dz.sum(dim=0)) * inv_t
    if dh_c is not None and b is None:
        dh_c.mul_((a * inv_t).unsqueeze(1))
    elif dh_c is not None and inv_t != 1.0:
        dh_c.mul_(inv_t)
    if g is not None:
        _add_onehot_grads(g, h_s, weight, targets, dh_c, dw, db, inv_t)


def _add_onehot_grads(g, h_s, weight, targets, dh_c, dw, db, inv_t):
    """The ``g_i [j = y_i]`` part of dz: one vocabulary row per token (``h_s = h / T``)."""
    if dh_c is not None:
        w_rows = weight.index_select(0, targets).to(dh_c.dtype)
        dh_c.addcmul_((g * inv_t).unsqueeze(1), w_rows)
    if dw is not None:
        dw.index_add_(0, targets, h_s * g.unsqueeze(1))
    if db is not None:
        db.index_add_(0, targets, g * inv_t)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """autograd wrapper of ``chunked_forward`` / ``chunked_backward``.

    ``apply(hidden, weight, bias, targets, temperature, want_entropy, chunk_n, block_v)``
    returns ``(logp, entropy, top1)``; ``entropy`` is None unless ``want_entropy``;
    ``top1`` (bool) is not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, chunk_n, block_v):
        ctx.set_materialize_grads(False)
        logp, lse, entropy, top1 = chunked_forward(
            hidden, weight, bias, targets, temperature, want_entropy, chunk_n, block_v
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.config = (temperature, chunk_n, block_v)
        ctx.mark_non_differentiable(top1)
        return logp, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_top1=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return (None,) * 8
        temperature, chunk_n, block_v = ctx.config
        saved = (hidden, weight, bias, targets, lse, entropy)
        dh, dw, db = chunked_backward(
            saved, grad_logp, grad_ent, ctx.needs_input_grad[:3], temperature, chunk_n, block_v
        )
        dh = None if dh is None else dh.to(hidden.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None


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
        hidden, weight, bias, targets, float(temperature), bool(return_entropy), chunk_n, block_v
    )
    return (logp, entropy) if return_entropy else logp
