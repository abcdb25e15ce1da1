"""Per-token log-probs (and entropy) of a causal LM, through posttrain's fused kernel.

This is the only way a posttrain trainer turns hidden states into token
log-probabilities on the training path: it runs the model's backbone, shifts
the labels, and hands ``[tokens, hidden]`` to ``trainers.kernels.token_logprobs``
with the LM head's weight, so the ``[tokens, vocab]`` logits never exist.
``forbid_full_logits`` enforces the rule: while gradients are on, calling the
LM head module (which is what building full logits means) raises.

Departures from a model's own forward: logit soft-capping (Gemma 2) is not
supported and is refused up front; a ``logit_scale`` is folded into the
temperature (z·s/T = z/(T/s)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.kernels import token_stats

IGNORE_INDEX = -100


@dataclass
class TokenLogprobs:
    """Per-position results, aligned with ``labels[:, 1:]`` (zeros where the label is ignored).

    logp:    [B, T-1] fp32 log π(y_t | y_<t)
    entropy: [B, T-1] fp32 entropy of π(· | y_<t), or None if not asked for
    mask:    [B, T-1] bool, True where the label counts
    top1:    [B, T-1] bool, the label has the largest logit (token accuracy); no grad
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor
    top1: torch.Tensor


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft/accelerate wrappers (LoRA layers stay injected)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        else:
            return model


def _logit_transform(config) -> float:
    """The factor logits are divided by before softmax, besides the temperature."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{text.model_type} soft-caps its logits, which posttrain's fused kernel does not "
            "support yet"
        )
    scale = getattr(text, "logit_scale", None)
    return 1.0 if scale is None else 1.0 / float(scale)


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    **backbone_kwargs,
) -> TokenLogprobs:
    """Score ``labels[:, 1:]`` given ``input_ids``; positions labelled -100 cost nothing."""
    inner = _unwrap(model)
    scale = _logit_transform(inner.config)
    backbone = inner.base_model  # PreTrainedModel.base_model: the decoder without its head
    out = backbone(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_kwargs
    )
    hidden = out.last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    head = inner.get_output_embeddings()
    hidden = hidden.to(head.weight.device)
    targets = targets.to(head.weight.device)
    stats = token_stats(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        targets.reshape(-1),
        bias=head.bias,
        temperature=temperature * scale,
        ignore_index=IGNORE_INDEX,
        return_entropy=return_entropy,
    )
    shape = targets.shape
    entropy = None if stats.entropy is None else stats.entropy.view(shape)
    return TokenLogprobs(
        stats.logp.view(shape), entropy, targets != IGNORE_INDEX, stats.top1.view(shape)
    )


class FullLogitsForbidden(RuntimeError):
    pass


def forbid_full_logits(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make any training-path call of the LM head module raise (generation is unaffected).

    posttrain reads the head's weight directly through the fused kernel, so the
    module itself only runs when something builds full logits with gradients on.
    """
    head = _unwrap(model).get_output_embeddings()

    def _refuse(module, args):
        if torch.is_grad_enabled() and module.training:
            raise FullLogitsForbidden(
                "a training step asked the LM head for full [tokens x vocab] logits; posttrain "
                "trainers must use trainers.logprobs.causal_lm_logprobs instead"
            )

    return head.register_forward_pre_hook(_refuse)
