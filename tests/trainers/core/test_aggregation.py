"""Loss aggregation: Ex 2's aggregates by hand, the equalities, accumulation and ranks.

Worked numbers: ``docs/algorithms/grpo.md``.
"""

from __future__ import annotations

import pytest
import torch

from trainers.contract.methods.grpo import AGGREGATION_NAMES
from trainers.core import AGGREGATIONS, GLOBAL_NORMALISED, get_aggregation

F64 = torch.float64
grpo, bnpo = get_aggregation("grpo"), get_aggregation("bnpo")
dr_grpo, dapo = get_aggregation("dr_grpo"), get_aggregation("dapo")

# Spec Ex 2 per-token totals (pg + 0.04·k3); the padding holds junk the mask must remove.
LOSS = torch.tensor([[-0.9524, -1.1085, 7.0, 7.0], [0.6987, 0.8227, 0.8662, 7.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)


def test_registry_keys_are_the_names_the_api_accepts():
    assert tuple(AGGREGATIONS) == AGGREGATION_NAMES
    assert GLOBAL_NORMALISED <= set(AGGREGATIONS)
    with pytest.raises(KeyError, match="grpo, bnpo, dr_grpo, dapo"):
        get_aggregation("token_mean")


def test_ex2_aggregates():
    # row sums: −2.0609 over 2 tokens, 2.3876 over 3 tokens; total 0.3267 over 5 tokens
    # grpo    = (−2.0609/2 + 2.3876/3)/2 = (−1.03045 + 0.79587)/2 = −0.1173
    # bnpo    = 0.3267/5 = 0.0653(4)
    # dr_grpo = 0.3267/(2·4) = 0.0408
    # dapo    = 0.3267/5 with N_tok = 5
    assert grpo(LOSS, MASK).item() == pytest.approx((-2.0609 / 2 + 2.3876 / 3) / 2)
    assert bnpo(LOSS, MASK).item() == pytest.approx(0.3267 / 5)
    assert dr_grpo(LOSS, MASK, max_completion_length=4).item() == pytest.approx(0.3267 / 8)
    assert dapo(LOSS, MASK, num_items=5).item() == pytest.approx(0.3267 / 5)
    rounded = [
        round(x, 4)
        for x in (grpo(LOSS, MASK).item(), dr_grpo(LOSS, MASK, max_completion_length=4).item())
    ]
    assert rounded == [-0.1173, 0.0408]


def random_loss(seed: int, B=5, T=8, equal=False):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=gen, dtype=F64)
    lengths = torch.full((B,), 6) if equal else torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return loss, mask


def test_equal_lengths_make_grpo_bnpo_and_rescale_dr_grpo():
    loss, mask = random_loss(0, equal=True)
    assert torch.allclose(grpo(loss, mask), bnpo(loss, mask))
    assert torch.allclose(dr_grpo(loss, mask, max_completion_length=10), bnpo(loss, mask) * 6 / 10)


def test_dapo_is_bnpo_on_one_rank_without_accumulation():
    loss, mask = random_loss(1)
    assert torch.allclose(dapo(loss, mask, num_items=int(mask.sum())), bnpo(loss, mask))


def test_dapo_summed_over_accumulation_and_averaged_over_ranks_is_the_global_token_mean():
    # 2 ranks x 3 accumulation micro-batches; DDP averages rank gradients, accumulation sums.
    parts = [random_loss(seed) for seed in range(6)]
    n_tok = sum(int(m.sum()) for _, m in parts)
    per_rank = [
        sum(
            dapo(loss, mask, num_items=n_tok, world_size=2)
            for loss, mask in parts[r * 3 : r * 3 + 3]
        )
        for r in range(2)
    ]
    everything = bnpo(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert torch.allclose(sum(per_rank) / 2, everything)


def test_padding_never_counts_and_empty_rows_do_not_divide_by_zero():
    loss, mask = random_loss(2)
    junk = torch.where(mask, loss, torch.full_like(loss, 1e9))
    for name, hp in (
        ("grpo", {}),
        ("bnpo", {}),
        ("dr_grpo", {"max_completion_length": 8}),
        ("dapo", {"num_items": 17}),
    ):
        fn = get_aggregation(name)
        assert torch.allclose(fn(junk, mask, **hp), fn(loss * mask, mask, **hp))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert grpo(loss[:2, :3], empty) == 0 and bnpo(loss[:2, :3], empty) == 0


def test_aggregates_carry_the_gradient_of_the_valid_tokens_only():
    loss, mask = random_loss(3)
    loss.requires_grad_(True)
    (g,) = torch.autograd.grad(bnpo(loss, mask), loss)
    assert torch.allclose(g, mask.double() / mask.sum())
    with pytest.raises(ValueError, match="max_completion_length"):
        dr_grpo(loss, mask, max_completion_length=0)
