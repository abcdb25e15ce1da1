"""posttrain's fused log-prob kernel behind the model's own forward, in TRL 1.16's contract.

TRL 1.16's ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)``
patches ``model.forward`` so that ``model(..., labels=..., fused_lm_head=True)``
runs the backbone and scores the next-token labels without building
``[tokens x vocab]`` logits, returning ``FusedCausalLMOutput`` (loss, log_probs,
entropy, log_sum_sq_probs, mean_logits, is_top1, label_mask, aux_loss). That
wrapper is the model's forward, so DDP's reducer is armed; it also gathers
FSDP2/ZeRO-3 head weights, reads every logit-scale convention, passes the
soft-cap and adds the MoE router aux loss. TRL's SFT/DPO/GRPO/KTO/RLOO trainers
install it at init and call it in their losses. Inside, it calls the
module-level name ``trl.trainer.utils._ChunkedLogProbFunction`` at call time.

This module puts posttrain's kernel (``trainers.kernels.head_stats``) at that one
point:

- ``PosttrainLogProbFunction``: the same ``apply`` signature and 5-tuple as TRL's
  ``ChunkedLogProbFunction`` (differences: ``trainers/kernels/head.py``);
- ``use_posttrain_kernel()`` / ``restore_trl_kernel()`` / ``trl_kernel()``: rebind
  that name, process-wide (every patched model in the process is affected), and with
  it ``trl.trainer.utils._use_triton``, the forward's "score only the labelled
  positions" switch (below);
- ``install_fused_head(model)``: what posttrain's own code calls; it patches a
  model once (TRL's patch is recognised, whoever applied it) and refuses a LoRA
  adapter on the LM head, which TRL's wrapper would silently ignore (it reads
  ``lm_head.weight``);
- ``fused_head_settings(model)``: temperature/outputs of an installed head.

Only labelled positions reach the kernel, on every device. TRL's forward computes
``mask = labels != -100`` and then, where ``_use_triton(device)`` says so (CUDA/XPU
with triton), passes ``hidden[mask]`` and ``labels[mask]`` and scatters the results
back into zeros (``masked_scatter``, so an all-masked batch still backpropagates a
zero). Elsewhere (CPU) it passes every position with the labels clamped to 0 and
zeroes the ignored ones afterwards: prompt and padding rows are scored and thrown
away, and the kernel cannot tell them apart (label 0 is a real token). TRL scores
every position there so that Neuron's compiled tile shapes stay fixed; posttrain's
kernel has no compiled shapes, so while it is bound the forward's ``_use_triton``
is ``_compact_rows``: True on CPU and CUDA. Outputs and gradients are the same
(rows are independent; masked positions are zero either way); only the ignored
rows' work goes. ``SKIP_MASKED_ROWS = False`` turns it off (benchmarks and tests
compare against it).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import trl.trainer.utils as trl_utils
from trl.kernels import ChunkedLogProbFunction as TRL_KERNEL

from trainers.kernels import HEAD_OUTPUTS, head_stats

FUSED_OUTPUTS = ("log_probs", *HEAD_OUTPUTS)
TRL_COMPACTS = trl_utils._use_triton  # TRL's own "score only the labelled positions" rule
COMPACT_DEVICES = ("cpu", "cuda")  # where posttrain's kernel runs and shapes may vary
SKIP_MASKED_ROWS = True  # False: score every position on CPU, as TRL does (baseline only)
DEFAULT_OUTPUTS = ("log_probs", "entropy", "is_top1")
_MARKER = "_posttrain_fused_head"  # the patched function, set by install_fused_head


class PosttrainLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction`` running posttrain's kernel."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = HEAD_OUTPUTS,
    ):
        """``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, ``[N]`` each.

        ``z = (h W^T + b) * logit_scale``, soft-capped ``c tanh(z / c)`` if
        ``final_logit_softcapping``, then ``/ temperature``. Fields not in ``outputs``
        are None; only log_probs and entropy carry gradients. ``chunk_size`` (TRL's
        vocabulary tile width) is accepted and unused: posttrain tiles on its own.
        ``is_top1`` follows ``argmax`` (a tie with an earlier index does not count).
        CUDA tensors run the Triton kernels unless there is a soft-cap or
        ``log_sum_sq_probs`` is asked for; then the chunked torch path runs there too.
        On the Triton path ``is_top1`` also counts an exact tie with an earlier maximum.
        """
        del chunk_size
        stats = head_stats(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=final_logit_softcapping,
            outputs=tuple(outputs),
            gather=trl_utils.maybe_gather_lm_head_ctx,
        )
        return stats.logp, stats.entropy, stats.log_sum_sq_probs, stats.mean_logits, stats.is_top1


def _compact_rows(device: torch.device) -> bool:
    """TRL's forward asks this whether to pass only the labelled positions to the kernel."""
    return (SKIP_MASKED_ROWS and device.type in COMPACT_DEVICES) or TRL_COMPACTS(device)


