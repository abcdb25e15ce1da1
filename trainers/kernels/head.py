"""The fused LM head's kernel: every per-token output of TRL's ``FusedCausalLMOutput``.

``head_stats(hidden, weight, targets, ...)`` scores ``targets`` under
``z = transform(hidden @ weight.T + bias)``, where the transform is TRL 1.16's
(``chunked.LogitTransform``)::

    z = r * logit_scale;  z = c * tanh(z / c) if soft-capped;  z = z / temperature

and returns ``HeadStats``: ``logp`` and ``entropy`` (both differentiable, with
arbitrary upstream grads), ``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits``
(the mean of ``z`` over the vocabulary) and ``is_top1`` (the target is the
``argmax``, i.e. the FIRST maximal index), the last three without gradient. Each
optional output is computed only when listed in ``outputs``.

Routing. CUDA tensors go to the Triton kernels (``triton_logprob.py``) when
triton imports and hidden and weight share a dtype (fp16/bf16/fp32); the kernels
apply the same transform (scale, soft-cap, temperature) and compute every output,
``is_top1`` with argmax's first-index rule. ``mean_logits`` is the linear form
``(h . mean_v W_v + mean_v b_v) pre`` without a soft-cap, and the kernel's row sums
with one. Everything else (CPU, mixed dtypes, fp64) runs the chunked torch path
(``chunked.py``), which works on CUDA tensors too.

Differences from TRL's ``ChunkedLogProbFunction``: outputs are fp64 for fp64
inputs (TRL: always fp32); the projection is done in fp32 (fp64) with autocast
off, not in the autocast/input dtype; the tile sizes are posttrain's
(``chunk_n`` x ``block_v``), not TRL's ``chunk_size``. ``gather`` (TRL's
``maybe_gather_lm_head_ctx``) is re-entered in the backward, which recomputes
with the weight, as ZeRO-3 requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .chunked import (
    DEFAULT_BLOCK_V,
    DEFAULT_CHUNK_N,
    STATS,
    ChunkedStats,
    LogitTransform,
    chunked_backward,
    chunked_forward,
    linear_mean_logits,
)
from .triton_logprob import triton_available, triton_backward, triton_forward

HEAD_OUTPUTS = STATS  # ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class HeadStats:
    """``[N]`` per-token results of ``head_stats``; optional ones are None unless asked for.

    logp, entropy, log_sum_sq_probs, mean_logits: fp32 (fp64 for fp64 inputs).
    is_top1: bool.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None


@dataclass(frozen=True)
class _Plan:
    transform: LogitTransform
    want: frozenset
    triton: bool
    gather: Callable | None
    chunk_n: int
    block_v: int

    @property
    def transform_kwargs(self) -> dict:
        """The transform as the Triton functions take it."""
        t = self.transform
        return {"temperature": t.temperature, "logit_scale": t.scale, "softcap": t.softcap}


def _positive(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _check(hidden, weight, targets, bias, outputs, impl) -> frozenset:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [N={hidden.shape[0]}], got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    unknown = set(outputs) - {"log_probs", *HEAD_OUTPUTS}
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {HEAD_OUTPUTS}")
    if not targets.is_cuda and targets.numel():  # on CUDA this check would sync the host
        if int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]:
            raise ValueError(f"targets must lie in [0, {weight.shape[0]})")
    return frozenset(outputs) & frozenset(HEAD_OUTPUTS)


def _triton_ok(impl, hidden, weight, transform, want) -> bool:
    fits = hidden.dtype == weight.dtype and hidden.dtype in _TRITON_DTYPES
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs `pip install triton`")
        if not fits:
            raise ValueError(
                "the Triton path takes one fp16/bf16/fp32 dtype for hidden and weight; use "
                "impl='auto' to route to the chunked path"
            )
        return True
    return impl == "auto" and hidden.is_cuda and triton_available() and fits


