"""Only the labelled positions reach posttrain's kernel, on CPU too, with nothing else changed.

TRL 1.16's fused forward passes the kernel every position on CPU (labels clamped to 0,
ignored ones zeroed afterwards); while posttrain's kernel is bound it passes only the
positions whose label is not -100 (``trainers.fused_head._compact_rows``). These tests
count the rows the kernel is given and check that every output field of
``FusedCausalLMOutput`` and every parameter gradient is the same with the skipping on as
with it off (``SKIP_MASKED_ROWS = False``), over random masks, rows with no label,
rows with every label, and a batch with no label at all (which must still backpropagate).
Every test puts back the binding and the switch it found.
"""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainers import fused_head
from trainers.fused_head import (
    TRL_COMPACTS,
    PosttrainLogProbFunction,
    install_fused_head,
    posttrain_kernel,
    restore_trl_kernel,
    trl_kernel,
    use_posttrain_kernel,
)

F64 = torch.float64
VOCAB = 97
FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits")
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def _keep_binding():
    before = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton)
    switch = fused_head.SKIP_MASKED_ROWS
    torch.manual_seed(0)
    yield
    trl_utils._ChunkedLogProbFunction, trl_utils._use_triton = before
    fused_head.SKIP_MASKED_ROWS = switch


def _model(dtype):
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    install_fused_head(model, outputs=OUTPUTS)
    return model


def _labels(kind: str, rows=5, seq=14, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    ids[:, 3] = 0  # token 0 is a real label: the clamped CPU path cannot tell it from -100
    attn = torch.ones_like(ids)
    if kind == "random":
        keep = torch.rand(rows, seq, generator=gen) < 0.4
        keep[1] = False  # a row with no label
        keep[2] = True  # a row with every label
    elif kind == "prompt+padding":  # DPO's shape: left prompt, right padding
        keep = torch.zeros(rows, seq, dtype=torch.bool)
        for r in range(rows):
            keep[r, 4 + r : seq - r] = True
            attn[r, seq - r :] = 0
    elif kind == "none":
        keep = torch.zeros(rows, seq, dtype=torch.bool)
    else:  # "all"
        keep = torch.ones(rows, seq, dtype=torch.bool)
    return ids, attn, ids.masked_fill(~keep, -100)


def _run(model, ids, attn, labels):
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    gen = torch.Generator().manual_seed(1)
    gl = torch.randn(out.log_probs.shape, generator=gen, dtype=out.log_probs.dtype)
    ge = torch.randn(out.log_probs.shape, generator=gen, dtype=out.log_probs.dtype)
    objective = out.loss + (out.log_probs * gl).sum() + (out.entropy * ge).sum()
    params = list(model.parameters())
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return out, grads


def _counting(monkeypatch) -> list[int]:
    rows: list[int] = []
    real = fused_head.head_stats
    monkeypatch.setattr(
        fused_head, "head_stats", lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k)
    )
    return rows


@pytest.mark.parametrize("kind", ["random", "prompt+padding", "none", "all"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
def test_skipping_ignored_rows_changes_no_output_and_no_gradient(kind, dtype, monkeypatch):
    model = _model(dtype)
    ids, attn, labels = _labels(kind)
    rows = _counting(monkeypatch)
    fused_head.SKIP_MASKED_ROWS = False
    full, full_grads = _run(model, ids, attn, labels)
    fused_head.SKIP_MASKED_ROWS = True
    kept, kept_grads = _run(model, ids, attn, labels)
    n_labelled = int((labels[:, 1:] != -100).sum())
    assert rows == [ids.shape[0] * (ids.shape[1] - 1), n_labelled]  # every position, then kept
    assert torch.equal(kept.label_mask, full.label_mask)
    assert torch.equal(kept.is_top1, full.is_top1)
    assert not kept.is_top1[~kept.label_mask].any()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-6}
    for name in FIELDS:
        a, b = getattr(kept, name), getattr(full, name)
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=name)
        if name != "loss":
            assert a[~kept.label_mask].eq(0).all(), name
    for (pname, _), a, b in zip(model.named_parameters(), kept_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=pname)
    if kind == "none":  # a batch with no label still backpropagates, a zero
        assert all(g.eq(0).all() for g in kept_grads)


def test_a_batch_with_no_label_backpropagates_through_loss_backward():
    model = _model(torch.float32).train()
    ids, attn, labels = _labels("none")
    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.eq(0).all()


def test_the_row_rule_follows_the_kernel_binding():
    use_posttrain_kernel()
    assert trl_utils._use_triton is fused_head._compact_rows
    assert trl_utils._use_triton(torch.device("cpu"))
    fused_head.SKIP_MASKED_ROWS = False
    assert not trl_utils._use_triton(torch.device("cpu"))  # TRL's rule: no triton on CPU
    fused_head.SKIP_MASKED_ROWS = True
    with trl_kernel():
        assert trl_utils._use_triton is TRL_COMPACTS
    assert trl_utils._use_triton is fused_head._compact_rows
    restore_trl_kernel()
    assert trl_utils._use_triton is TRL_COMPACTS
    with posttrain_kernel():
        assert trl_utils._ChunkedLogProbFunction is PosttrainLogProbFunction
        assert trl_utils._use_triton is fused_head._compact_rows
    assert trl_utils._use_triton is TRL_COMPACTS


def test_trls_own_kernel_still_gets_every_position_on_cpu(monkeypatch):
    model = _model(torch.float32)
    ids, attn, labels = _labels("prompt+padding")
    seen = []
    with trl_kernel():
        trl_apply = trl_utils._ChunkedLogProbFunction.apply

        def counting(hidden, *args):
            seen.append(hidden.shape[0])
            return trl_apply(hidden, *args)

        monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
        model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
    assert seen == [ids.shape[0] * (ids.shape[1] - 1)]