def use_posttrain_kernel() -> None:
    """Make every TRL fused LM head in this process run posttrain's kernel (idempotent).

    Also makes the forward pass it only the labelled positions on CPU and CUDA.
    """
    trl_utils._ChunkedLogProbFunction = PosttrainLogProbFunction
    trl_utils._use_triton = _compact_rows


def restore_trl_kernel() -> None:
    """Undo ``use_posttrain_kernel``: TRL's own ``ChunkedLogProbFunction`` and row rule."""
    trl_utils._ChunkedLogProbFunction = TRL_KERNEL
    trl_utils._use_triton = TRL_COMPACTS


def posttrain_kernel_active() -> bool:
    return trl_utils._ChunkedLogProbFunction is PosttrainLogProbFunction


def _binding() -> tuple:
    return trl_utils._ChunkedLogProbFunction, trl_utils._use_triton


def _rebind(binding: tuple) -> None:
    trl_utils._ChunkedLogProbFunction, trl_utils._use_triton = binding


@contextmanager
def trl_kernel() -> Iterator[None]:
    """Run TRL's own kernel inside the block, then put back whatever was bound."""
    previous = _binding()
    restore_trl_kernel()
    try:
        yield
    finally:
        _rebind(previous)


@contextmanager
def posttrain_kernel() -> Iterator[None]:
    """Run posttrain's kernel inside the block, then put back whatever was bound."""
    previous = _binding()
    use_posttrain_kernel()
    try:
        yield
    finally:
        _rebind(previous)


# ----------------------------------------------------------------------------- the model side
class LoraOnLMHeadError(ValueError):
    """A peft LoRA adapter sits on the LM head, which the fused head would ignore."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft/DDP/FSDP/compile wrappers (LoRA layers stay injected)."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, FSDP1
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    return model


def refuse_lora_head(model: torch.nn.Module) -> None:
    """Raise ``LoraOnLMHeadError`` if the output embedding module is a peft LoRA layer."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if head is not None and hasattr(head, "lora_A"):
        raise LoraOnLMHeadError(
            f"LoRA on the LM head ({type(head).__name__}) is not supported: the fused LM head "
            "scores tokens from lm_head.weight directly, so the adapter would be silently "
            "ignored. Leave the output layer out of the LoRA target_modules ('all-linear' "
            "already does), or train it fully with modules_to_save=['lm_head']."
        )


@dataclass(frozen=True)
class FusedHeadSettings:
    """How a model's fused head was installed (read back from TRL's patched forward)."""

    temperature: float
    outputs: tuple[str, ...]
    cast_lm_head_to_fp32: bool
    installed_by: str  # "posttrain" (install_fused_head) or "trl" (a TRL trainer)


def _trl_fused_code() -> types.CodeType:
    for const in trl_utils.add_fused_lm_head.__code__.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == "_fused_forward":
            return const
    raise ImportError("trl.trainer.utils.add_fused_lm_head has no _fused_forward: unsupported TRL")


