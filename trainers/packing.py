"""Padding-free batches: the rows of a padded batch run as one packed row, exactly.

A padded batch ``[B, T]`` spends the backbone's work on ``B*T`` positions, of which
only ``sum(lengths)`` are tokens. ``install_padding_free(model)`` wraps the model's
fused forward (``model(..., labels=..., fused_lm_head=True)``, TRL 1.16's contract,
behind which posttrain's kernel sits) so that such a call

1. takes the real tokens of every row, in order, as one row of ``N = sum(lengths)``
   tokens, with ``position_ids`` restarting at 0 for each row and the label of each
   row's first token ignored (nothing before it in its own row predicts it);
2. runs the backbone and the fused head on that row, where attention never crosses
   a row boundary (below);
3. puts every per-token output (log-probs, entropy, token accuracy, label mask...)
   back at its padded position ``[B, T-1]``, zeros on padding, as the padded forward
   returns it.

So the trainer's own loss code (TRL's SFT and DPO losses, with their completion-only
and assistant-only masks) runs unchanged on the same rows, the same batches and the
same normalisation; only the padding is not computed. The per-token losses equal
the padded ones to float tolerance (``tests/trainers/test_packing.py``).

Attention that keeps packed rows apart (``packed_attention``):

* ``sdpa`` becomes ``posttrain_varlen_sdpa``: PyTorch's scaled-dot-product attention
  run causally on each packed sequence (the boundaries come as ``cu_seq_lens_q``,
  as for flash-attention), so no ``N x N`` mask is built and the cost is
  ``sum(L_i^2)`` rather than ``B * T^2``; a model's sliding window applies within
  each sequence. Without sequence boundaries it is the
  ordinary ``sdpa`` (generation, unpadded batches).
* ``flash_attention_2`` / ``flash_attention_3`` / hub flash kernels: their own
  varlen kernels, from ``cu_seq_lens_q/k`` and ``max_length_q/k`` (GPU only).
* ``eager``: transformers builds a block-diagonal causal mask from ``position_ids``
  (``masking_utils.find_packed_sequence_indices``) when no attention mask is given.

Any other attention implementation (``flex_attention``, paged ones...) is not known
to mask packed rows exactly, so ``packing_supported`` says no and the trainer runs
padded batches (``auto``) or refuses the job (``padding_free`` asked for explicitly).

A call the wrapper cannot pack exactly (no ``fused_lm_head``, left padding, extra
per-token inputs, a cache, pre-shifted labels) runs the padded forward unchanged.
"""

from __future__ import annotations

import functools
import itertools
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from trainers.fused_head import unwrap_model

VARLEN_SDPA = "posttrain_varlen_sdpa"
_MARKER = "_posttrain_padding_free"
# inputs the packed forward knows how to carry; anything else runs padded
_PACKABLE_KWARGS = {
    "input_ids",
    "attention_mask",
    "labels",
    "use_cache",
    "num_items_in_batch",
    "output_router_logits",
    "fused_lm_head",
}
_in_packed_forward: ContextVar[bool] = ContextVar("posttrain_packed_forward", default=False)
_packed_edges: ContextVar[list[int] | None] = ContextVar("posttrain_packed_edges", default=None)


# ----------------------------------------------------------------------------- attention
def _segment_attention(q, k, v, window: int | None, dropout: float, scale: float | None):
    """Causal SDPA of one sequence, within a sliding ``window`` if it has one."""
    n = q.shape[2]
    if window is None or n <= window:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scale, is_causal=True
        )
    i = torch.arange(n, device=q.device)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scale)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each packed sequence of a ``[1, heads, N, dim]`` row.

    ``cu_seq_lens_q`` ([S+1] int, the sequence starts and N) gives the boundaries;
    without it (or with a batch of several rows) this is transformers' ``sdpa``.
    A ``sliding_window`` is honoured within each sequence. Returns ``[1, N, heads, dim]``
    like ``sdpa_attention_forward``.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "posttrain_varlen_sdpa has no attention sinks or logit soft-capping; "
            "train this model with packing 'off'"
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # the packed forward hands the boundaries as Python ints (no device sync per layer);
    # a recompute under gradient checkpointing runs outside it and reads the tensor
    edges = _packed_edges.get() or bounds.tolist()
    window = kwargs.get("sliding_window")
    drop = dropout if module.training else 0.0
    parts = [
        _segment_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], window, drop, scaling
        )
        for a, b in itertools.pairwise(edges)
        if b > a
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def varlen_sdpa_mask(*args, **kwargs):
    """No mask inside a packed forward (the attention reads the boundaries); else sdpa's."""
    if _in_packed_forward.get():
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen_sdpa() -> None:
    """Make ``posttrain_varlen_sdpa`` a transformers attention implementation (idempotent)."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)


def packed_attention(implementation: str | None) -> str | None:
    """The attention implementation that runs packed rows exactly in place of
    ``implementation``, or None if there is none."""
    impl = implementation or "eager"
    if impl in ("sdpa", VARLEN_SDPA):
        return VARLEN_SDPA
    if impl == "eager" or "flash" in impl:
        return impl
    return None


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention can keep packed sequences apart exactly."""
    return packed_attention(unwrap_model(model).config._attn_implementation) is not None


