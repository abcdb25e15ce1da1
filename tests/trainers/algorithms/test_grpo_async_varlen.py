"""The CPU stand-in of FA3's varlen kernel (trainers/algorithms/grpo_async/varlen.py):
each segment's output equals dense causal attention over the segment's whole path, whose
last tokens the segment's queries are (FlashAttention's bottom-right causal alignment),
with grouped K/V heads, a sliding window and gradients; and installing it makes TRL's
own tree attention give what a plain causal forward of each sample gives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.algorithms.grpo_async import varlen


def dense(q, k, v, scale, window=None):
    """Causal attention of one whole sequence: q (Lq, H, d) are the last Lq of Lk."""
    lq, lk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)
    kh = k.transpose(0, 1).repeat_interleave(rep, 0)
    vh = v.transpose(0, 1).repeat_interleave(rep, 0)
    i = torch.arange(lq).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk).unsqueeze(0)
    keep = j <= i
    if window is not None:
        keep &= j >= i - window
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, scale=scale)
    return out.transpose(0, 1)


def test_segments_equal_dense_causal_attention_over_their_paths():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 4, 2, 8
    # Three segments: a 5-token root, and two branches of 3 and 4 tokens under it.
    # Each segment's K/V rows are its root-to-segment path, as TRL's TreeRow.pack lays them.
    q = torch.randn(12, heads, d, generator=g, requires_grad=True)
    kv_rows = torch.randn(12, kv_heads, d, generator=g)
    val_rows = torch.randn(12, kv_heads, d, generator=g)
    paths = [
        list(range(0, 5)),
        list(range(0, 5)) + list(range(5, 8)),
        list(range(0, 5)) + list(range(8, 12)),
    ]
    kv_index = torch.tensor([p for path in paths for p in path])
    cu_q = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 13, 22], dtype=torch.int32)
    k, v = kv_rows.index_select(0, kv_index), val_rows.index_select(0, kv_index)
    for window in (None, 2):
        out, lse = varlen.flash_attn_varlen_func(
            q,
            k,
            v,
            cu_q,
            cu_k,
            5,
            9,
            softmax_scale=0.3,
            causal=True,
            window_size=(window, 0) if window is not None else (-1, -1),
        )
        assert out.shape == (12, heads, d) and lse.shape == (heads, 12)
        for s, path in enumerate(paths):
            a, b = cu_q[s].item(), cu_q[s + 1].item()
            want = dense(q[a:b], kv_rows[path], val_rows[path], 0.3, window)
            torch.testing.assert_close(out[a:b], want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_installed_tree_attention_equals_a_plain_forward(tmp_path):
    """TRL's tree attention with this kernel, over two samples sharing a prompt, gives each
    sample's log-probabilities of a plain (sdpa) forward of that sample alone."""
    from transformers import AutoModelForCausalLM
    from trl.experimental.async_grpo.packing import TREE_ATTENTION, TreeRow, register_tree_attention

    from trainers.tiny_model import build_tiny_model

    assert varlen.install("cpu") and varlen.installed()
    register_tree_attention()
    path = build_tiny_model(tmp_path / "m", seed=0)
    tree = AutoModelForCausalLM.from_pretrained(path, attn_implementation=TREE_ATTENTION).eval()
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    prompt = [7, 8, 9, 10, 11]
    samples = [[*prompt, 20, 21, 22], [*prompt, 30, 31, 32, 33]]
    row = TreeRow()
    for i, ids in enumerate(samples):
        mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        row.add(
            {
                "input_ids": torch.tensor(ids),
                "completion_mask": torch.tensor(mask),
                "old_log_probs": torch.zeros(len(ids)),
                "advantage": 1.0,
                "group_id": 0,
                "i": i,
            }
        )
    packed = row.pack()
    assert len(packed["input_ids"]) < sum(map(len, samples))  # the prompt is forwarded once
    with torch.no_grad():
        logits = tree(
            input_ids=packed["input_ids"].unsqueeze(0),
            position_ids=packed["position_ids"].unsqueeze(0),
            tree_kv_index=packed["tree_kv_index"],
            tree_cu_seqlens_q=packed["tree_cu_seqlens_q"],
            tree_cu_seqlens_k=packed["tree_cu_seqlens_k"],
            tree_max_seqlen_q=int(packed["tree_max_seqlens"][0]),
            tree_max_seqlen_k=int(packed["tree_max_seqlens"][1]),
        ).logits[0]
        got = (
            logits.log_softmax(-1)[packed["token_index"]]
            .gather(
                1,
                packed["input_ids"]
                .new_tensor([t for ids in samples for t in ids[len(prompt) :]])
                .unsqueeze(1),
            )
            .squeeze(1)
        )
        want = []
        for ids in samples:
            lp = plain(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            want += [lp[p - 1, ids[p]].item() for p in range(len(prompt), len(ids))]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-5)