_TRL_FUSED_CODE = _trl_fused_code()


def _patched_function(model: torch.nn.Module):
    """TRL's ``_fused_forward`` behind ``model.forward`` (through wrappers), or None."""
    fn = model.__dict__.get("forward")
    for _ in range(16):
        fn = getattr(fn, "__func__", fn)
        if fn is None or getattr(fn, "__code__", None) is _TRL_FUSED_CODE:
            return fn
        fn = getattr(fn, "__wrapped__", None)
    return None


def fused_head_settings(model: torch.nn.Module) -> FusedHeadSettings | None:
    """The installed fused head's settings, or None if ``model`` has none."""
    inner = unwrap_model(model)
    fn = _patched_function(inner)
    if fn is None:
        return None
    cells = dict(
        zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True)
    )
    return FusedHeadSettings(
        temperature=float(cells["temperature"]),
        outputs=tuple(cells["outputs"]),
        cast_lm_head_to_fp32=bool(cells["cast_lm_head_to_fp32"]),
        installed_by="posttrain" if inner.__dict__.get(_MARKER) is fn else "trl",
    )


def _normalise_outputs(outputs) -> tuple[str, ...] | None:
    if outputs is None:
        return None
    unknown = set(outputs) - set(FUSED_OUTPUTS)
    if unknown:
        raise ValueError(
            f"unknown fused-head outputs {sorted(unknown)}; choose from {FUSED_OUTPUTS}"
        )
    return tuple(o for o in FUSED_OUTPUTS if o in {"log_probs", *outputs})


def _patch(inner, temperature: float, outputs: tuple[str, ...], cast: bool) -> None:
    trl_utils.add_fused_lm_head(
        inner, temperature=temperature, cast_lm_head_to_fp32=cast, outputs=outputs
    )
    setattr(inner, _MARKER, _patched_function(inner))


def install_fused_head(
    model: torch.nn.Module,
    *,
    temperature: float | None = None,
    outputs: tuple[str, ...] | None = None,
    cast_lm_head_to_fp32: bool | None = None,
) -> torch.nn.Module:
    """Give ``model`` TRL's fused LM head running posttrain's kernel; returns the patched model.

    Calls ``use_posttrain_kernel()``, refuses a LoRA adapter on the LM head, then
    patches the transformers model under any peft/DDP wrapper (as TRL's trainers
    do) unless it already has a fused head. ``None`` arguments mean "as installed"
    (defaults for a new head: temperature 1.0, ``DEFAULT_OUTPUTS``, no fp32 cast).
    An installed head missing some of ``outputs`` is patched again with the union
    (the outer patch wins; its non-fused path still reaches the original forward).
    An explicit temperature or cast that differs from the installed one raises.
    """
    use_posttrain_kernel()
    inner = unwrap_model(model)
    refuse_lora_head(inner)
    wanted = _normalise_outputs(outputs)
    current = fused_head_settings(inner)
    if current is None:
        t = 1.0 if temperature is None else float(temperature)
        _patch(inner, t, wanted or DEFAULT_OUTPUTS, bool(cast_lm_head_to_fp32))
        return inner
    if temperature is not None and float(temperature) != current.temperature:
        raise ValueError(
            f"this model's fused head was installed (by {current.installed_by}) with "
            f"temperature {current.temperature}, not {temperature}"
        )
    if cast_lm_head_to_fp32 is not None and cast_lm_head_to_fp32 != current.cast_lm_head_to_fp32:
        raise ValueError(
            f"this model's fused head was installed with cast_lm_head_to_fp32="
            f"{current.cast_lm_head_to_fp32}"
        )
    if wanted is not None and not set(wanted) <= set(current.outputs):
        merged = _normalise_outputs((*current.outputs, *wanted))
        _patch(inner, current.temperature, merged, current.cast_lm_head_to_fp32)
    return inner
