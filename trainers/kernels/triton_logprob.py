"""Triton "linear -> token log-prob (+ entropy)" for CUDA tensors.

Same maths and contract as ``chunked.py`` (read its docstring for the
formulas, the logit transform included); this module only changes where the
tiles live. Every tile applies ``z = r pre`` or, soft-capped, ``z = cap tanh(r pre)``
(``r = h W^T + b``; ``pre = scale / T`` or ``scale / c``, ``cap = c / T``).

Forward (``_forward_kernel``). Grid ``(cdiv(N, BLOCK_N), splits)``. Program
``(i, k)`` owns rows ``[i*BLOCK_N, (i+1)*BLOCK_N)`` and the vocabulary range
``[k*cols_per_split, (k+1)*cols_per_split)``. It walks that range in
``BLOCK_V`` columns; each step is a ``tl.dot`` over H in ``BLOCK_K`` slices
with fp32 accumulation, then an online update of the per-row statistics
relative to the running max ``m``::

    s <- e^{m - m'} s + sum_j e^{z_j - m'}
    u <- e^{m - m'} (u + (m - m') s) + sum_j e^{z_j - m'} (z_j - m')

plus the target logit when it falls in the step and, when asked for,
``q = sum_j e^{2 (z_j - m)}`` (``log_sum_sq_probs``), the row's logit sum
(``mean_logits`` of a soft-capped head) and the first column of the running
maximum (a later step wins only with a strictly larger maximum), which makes
``is_top1`` argmax's first-index rule, as on the chunked path. Each split writes
its partials to ``[splits, N]`` buffers, and ``_merge_splits`` combines them in
torch with the same associative merge, in a fixed order, so the result is
deterministic (no atomics, no locks). Program id 0 varies
fastest, so the programs resident at one time share a split and read the same
``W`` tiles from L2. ``splits`` grows only until the grid covers the SMs
about twice.

Backward (``_dz_kernel``). A grid of ``(row tiles, vocabulary tiles)`` programs
recomputes ``z`` over a window of rows x columns and writes, in the input dtype::

    dr = (p (alpha + beta log p) + g [j = y]) J pre,   alpha = -g - e H, beta = -e

(``J = 1``, or ``cap - z^2 / cap`` soft-capped)

and cuBLAS turns each window into ``dh = dz @ W`` and ``dW = dz^T @ h``. A window
that spans every column gives its rows' dh exactly (one GEMM, fp32 accumulation
inside cuBLAS) while dW must be summed over row windows; a window spanning every
row does the opposite. So the loop order decides which gradient needs an fp32
accumulator, and ``_backward_order`` picks the smaller one: ``"rows"`` (N-outer,
accumulates dW, ``4 V H`` bytes) when there are more tokens than vocabulary
entries or W is frozen, ``"cols"`` (V-outer, accumulates dh, ``4 N H`` bytes)
otherwise. At the Llama-3 shape (N=16384, V=128256, H=4096) that is 256 MB
instead of 2 GB, and a frozen head or frozen inputs need no accumulator at all.
Each window's dz stays under ``DZ_BUDGET_BYTES``; GEMMs of grads that
``needs_input_grad`` does not ask for are skipped.

Constraints: fp16/bf16/fp32 only (fp64 goes to the chunked path); hidden and
weight share a dtype; fp32 uses IEEE (not TF32) dot products. There are no
``None`` pointer arguments (constexpr flags + a dummy tensor), so the kernels
also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the CPU CI
tests them. Importing this module without triton works; calling it raises.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:  # optional dependency: the CPU install has no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

DZ_BUDGET_BYTES = 256 * 2**20
GPU_CONFIG = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def triton_available() -> bool:
    return triton is not None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# Kernel signatures stay compact (one parameter per line would double the module).
# fmt: off
@_jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, pre, cap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = (h[rows] @ W[cols].T + b[cols]) pre, soft-capped, in fp32."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        a = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < H), other=0.0)
        b = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & (k[:, None] < H), other=0.0)
        if UPCAST:  # exact: bf16 x bf16 products fit in fp32, as in the bf16 MMA
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * pre
    if SOFTCAP:  # cap tanh(z), tanh(x) = 2 sigmoid(2x) - 1 (finite for any x)
        z = cap * (2.0 * tl.sigmoid(2.0 * z) - 1.0)
    return z


@_jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, u_ptr, zy_ptr, q_ptr, sum_ptr,
                    arg_ptr, N, V, H, cols_per_split, stride_h, stride_w, pre, cap,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_U: tl.constexpr,
                    WANT_Q: tl.constexpr, WANT_SUM: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Partial (m, s, u, z_y, q, sum z, first argmax) of one row tile over one split."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rows < N
    tgt = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_lo = split * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_N], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    arg = tl.zeros([BLOCK_N], dtype=tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                         pre, cap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION,
                         UPCAST)
        if WANT_SUM:
            zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        tile_max = tl.max(z, axis=1)
        first = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), axis=1)
        arg = tl.where(tile_max > m, first, arg)  # a tie keeps the earlier column
        m_new = tl.maximum(m, tile_max)
        scale = tl.exp(m - m_new)
        shifted = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        if WANT_U:
            # m - m' is -inf on the first step, where s == 0: drop the term.
            drift = tl.where(s > 0, m - m_new, 0.0) * s
            u = scale * (u + drift) + tl.sum(e * shifted, axis=1)
        if WANT_Q:
            q = scale * scale * q + tl.sum(e * e, axis=1)
        s = scale * s + tl.sum(e, axis=1)
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)
    tl.store(arg_ptr + out, arg, mask=row_ok)
    if WANT_U:
        tl.store(u_ptr + out, u, mask=row_ok)
    if WANT_Q:
        tl.store(q_ptr + out, q, mask=row_ok)
    if WANT_SUM:
        tl.store(sum_ptr + out, zsum, mask=row_ok)


@_jit
def _dz_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, alpha_ptr, beta_ptr, g_ptr, dz_ptr,
               row0, n_rows, col0, n_cols, H, stride_h, stride_w, stride_dz, pre, cap,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BETA: tl.constexpr,
               HAS_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dr (the grad of r = h W^T + b) of one (row tile, column tile) of the window
    [row0, +n_rows) x [col0, +n_cols)."""
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = local < n_rows
    col_ok = local_c < n_cols
    rows = row0 + local
    cols = col0 + local_c
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     pre, cap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
    logp = z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    coef = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BETA:
        coef = coef + tl.load(beta_ptr + rows, mask=row_ok, other=0.0)[:, None] * logp
    dz = tl.exp(logp) * coef
    if HAS_G:
        tgt = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        dz += tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0)
    if SOFTCAP:  # d(cap tanh x)/dx = cap - z^2 / cap
        dz = dz * (cap - z * z / cap)
    dz = dz * pre
    ptrs = dz_ptr + local.to(tl.int64)[:, None] * stride_dz + local_c[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
# fmt: on


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton path needs `pip install triton`; use impl='torch' instead")


def _launch_config(config: dict | None, dtype: torch.dtype) -> dict:
    """Block sizes plus the dot-product constexprs for this dtype."""
    cfg = dict(GPU_CONFIG if config is None else config)
    cfg.pop("order", None)  # a backward choice, not a kernel argument
    if dtype == torch.float32 and config is None:
        cfg["BLOCK_K"] = 32  # fp32 tiles take twice the shared memory
    # The interpreter's bf16 tl.dot is wrong (triton 3.9); upcasting there is exact.
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    cfg["PRECISION"] = "ieee" if dtype == torch.float32 or upcast else "tf32"
    cfg["UPCAST"] = upcast
    return cfg


def _num_splits(n_tiles: int, vocab: int, block_v: int, device, forced: int | None) -> int:
    """Vocabulary splits: enough programs to cover the SMs twice, at least 1 block each."""
    if forced is not None:
        return max(1, min(forced, triton.cdiv(vocab, block_v)))
    sms = 1
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, n_tiles), triton.cdiv(vocab, block_v)))


