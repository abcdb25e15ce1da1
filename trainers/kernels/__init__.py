"""Fused "linear -> token log-prob (+ entropy)" without ``[N, V]`` logits.

``token_logprobs(hidden, weight, targets)`` returns, for every token, the
log-probability of its target under ``softmax((hidden @ weight.T + bias) / T)``
and optionally the entropy of that distribution. It is the per-token building
block of GRPO/DPO-style losses: both outputs take arbitrary per-token
upstream gradients, so nothing is differentiated in the forward.

Layers (design, bounds and targets: ``docs/algorithms/kernels.md``):

- ``triton_logprob.py``: Triton kernels + autograd Function, used for CUDA
  tensors when triton is importable;
- ``chunked.py``: chunked plain-torch twin with the same maths, used on CPU
  and as the test oracle (its docstring has the formulas);
- ``head.py``: ``head_stats``, the fused LM head's entry (routes to the two above);
- ``reference.py``: naive materialised-logits version for tests/benchmarks.

Only 2D inputs are accepted: flatten ``[B, T, H]`` to ``[B*T, H]`` first
(and select the completion positions there, which also saves compute).

``head_stats`` is the entry point of the fused LM head (``trainers.fused_head``,
TRL's ``fused_lm_head=True`` contract): logit scale and soft-cap, and the extra
statistics ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1``. It runs the
Triton kernels for CUDA tensors with one dtype for hidden and weight (every
transform and statistic included); everything else goes to the chunked torch
path, which runs on CUDA tensors as well (``head.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunked import DEFAULT_BLOCK_V, DEFAULT_CHUNK_N, ChunkedTokenLogprobs
from .head import HEAD_OUTPUTS, HeadStats, head_stats
from .reference import naive_token_logprobs, output_dtype
from .triton_logprob import TritonTokenLogprobs, triton_available

__all__ = [
    "HEAD_OUTPUTS",
    "HeadStats",
    "head_stats",
    "naive_token_logprobs",
    "token_logprobs",
    "token_stats",
]

IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(hidden, weight, targets, bias, temperature, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}; flatten leading batch dims with hidden.reshape(-1, H)"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(
            f"targets must be int64 [N={hidden.shape[0]}], got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _use_triton(impl: str, hidden: torch.Tensor) -> bool:
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs `pip install triton`")
        return True
    return (
        impl == "auto" and hidden.is_cuda and triton_available() and hidden.dtype in _TRITON_DTYPES
    )


def _run(hidden, weight, targets, bias, temperature, return_entropy, triton_path, want_top1):
    """(logp, entropy or None, top1 or None) from the chosen path; all targets are valid."""
    t, ent = float(temperature), bool(return_entropy)
    if triton_path:
        return TritonTokenLogprobs.apply(hidden, weight, bias, targets, t, ent, None, None)
    return ChunkedTokenLogprobs.apply(
        hidden, weight, bias, targets, t, ent, DEFAULT_CHUNK_N, DEFAULT_BLOCK_V, want_top1
    )


@dataclass
class TokenStats:
    """Per-token results of ``token_stats``; every tensor is ``[N]``.

    logp:    log-prob of the target (fp32; fp64 for fp64 inputs), 0 where ignored
    entropy: entropy of the row's distribution, or None when not asked for; 0 where ignored
    top1:    bool, the target is the row's argmax (the first maximal index, on both
             paths); False where ignored.
             Not differentiable: it gives token accuracy without an argmax pass.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    top1: torch.Tensor


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
) -> TokenStats:
    """``token_logprobs`` with every per-token output at once (see ``TokenStats``)."""
    args = (hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl)
    return _token_stats(*args, want_top1=True)


def _token_stats(
    hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl, want_top1
) -> TokenStats:
    _check_inputs(hidden, weight, targets, bias, temperature, impl)
    triton_path = _use_triton(impl, hidden)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()  # one host sync
    if n_bad:
        raise ValueError(f"{n_bad} targets are outside [0, {vocab}) and not ignore_index")
    args = (hidden, weight, targets, bias, temperature, return_entropy, triton_path, want_top1)
    if n_valid == n_rows:
        return TokenStats(*_run(*args))
    return TokenStats(*_run_compacted(*args, valid, n_valid))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(z)[y]`` (and entropy) of ``z = (hidden @ weight.T + bias) / T``.

    Args:
        hidden: ``[N, H]`` hidden states, any float dtype (same as ``weight``).
        weight: ``[V, H]`` LM-head weight; a frozen weight gets no dW GEMMs.
        targets: ``[N]`` int64 ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` bias.
        temperature: divides the logits (> 0).
        ignore_index: rows with this target return exactly 0 and get no grad;
            they are dropped before the kernels run, so they cost nothing.
        return_entropy: also return the per-token entropy.
        impl: ``"auto"`` (Triton for CUDA tensors when triton imports, else
            torch), ``"torch"`` (chunked path) or ``"triton"`` (forced).

    Returns:
        ``logp [N]`` or ``(logp [N], entropy [N])``, fp32 (fp64 for fp64 inputs).
        Gradients reach hidden/weight/bias in their own dtypes (fp32 accumulation).
    """
    args = (hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl)
    out = _token_stats(*args, want_top1=False)
    return (out.logp, out.entropy) if return_entropy else out.logp


def _run_compacted(
    hidden, weight, targets, bias, temperature, return_entropy, triton_path, want_top1, valid,
    n_valid,
):  # fmt: skip
    """Runs only the kept rows and scatters them back into zeros."""
    n_rows = hidden.shape[0]
    zeros = torch.zeros(n_rows, dtype=output_dtype(hidden.dtype), device=hidden.device)
    no_top1 = torch.zeros(n_rows, dtype=torch.bool, device=hidden.device)
    if n_valid == 0:  # still connected to the graph, so backward() works and gives zeros
        anchor = hidden[:0].sum() + weight[:0].sum()
        anchor = anchor if bias is None else anchor + bias[:0].sum()
        zeros = zeros + anchor.to(zeros.dtype)
        return zeros, (zeros.clone() if return_entropy else None), no_top1
    idx = valid.nonzero().squeeze(1)
    logp, entropy, top1 = _run(
        hidden.index_select(0, idx),
        weight,
        targets.index_select(0, idx),
        bias,
        temperature,
        return_entropy,
        triton_path,
        want_top1,
    )
    logp = zeros.index_copy(0, idx, logp)
    entropy = None if entropy is None else zeros.index_copy(0, idx, entropy)
    return logp, entropy, None if top1 is None else no_top1.index_copy(0, idx, top1)
