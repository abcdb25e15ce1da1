"""Per-token log-probs (and entropy) of a causal LM, through the model's fused LM head.

``causal_lm_logprobs`` calls the model itself, ``model(input_ids=..., labels=...,
fused_lm_head=True)``: TRL 1.16's patched forward (``trainers.fused_head``, which
installs it when missing) runs the backbone and posttrain's kernel on the LM
head's weight, so the ``[tokens, vocab]`` logits never exist. Going through the
model's own forward is the point: DDP arms its gradient all-reduce only inside
``DistributedDataParallel.forward``, and FSDP/ZeRO-3 gather the head there. The
wrapper also applies the model's logit scale and soft-cap.

``forbid_full_logits`` enforces the rule: while gradients are on, calling the
LM head module (which is what building full logits means) raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.fused_head import install_fused_head, unwrap_model

IGNORE_INDEX = -100


@dataclass
class TokenLogprobs:
    """Per-position results, aligned with ``labels[:, 1:]`` (zeros where the label is ignored).

    logp:    [B, T-1] fp32 (fp64 for an fp64 model) log π(y_t | y_<t), at the head's temperature
    entropy: [B, T-1] entropy of π(· | y_<t), or None if not asked for
    mask:    [B, T-1] bool, True where the label counts
    top1:    [B, T-1] bool, the label is the argmax (first maximal index; token accuracy); no grad
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor
    top1: torch.Tensor


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    **model_kwargs,
) -> TokenLogprobs:
    """Score ``labels[:, 1:]`` given ``input_ids`` through ``model``'s fused forward.

    ``model`` may be wrapped (peft, DDP): it is called as is, and the fused head is
    installed on the transformers model inside when missing (or patched again when
    it lacks entropy / is_top1). Positions labelled -100 come back as zeros.
    ``model_kwargs`` go to the forward (e.g. ``position_ids``).
    """
    needed = ("log_probs", "is_top1", *(("entropy",) if return_entropy else ()))
    install_fused_head(model, outputs=needed)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        fused_lm_head=True,
        **model_kwargs,
    )
    entropy = out.entropy if return_entropy else None
    return TokenLogprobs(out.log_probs, entropy, out.label_mask, out.is_top1)


class FullLogitsForbidden(RuntimeError):
    pass


def forbid_full_logits(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make any training-path call of the LM head module raise (generation is unaffected).

    The fused head reads the head's weight directly, so the module itself only
    runs when something builds full logits with gradients on.
    """
    head = unwrap_model(model).get_output_embeddings()

    def _refuse(module, args):
        if torch.is_grad_enabled() and module.training:
            raise FullLogitsForbidden(
                "a training step asked the LM head for full [tokens x vocab] logits; posttrain "
                "trainers must call the model with fused_lm_head=True (see trainers.fused_head)"
            )

    return head.register_forward_pre_hook(_refuse)
