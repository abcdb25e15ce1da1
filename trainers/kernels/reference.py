"""Naive reference for the fused "linear -> token log-prob (+ entropy)" op.

This is the obvious implementation that materialises the full ``[N, V]``
logits: it is the correctness oracle for the tests and the baseline of
``bench/kernels.py``. It is not meant for training: at N=4096, V=151936 the
fp32 logits alone take 2.5 GB and autograd keeps several such buffers.

Formula (``T`` = temperature, ``s`` = logit scale, ``c`` = optional soft-cap,
``y`` = targets)::

    r       = (hidden @ weight.T + bias) * s              [N, V]
    z       = r / T,  or  c * tanh(r / c) / T with a soft-cap
    logp    = log_softmax(z)[i, y_i]                       [N]
    entropy = -sum_j p_ij log p_ij,  p = softmax(z)        [N]

The projection runs in the input dtype (as ``F.linear`` would in a model) and
the softmax in fp32, or in fp64 for fp64 inputs. Rows whose target equals
``ignore_index`` return exactly 0 for both outputs and receive no gradient.
``naive_head_stats`` adds the non-differentiable statistics of TRL's fused LM
head (``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` with argmax semantics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-token outputs: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_logits(hidden, weight, bias=None, temperature=1.0, logit_scale=1.0, softcap=None):
    """The full ``[N, V]`` transformed logits (fp32, fp64 for fp64 inputs)."""
    logits = F.linear(hidden, weight, bias).to(output_dtype(hidden.dtype)) * logit_scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def naive_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and entropy) through fully materialised logits.

    Args:
        hidden: ``[N, H]`` final hidden states.
        weight: ``[V, H]`` LM-head weight.
        targets: ``[N]`` int64 token ids; ``ignore_index`` marks skipped rows.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it before the softmax.
        ignore_index: target value whose rows return 0 and get no gradient.
        return_entropy: also return the entropy of each row's distribution.
        logit_scale: multiplies the logits before the soft-cap and the temperature.
        softcap: if set, ``z = softcap * tanh(z / softcap)`` before the temperature.

    Returns:
        ``logp`` ``[N]`` (fp32, fp64 for fp64 inputs), or ``(logp, entropy)``.
    """
    logits = naive_logits(hidden, weight, bias, temperature, logit_scale, softcap)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def naive_head_stats(
    hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None
) -> dict[str, torch.Tensor]:
    """Every per-token output of the fused LM head, from full logits (targets all valid).

    Keys: ``logp``, ``entropy`` (differentiable), ``log_sum_sq_probs``, ``mean_logits``
    and ``is_top1`` (the target is ``argmax``, i.e. the FIRST maximal index; detached).
    """
    logits = naive_logits(hidden, weight, bias, temperature, logit_scale, softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    detached = log_probs.detach()
    return {
        "logp": log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "entropy": -(log_probs.exp() * log_probs).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * detached, dim=-1),
        "mean_logits": logits.detach().mean(-1),
        "is_top1": logits.detach().argmax(-1) == targets,
    }