# ----------------------------------------------------------------------------- pack / unpack
def _right_padded_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Row lengths if every row is ``[1]*L + [0]*(T-L)``, else None."""
    lengths = mask.sum(dim=1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask.bool(), cols[None, :] < lengths[:, None]):
        return None
    return lengths


def _unpad(out: torch.Tensor | None, starts: torch.Tensor, lengths: torch.Tensor, width: int):
    """``[1, N-1]`` packed next-token outputs -> ``[B, width]`` (``width = T-1``), zeros
    on positions whose next token is padding."""
    if out is None or out.dim() == 0:
        return out
    flat = out[0]
    cols = torch.arange(width, device=flat.device)
    index = starts[:, None] + cols[None, :]
    valid = cols[None, :] < (lengths[:, None] - 1)
    picked = flat[index.clamp(max=flat.shape[0] - 1)]
    return torch.where(valid, picked, torch.zeros((), dtype=flat.dtype, device=flat.device))


def _pack_call(fused, kwargs: dict):
    """Run ``fused`` on the packed row of a right-padded batch; None if it cannot."""
    mask, input_ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
    if mask is None or input_ids is None or mask.dim() != 2 or bool(mask.all()):
        return None
    if set(kwargs) - _PACKABLE_KWARGS:
        return None
    lengths = _right_padded_lengths(mask)
    if lengths is None or int(lengths.sum()) < 2:
        return None
    keep = mask.bool()
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[keep]
    packed = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "input_ids")}
    packed["input_ids"] = input_ids[keep][None]
    packed["position_ids"] = positions[None]
    if kwargs.get("labels") is not None:
        labels = kwargs["labels"][keep].clone()
        labels[starts[lengths > 0]] = -100  # the previous row's last token does not predict it
        packed["labels"] = labels[None]
    real = lengths[lengths > 0]
    cu = torch.cat([real.new_zeros(1), torch.cumsum(real, 0)]).to(torch.int32)
    packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = cu
    packed["max_length_q"] = packed["max_length_k"] = int(real.max())
    token, edges = _in_packed_forward.set(True), _packed_edges.set(cu.tolist())
    try:
        out = fused(**packed)
    finally:
        _in_packed_forward.reset(token)
        _packed_edges.reset(edges)
    width = mask.shape[1] - 1
    return type(out)(**{k: _unpad(v, starts, lengths, width) for k, v in out.items()})


def install_padding_free(model: torch.nn.Module) -> bool:
    """Make ``model``'s fused forward run padded batches as packed rows (idempotent).

    ``model`` must already have its fused head (TRL's trainers install it at init).
    Switches ``sdpa`` to ``posttrain_varlen_sdpa`` (which is ``sdpa`` whenever no
    sequence boundaries are given). Returns False, changing nothing, where the
    attention implementation cannot keep packed rows apart.
    """
    inner = unwrap_model(model)
    current = inner.config._attn_implementation
    target = packed_attention(current)
    if target is None:
        return False
    if inner.__dict__.get(_MARKER):
        return True
    if target != current:
        register_varlen_sdpa()
        inner.set_attn_implementation(target)
    fused = inner.forward

    @functools.wraps(fused)
    def padding_free_forward(*args, **kwargs):
        if not args and kwargs.get("fused_lm_head"):
            out = _pack_call(fused, kwargs)
            if out is not None:
                return out
        return fused(*args, **kwargs)

    inner.forward = padding_free_forward
    setattr(inner, _MARKER, True)
    return True


# ----------------------------------------------------------------------------- the job's setting
def resolve_packing(mode: str, model: torch.nn.Module) -> tuple[bool, str]:
    """``(pack, event)`` for a job's ``packing`` setting (``auto``/``padding_free``/``off``)
    on ``model``; ``padding_free`` on an attention implementation that cannot keep packed
    rows apart is refused (``JobError``), ``auto`` falls back to padded batches."""
    from trainers.contract.errors import JobError

    impl = unwrap_model(model).config._attn_implementation
    if mode == "off":
        return False, "Padded batches (packing: off)"
    if packing_supported(model):
        return True, f"Padding-free batches: each micro-batch runs as one packed row ({impl})"
    if mode == "padding_free":
        raise JobError(
            "invalid_value",
            f"packing 'padding_free' needs an attention implementation that keeps packed rows "
            f"apart (sdpa, eager, flash-attention); this model uses '{impl}'. Set packing to "
            f"'auto' or 'off'",
            "hyperparameters.packing",
        )
    return False, f"Padded batches: attention '{impl}' cannot keep packed rows apart"


def install_on_trainer(trainer) -> None:
    """Padding-free forwards on a trainer's policy and, if it has one, reference model."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            install_padding_free(model)