class TritonStats(NamedTuple):
    """``[N]`` results of ``triton_forward``; optional ones are None unless asked for."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    row_sum: torch.Tensor | None  # the sum of z over the vocabulary
    top1: torch.Tensor  # bool: the target is the row's first maximal column


def transform_factors(temperature: float, logit_scale: float, softcap: float | None):
    """(pre, cap) of ``z = r pre`` or ``cap tanh(r pre)``; cap 0.0 means no soft-cap."""
    if softcap:
        return logit_scale / softcap, softcap / temperature
    return logit_scale / temperature, 0.0


def _merge_splits(m, s, u, zy, q, zsum, arg):
    """Fold the [splits, N] partials in split order (deterministic). The row maximum's
    first column comes from the first split that holds the maximum."""
    top = m.amax(dim=0)
    scale = torch.exp(m - top)
    s_all = (scale * s).sum(dim=0)
    u_all = None if u is None else (scale * (u + (m - top) * s)).sum(dim=0)
    q_all = None if q is None else (scale * scale * q).sum(dim=0)
    sum_all = None if zsum is None else zsum.sum(dim=0)
    first_split = (m == top).to(torch.int8).argmax(dim=0, keepdim=True)
    arg_all = arg.gather(0, first_split.long()).squeeze(0)
    return top, s_all, u_all, zy.sum(dim=0), q_all, sum_all, arg_all


def triton_forward(
    hidden,
    weight,
    bias,
    targets,
    temperature,
    want_entropy,
    config=None,
    num_splits=None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    want_log_sum_sq: bool = False,
    want_row_sum: bool = False,
) -> TritonStats:
    """The forward pass: ``TritonStats`` (fp32 ``[N]``; top1 bool, argmax's first index)."""
    _require_triton()
    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    pre, cap = transform_factors(temperature, logit_scale, softcap)
    cfg = _launch_config(config, hidden.dtype)
    n_tiles = triton.cdiv(n_rows, cfg["BLOCK_N"])
    splits = _num_splits(n_tiles, vocab, cfg["BLOCK_V"], hidden.device, num_splits)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, cols_per_split)
    part = torch.empty(6, splits, n_rows, dtype=torch.float32, device=hidden.device)
    arg = torch.empty(splits, n_rows, dtype=torch.int32, device=hidden.device)
    # fmt: off
    _forward_kernel[(n_tiles, splits)](
        hidden, weight, hidden if bias is None else bias, targets, part[0], part[1], part[2],
        part[3], part[4], part[5], arg, n_rows, vocab, hdim, cols_per_split, hidden.stride(0),
        weight.stride(0), pre, cap, HAS_BIAS=bias is not None, SOFTCAP=bool(softcap),
        WANT_U=want_entropy, WANT_Q=want_log_sum_sq, WANT_SUM=want_row_sum, **cfg,
    )
    # fmt: on
    m, s, u, zy, q, zsum, first = _merge_splits(
        part[0],
        part[1],
        part[2] if want_entropy else None,
        part[3],
        part[4] if want_log_sum_sq else None,
        part[5] if want_row_sum else None,
        arg,
    )
    log_s = torch.log(s)
    lse = m + log_s
    return TritonStats(
        logp=zy - lse,
        lse=lse,
        entropy=log_s - u / s if want_entropy else None,
        log_sum_sq_probs=torch.log(q) - 2 * log_s if want_log_sum_sq else None,
        row_sum=zsum,
        top1=first == targets,
    )


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 acc, without rounding the product to a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # CPU tensors under TRITON_INTERPRET=1
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _window(total: int, other: int, elem: int, block: int) -> int:
    """Lines per dz window (a multiple of ``block``) so that ``lines x other`` fits the budget."""
    lines = max(block, DZ_BUDGET_BYTES // max(1, other * elem) // block * block)
    return min(lines, total)


def _backward_order(n_rows: int, vocab: int, need_h: bool, need_w: bool, forced=None) -> str:
    """The loop order: "rows" (N-outer: dh exact, dW summed) or "cols" (V-outer: the reverse)."""
    if forced is not None:
        return forced
    if not need_w:
        return "rows"
    if not need_h:
        return "cols"
    return "cols" if n_rows < vocab else "rows"


def _grad_buffer(like: torch.Tensor, accumulate: bool) -> torch.Tensor:
    if accumulate:
        return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return torch.empty_like(like)


def triton_backward(
    saved,
    grad_logp,
    grad_ent,
    needs,
    temperature,
    config=None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """Grads (dh, dW, db) in the input dtypes; None where not needed."""
    pre, cap = transform_factors(temperature, logit_scale, softcap)
    hidden, weight, bias, targets, lse, entropy = saved
    need_h, need_w, need_b = needs
    n_rows, hdim = hidden.shape
    vocab, dev, dtype = weight.shape[0], hidden.device, hidden.dtype
    cfg = _launch_config(config, dtype)
    order = _backward_order(n_rows, vocab, need_h, need_w, (config or {}).get("order"))
    g = None if grad_logp is None else grad_logp.float().contiguous()
    alpha = torch.zeros(n_rows, dtype=torch.float32, device=dev) if g is None else -g
    beta = None if grad_ent is None else -grad_ent.float().contiguous()
    if beta is not None:
        alpha = alpha + beta * entropy
    # The gradient the loop order sums over windows gets an fp32 accumulator;
    # the other is written window by window straight into its output.
    dh = _grad_buffer(hidden, order == "cols") if need_h else None
    dw = _grad_buffer(weight, order == "rows") if need_w else None
    db = None
    if need_b:
        db = torch.zeros(vocab, dtype=torch.float32, device=dev)

    def windows():
        if order == "rows":
            step = _window(n_rows, vocab, hidden.element_size(), cfg["BLOCK_N"])
            buf = torch.empty(step, vocab, dtype=dtype, device=dev)
            for r0 in range(0, n_rows, step):
                yield r0, min(r0 + step, n_rows), 0, vocab, buf
        else:
            step = _window(vocab, n_rows, hidden.element_size(), cfg["BLOCK_V"])
            buf = torch.empty(n_rows, step, dtype=dtype, device=dev)
            for c0 in range(0, vocab, step):
                yield 0, n_rows, c0, min(c0 + step, vocab), buf

    for r0, r1, c0, c1, buf in windows():
        dz = buf[: r1 - r0, : c1 - c0]
        grid = (triton.cdiv(r1 - r0, cfg["BLOCK_N"]), triton.cdiv(c1 - c0, cfg["BLOCK_V"]))
        # fmt: off
        _dz_kernel[grid](
            hidden, weight, hidden if bias is None else bias, targets, lse, alpha,
            alpha if beta is None else beta, alpha if g is None else g, dz, r0, r1 - r0, c0,
            c1 - c0, hdim, hidden.stride(0), weight.stride(0), dz.stride(0), pre, cap,
            HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), HAS_BETA=beta is not None,
            HAS_G=g is not None, **cfg,
        )
        # fmt: on
        if dh is not None:
            if order == "rows":  # every column: one GEMM, cuBLAS accumulates in fp32
                torch.mm(dz, weight, out=dh[r0:r1])
            else:
                _addmm_fp32(dh, dz, weight[c0:c1])
        if dw is not None:
            if order == "cols":  # every row
                torch.mm(dz.t(), hidden, out=dw[c0:c1])
            else:
                _addmm_fp32(dw, dz.t(), hidden[r0:r1])
        if db is not None:
            db[c0:c1] += dz.sum(dim=0, dtype=torch.float32)
    dh = None if dh is None else dh.to(dtype)
    dw = None if dw is None else dw.to(weight.dtype)
    return dh, dw, None if db is None else db.to(bias.dtype)


class TritonTokenLogprobs(torch.autograd.Function):
    """``apply(hidden, weight, bias, targets, temperature, want_entropy, config, num_splits)``
    returns ``(logp, entropy, top1)`` (fp32; entropy None unless requested; top1 bool, no grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, config, num_splits):
        ctx.set_materialize_grads(False)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        targets = targets.contiguous()
        st = triton_forward(
            hidden, weight, bias, targets, temperature, want_entropy, config, num_splits
        )
        ctx.save_for_backward(hidden, weight, bias, targets, st.lse, st.entropy)
        ctx.config = (temperature, config)
        ctx.mark_non_differentiable(st.top1)
        return st.logp, st.entropy, st.top1

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, _grad_top1=None):
        if grad_logp is None and grad_ent is None:
            return (None,) * 8
        temperature, config = ctx.config
        dh, dw, db = triton_backward(
            ctx.saved_tensors, grad_logp, grad_ent, ctx.needs_input_grad[:3], temperature, config
        )
        return dh, dw, db, None, None, None, None, None


def triton_token_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    return_entropy=False,
    config=None,
    num_splits=None,
):
    """Functional form of ``TritonTokenLogprobs`` (targets must all be in ``[0, V)``).

    ``config`` overrides the block sizes (``BLOCK_N``, ``BLOCK_V``, ``BLOCK_K``,
    ``num_warps``, ``num_stages``); ``num_splits`` forces the vocabulary split count.
    """
    _require_triton()
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"Triton path supports fp16/bf16/fp32, got {hidden.dtype}")
    logp, entropy, _ = TritonTokenLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), bool(return_entropy), config, num_splits
    )
    return (logp, entropy) if return_entropy else logp
