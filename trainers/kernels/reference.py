"""Naive reference for the fused "linear -> token log-prob (+ entropy)" op.

This is the obvious implementation that materialises the full ``[N, V]``
logits: it is the correctness oracle for the tests and the baseline of
``bench/kernels.py``. It is not meant for training: at N=4096, V=151936 the
fp32 logits alone take 2.5 GB and autograd keeps several such buffers.

Formula (``T`` = temperature, ``y`` = targets)::

    z       = (hidden @ weight.T + bias) / T              [N, V]
    logp    = log_softmax(z)[i, y_i]                       [N]
    entropy = -sum_j p_ij log p_ij,  p = softmax(z)        [N]

The projection runs in the input dtype (as ``F.linear`` would in a model) and
the softmax in fp32, or in fp64 for fp64 inputs. Rows whose target equals
``ignore_index`` return exactly 0 for both outputs and receive no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-token outputs: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
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

    Returns:
        ``logp`` ``[N]`` (fp32, fp64 for fp64 inputs), or ``(logp, entropy)``.
    """
    dtype = output_dtype(hidden.dtype)
    logits = F.linear(hidden, weight, bias).to(dtype) / temperature
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
