"""GRPO batches scored in length groups (``trainers/algorithms/grpo/padding.py``).

XRPO's seeded prompts are long and TRL left-pads every row to the longest. Scoring the
rows in two length groups, each without the padding all its rows share, must give the
same per-token log-probs, entropies and gradients as TRL's one padded block, through
TRL's own ``GRPOTrainer._get_per_token_logps_and_entropies`` on posttrain's fused head.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOTrainer

from trainers.algorithms.grpo import padding
from trainers.algorithms.grpo.padding import in_length_groups, length_groups
from trainers.algorithms.grpo.trainer import _rotary
from trainers.fused_head import install_fused_head

VOCAB = 61


@pytest.fixture(autouse=True)
def _keep_binding():
    before = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton)
    yield
    trl_utils._ChunkedLogProbFunction, trl_utils._use_triton = before


def _mask(needs: list[int], width: int, completions: list[int], k: int) -> torch.Tensor:
    """Left-padded prompts of ``needs`` tokens in ``width`` columns, then right-padded
    completions of ``completions`` tokens in ``k`` columns."""
    rows = []
    for need, done in zip(needs, completions, strict=True):
        rows.append([0] * (width - need) + [1] * need + [1] * done + [0] * (k - done))
    return torch.tensor(rows)


def test_two_groups_when_they_skip_a_quarter_of_the_positions():
    # needs 2, 2, 8, 8 in 8 prompt columns, 3 completion columns: one block is 4 x 11 = 44
    # positions; split after the short rows, 2 x (2 + 3) + 2 x 11 = 32 (27% fewer)
    mask = _mask([8, 2, 8, 2], 8, [3, 3, 1, 2], 3)
    assert length_groups(mask, 3) == [([1, 3], 6), ([0, 2], 0)]


def test_one_group_trimmed_when_splitting_saves_too_little():
    # needs 6, 5, 6 in 9 columns: every row shares 3 columns of padding; a split saves
    # 1 position of 27
    mask = _mask([6, 5, 6], 9, [3, 3, 3], 3)
    assert length_groups(mask, 3) == [(None, 3)]
    # a row with no prompt token keeps one column (it predicts the first completion token)
    assert length_groups(_mask([0, 0], 4, [2, 1], 2), 2) == [(None, 3)]


def _model() -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).double().eval()
    install_fused_head(model, outputs=("log_probs", "entropy"))
    return model


def _trls(model, logits_to_keep):
    """TRL's own scoring function, unchanged (it reads only ``self.accelerator``)."""
    stub = SimpleNamespace(accelerator=SimpleNamespace(autocast=nullcontext, is_main_process=True))

    def score(ids, mask):
        return GRPOTrainer._get_per_token_logps_and_entropies(
            stub, model, ids, mask, logits_to_keep, None, True
        )

    return score


def _logps_entropies_grads(model, score, ids, mask, k):
    logps, ent, _ = score(ids, mask)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(logps.shape, generator=gen, dtype=logps.dtype)
    cmask = mask[:, -k:]
    objective = ((logps * weights + ent) * cmask).sum()
    grads = torch.autograd.grad(objective, list(model.parameters()))
    return logps * cmask, ent * cmask, grads


@pytest.mark.parametrize(
    "needs",
    [[30, 28, 4, 5, 3, 4], [4, 5, 28, 3, 30, 4, 27, 5]],
    ids=["seeded rows first", "seeded rows mixed"],
)
def test_length_groups_give_trls_log_probs_entropies_and_gradients(needs):
    model = _model()
    k, width = 6, 30
    done = [6, 3, 6, 1, 5, 6, 2, 4][: len(needs)]
    mask = _mask(needs, width, done, k)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, mask.shape, generator=gen).masked_fill(mask == 0, 0)
    groups = length_groups(mask, k)
    assert len(groups) == 2  # the test has teeth: the rows really are split and trimmed
    score = _trls(model, k)
    ref = _logps_entropies_grads(model, score, ids, mask, k)

    seen = []
    real_forward = model.forward

    def counting_forward(*args, **kwargs):
        seen.append(kwargs["input_ids"].numel())
        return real_forward(*args, **kwargs)

    model.forward = counting_forward
    got = _logps_entropies_grads(model, lambda i, m: in_length_groups(score, i, m, k), ids, mask, k)
    assert sum(seen) < 0.6 * ids.numel()  # the positions the backbone no longer runs
    # fp64 model, but transformers computes the rotary angles in fp32, and the rows' absolute
    # positions shift by the columns dropped: agreement to fp32 rounding, not to fp64's
    for a, b in zip(got[:2], ref[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_the_switch_scores_one_block():
    calls = []
    mask = _mask([8, 2, 8, 2], 8, [3, 3, 1, 2], 3)
    padding.LENGTH_GROUPS = False
    try:
        in_length_groups(lambda i, m: calls.append(i.shape) or (None, None, None), mask, mask, 3)
    finally:
        padding.LENGTH_GROUPS = True
    assert calls == [mask.shape]


def test_rotary_models_are_recognised():
    assert _rotary(_model())
    assert not _rotary(torch.nn.Linear(2, 2))


def test_the_trainer_scores_in_groups_only_with_a_planner():
    from trainers.algorithms.grpo.trainer import PosttrainGRPOTrainer

    model = _model()
    k, width = 6, 30
    mask = _mask([30, 28, 4, 5, 3, 4], width, [6, 3, 6, 1, 5, 6], k)
    ids = torch.randint(2, VOCAB, mask.shape).masked_fill(mask == 0, 0)
    trainer = PosttrainGRPOTrainer.__new__(PosttrainGRPOTrainer)  # only what the call reads
    trainer.accelerator = SimpleNamespace(autocast=nullcontext, is_main_process=True)
    shapes = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: (
        shapes.append(tuple(kw["input_ids"].shape)) or real_forward(*a, **kw)
    )
    results = {}
    for planner in (None, object()):
        trainer.pt_planner = planner
        shapes.clear()
        with torch.no_grad():
            results[planner is None] = trainer._get_per_token_logps_and_entropies(
                model, ids, mask, k, None, True
            )
        assert shapes == ([(6, 36)] if planner is None else [(4, 11), (2, 36)])
    for a, b in zip(results[False][:2], results[True][:2], strict=True):
        torch.testing.assert_close(a * mask[:, -k:], b * mask[:, -k:], rtol=1e-5, atol=1e-5)