def head_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    outputs: tuple[str, ...] = HEAD_OUTPUTS,
    impl: str = "auto",
    gather: Callable | None = None,
    chunk_n: int = DEFAULT_CHUNK_N,
    block_v: int = DEFAULT_BLOCK_V,
) -> HeadStats:
    """Per-token outputs of the fused LM head (see the module docstring).

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]`` (dtypes may differ); bias: ``[V]`` or None.
        targets: ``[N]`` int64, every one in ``[0, V)`` (no ignore_index here).
        temperature, logit_scale: > 0. softcap: None/0 for none, else > 0.
        outputs: which of ``HEAD_OUTPUTS`` to compute (``"log_probs"`` may be listed;
            it is always computed).
        impl: ``"auto"``, ``"torch"`` (chunked) or ``"triton"`` (forced; see routing).
        gather: ``f(weight, bias) -> context manager`` entered around the backward.
    """
    want = _check(hidden, weight, targets, bias, outputs, impl)
    transform = LogitTransform(
        _positive("temperature", temperature),
        _positive("logit_scale", logit_scale),
        _positive("softcap", softcap) if softcap else None,
    )
    triton_path = _triton_ok(impl, hidden, weight, transform, want)
    plan = _Plan(transform, want, triton_path, gather, int(chunk_n), int(block_v))
    return HeadStats(*_HeadFunction.apply(hidden, weight, bias, targets, plan))


def _autocast_off(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _triton_stats(hidden, weight, bias, targets, plan: _Plan) -> ChunkedStats:
    capped = plan.transform.softcap is not None
    want_mean = "mean_logits" in plan.want
    st = triton_forward(
        hidden,
        weight,
        bias,
        targets,
        want_entropy="entropy" in plan.want,
        want_log_sum_sq="log_sum_sq_probs" in plan.want,
        want_row_sum=want_mean and capped,
        **plan.transform_kwargs,
    )
    mean = None
    if want_mean:
        mean = (
            st.row_sum / weight.shape[0]
            if capped
            else linear_mean_logits(hidden, weight, bias, torch.float32, plan.transform.pre)
        )
    top1 = st.top1 if "is_top1" in plan.want else None
    return ChunkedStats(st.logp, st.lse, st.entropy, st.log_sum_sq_probs, mean, top1, None)


class _HeadFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, targets, plan)`` -> the five ``HeadStats`` fields."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: _Plan):
        ctx.set_materialize_grads(False)
        with _autocast_off(hidden.device):
            if plan.triton:
                hidden, weight, targets = (t.contiguous() for t in (hidden, weight, targets))
                bias = None if bias is None else bias.contiguous()
                st = _triton_stats(hidden, weight, bias, targets, plan)
            else:
                st = chunked_forward(
                    hidden, weight, bias, targets, plan.transform, plan.want, plan.chunk_n,
                    plan.block_v,
                )  # fmt: skip
        target_z = st.target_z if plan.transform.cap else None
        ctx.save_for_backward(hidden, weight, bias, targets, st.lse, st.entropy, target_z)
        ctx.plan = plan
        no_grad = [t for t in (st.log_sum_sq_probs, st.mean_logits, st.is_top1) if t is not None]
        ctx.mark_non_differentiable(*no_grad)
        return st.logp, st.entropy, st.log_sum_sq_probs, st.mean_logits, st.is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, *_unused):
        if grad_logp is None and grad_ent is None:
            return (None,) * 5
        saved = ctx.saved_tensors
        hidden, weight, bias = saved[:3]
        plan, needs = ctx.plan, ctx.needs_input_grad[:3]
        gather = nullcontext() if plan.gather is None else plan.gather(weight, bias)
        with gather, _autocast_off(hidden.device):
            if plan.triton:
                return (
                    *triton_backward(
                        saved[:6], grad_logp, grad_ent, needs, **plan.transform_kwargs
                    ),
                    None,
                    None,
                )
            grads = chunked_backward(
                saved, grad_logp, grad_ent, needs, plan.transform, plan.chunk_n, plan.block_v
            )
        dh, dw, db = (
            None if g is None else g.to(t.dtype)
            for g, t in zip(grads, (hidden, weight, bias), strict=True)
        )
        return dh, dw, db, None, None
