"""A plain-torch ``flash_attn_varlen_func`` for TRL's tree attention where FA3 cannot run.

TRL's ``AsyncGRPOTrainer`` loads its model with the ``tree_fa3`` attention
(``trl/experimental/async_grpo/packing.py``): every segment of a packed prefix tree
attends to the K/V rows of its root-to-segment path, through the FlashAttention-3
varlen kernel that ``packing._flash_attn`` fetches from the Hugging Face Hub with
``kernels.get_kernel``. That kernel is CUDA-only and the Hub is not always reachable,
so on CPU (or without ``kernels``) ``install()`` points ``packing._flash_attn`` at this
module instead. It
computes the same thing, segment by segment, with ``scaled_dot_product_attention``:

* ``q`` is ``(total_q, heads, d)``, ``k``/``v`` ``(total_k, kv_heads, d)`` (grouped
  query attention when ``kv_heads`` divides ``heads``); ``cu_seqlens_q``/``cu_seqlens_k``
  are the segments' boundaries;
* ``causal`` is FlashAttention's bottom-right alignment: a segment's ``Lq`` queries are
  the last ``Lq`` of its ``Lk`` keys, so query ``i`` sees keys ``j <= i + Lk - Lq``;
* ``window_size=(left, right)`` (``-1`` = unbounded) keeps keys with
  ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``;
* ``softcap`` > 0 caps the scores at ``softcap * tanh(s / softcap)``.

It returns ``(out, lse)`` like FA3 (``out`` is ``(total_q, heads, d)``; ``lse`` the
log-sum-exp per query and head, ``(heads, total_q)``). It is autograd-differentiable.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import torch


def _mask(lq: int, lk: int, causal: bool, window: tuple[int, int], device) -> torch.Tensor | None:
    left, right = window
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    offset = lk - lq
    i = torch.arange(lq, device=device).unsqueeze(1) + offset
    j = torch.arange(lk, device=device).unsqueeze(0)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} K/V heads")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    rep = heads // kv_heads
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(bq) - 1):
        qs = q[bq[s] : bq[s + 1]].transpose(0, 1)  # (heads, Lq, d)
        ks = k[bk[s] : bk[s + 1]].transpose(0, 1).repeat_interleave(rep, dim=0)
        vs = v[bk[s] : bk[s + 1]].transpose(0, 1).repeat_interleave(rep, dim=0)
        lq, lk = qs.shape[1], ks.shape[1]
        scores = (qs @ ks.transpose(1, 2)).float() * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        keep = _mask(lq, lk, causal, tuple(window_size), q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (heads, Lq); -inf where no key is visible
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append((probs.to(vs.dtype) @ vs).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


KERNEL = SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def _cpu_kernel() -> SimpleNamespace:
    return KERNEL


def install(device: torch.device | str) -> bool:
    """Make TRL's tree attention use this kernel on a device other than CUDA, or where
    the ``kernels`` package that fetches FA3 is missing; return whether it did. On CUDA
    with ``kernels`` TRL's own FA3 kernel stays."""
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("kernels") is not None:
        return False
    import trl.experimental.async_grpo.packing as packing

    packing._flash_attn = _cpu_kernel
    return True


def installed() -> bool:
    packing = sys.modules.get("trl.experimental.async_grpo.packing")
    return packing is not None and packing._flash_attn is _cpu_kernel
