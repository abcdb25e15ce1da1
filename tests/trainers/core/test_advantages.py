"""Advantage estimators and shapers: Ex 1 and Ex 3 by hand, the invariants, loop twins.

Hand-worked numbers come from the worked examples of ``docs/algorithms/grpo.md``,
``ngrpo.md``, ``hapo.md`` and ``xrpo.md``; the arithmetic is in the comments.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
import torch

from trainers.contract.methods.grpo import ESTIMATOR_NAMES as ADVANTAGE_ESTIMATORS
from trainers.contract.methods.grpo import SHAPER_NAMES as ADVANTAGE_SHAPERS
from trainers.core import (
    ADVANTAGES,
    SHAPERS,
    AdvantageInputs,
    get_advantage,
    get_shaper,
    register_advantage,
)

F64 = torch.float64


def batch(rewards, lengths, groups=None, T=None, old_logps=None) -> AdvantageInputs:
    """Rewards [B] with ragged lengths; padding beyond L_i; one group unless given."""
    B = len(rewards)
    T = T or max(lengths)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    groups = torch.zeros(B, dtype=torch.long) if groups is None else torch.tensor(groups)
    return AdvantageInputs(
        rewards=torch.tensor(rewards, dtype=F64), groups=groups, mask=mask, old_logps=old_logps
    )


def seq(A: torch.Tensor, inp: AdvantageInputs) -> torch.Tensor:
    """[B,T] -> [B], checking A is 0 on padding and constant over each response's tokens."""
    m = inp.mask
    assert torch.all(A[~m] == 0)
    first = A[:, 0]
    assert torch.allclose(torch.where(m, A, first[:, None]), first[:, None].expand_as(A))
    return first


EX1 = dict(rewards=[1.0, 0.0, 0.0, 1.0], lengths=[2, 6, 3, 5])


# ----------------------------------------------------------------------------- registry
def test_registry_keys_are_the_names_the_api_accepts():
    assert tuple(ADVANTAGES) == ADVANTAGE_ESTIMATORS
    assert tuple(SHAPERS) == ADVANTAGE_SHAPERS


def test_unknown_names_list_the_valid_ones_and_names_register_once():
    with pytest.raises(KeyError, match="grpo, dr_grpo, ngrpo, hapo"):
        get_advantage("ppo")
    with pytest.raises(KeyError, match="none, xrpo_novelty"):
        get_shaper("novelty")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda inp: None)


def test_inputs_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="groups"):
        AdvantageInputs(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.ones(3, 4))
    with pytest.raises(ValueError, match="integer"):
        AdvantageInputs(torch.zeros(3), torch.zeros(3), torch.ones(3, 4))
    with pytest.raises(ValueError, match="old_logps"):
        AdvantageInputs(
            torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3, 4), torch.zeros(3, 5)
        )


# ----------------------------------------------------------------------------- Ex 1 by hand
def test_ex1_grpo_uses_unbiased_std_and_trl_delta():
    # μ = 0.5; Σ(r−μ)² = 4·0.25 = 1; σ = sqrt(1/3) = 0.57735; 0.5/(0.57735 + 1e-4) = 0.86588
    inp = batch(**EX1)
    A, metrics = get_advantage("grpo")(inp)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(seq(A, inp), torch.tensor([1, -1, -1, 1], dtype=F64) * expected)
    assert round(expected, 4) == 0.8659
    assert metrics["frac_reward_zero_std"] == 0


def test_ex1_dr_grpo_is_the_centred_reward():
    inp = batch(**EX1)
    assert torch.allclose(
        seq(get_advantage("dr_grpo")(inp)[0], inp), torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=F64)
    )


def test_ex1_ngrpo_adds_one_virtual_perfect_answer():
    # {1,0,0,1} ∪ {1}: μ′ = 3/5 = 0.6; Σ(r−μ′)² = 3·0.16 + 2·0.36 = 1.2; σ′ = sqrt(1.2/4) = 0.54772
    # A = 0.4/0.54772 = 0.7303 for correct, −0.6/0.54772 = −1.0954 for wrong
    inp = batch(**EX1)
    s = math.sqrt(0.3) + 1e-6
    expected = torch.tensor([0.4 / s, -0.6 / s, -0.6 / s, 0.4 / s], dtype=F64)
    got = seq(get_advantage("ngrpo")(inp)[0], inp)
    assert torch.allclose(got, expected)
    assert torch.allclose(
        got, torch.tensor([0.7303, -1.0954, -1.0954, 0.7303], dtype=F64), atol=1e-4
    )


def test_ex1_hapo_weights_rewards_by_token_count():
    # ΣL = 16, correct tokens 2 + 5 = 7: μ_tok = 7/16 = 0.4375
    # σ² = (7·0.5625² + 9·0.4375²)/16 = 1008/4096; σ = 0.49608
    # correct 0.5625/0.49608 = 1.1339, wrong −0.4375/0.49608 = −0.8819; 7·1.1339 − 9·0.8819 = 0
    inp = batch(**EX1)
    A, metrics = get_advantage("hapo")(inp)
    sd = math.sqrt(1008 / 4096) + 1e-6
    expected = torch.tensor([0.5625 / sd, -0.4375 / sd, -0.4375 / sd, 0.5625 / sd], dtype=F64)
    assert torch.allclose(seq(A, inp), expected)
    assert torch.allclose(
        seq(A, inp), torch.tensor([1.1339, -0.8819, -0.8819, 1.1339], dtype=F64), atol=1e-4
    )
    assert abs(float(A.sum())) < 1e-9  # token-weighted sum
    assert metrics["hapo/fallback_group_frac"] == 0


def test_ex1_all_wrong_and_all_correct_groups():
    wrong, right = batch([0.0] * 4, EX1["lengths"]), batch([1.0] * 4, EX1["lengths"])
    for name in ("grpo", "dr_grpo", "hapo"):
        assert torch.all(get_advantage(name)(wrong)[0] == 0)
        assert torch.all(get_advantage(name)(right)[0] == 0)
    # {0,0,0,0} ∪ {1}: μ′ = 0.2, Σ(r−μ′)² = 4·0.04 + 0.64 = 0.8, σ′ = sqrt(0.8/4) = 0.44721
    # A = −0.2/0.44721 = −0.4472 for every member
    expected = -0.2 / (math.sqrt(0.2) + 1e-6)
    assert torch.allclose(
        seq(get_advantage("ngrpo")(wrong)[0], wrong), torch.full((4,), expected, dtype=F64)
    )
    assert torch.all(get_advantage("ngrpo")(right)[0] == 0)
    _, metrics = get_advantage("grpo")(wrong)
    assert metrics["frac_reward_zero_std"] == 1


def test_ex1_hapo_guard_falls_back_to_grpo_when_a_share_is_extreme():
    # Token share of the correct answer 10/6010 < 1/26, so token-level |A| ≈ 24.5 ≥ 5.
    # E1: μ = 1/16; Σ(r−μ)² = (15/16)² + 15/256 = 240/256; σ = sqrt(0.9375/15) = 0.25
    # correct 0.9375/0.25 = 3.75, wrong −0.0625/0.25 = −0.25 (δ = 1e-6)
    inp = batch([1.0] + [0.0] * 15, [10] + [400] * 15)
    A, metrics = get_advantage("hapo")(inp)
    a = seq(A, inp)
    assert a[0].item() == pytest.approx(0.9375 / (0.25 + 1e-6))
    assert torch.allclose(a[1:], torch.full((15,), -0.0625 / (0.25 + 1e-6), dtype=F64))
    assert metrics["hapo/fallback_group_frac"] == 1
    off, _ = get_advantage("hapo")(inp, fallback_threshold=math.inf)
    assert off[0, 0] > 20  # the guard is what changed it


def test_hapo_equals_grpo_with_population_std_when_lengths_are_equal():
    # Spec Ex 1, "E1 (population std)": σ_pop = 0.5, so A = ±0.5/0.5 = ±1.0
    inp = batch(EX1["rewards"], [4, 4, 4, 4], T=6)
    assert torch.allclose(
        seq(get_advantage("hapo")(inp)[0], inp), torch.tensor([1, -1, -1, 1], dtype=F64), atol=1e-5
    )


# ----------------------------------------------------------------------------- invariants
def random_batch(seed: int, binary: bool = False, with_singletons: bool = True) -> AdvantageInputs:
    """Ragged, shuffled groups with ragged lengths (some groups constant)."""
    rng = random.Random(seed)
    rewards, groups, lengths = [], [], []
    for g in rng.sample(range(100), 6):
        size = rng.randint(1 if with_singletons else 2, 6)
        constant = rng.random() < 0.2
        base = float(rng.randint(0, 1))
        for _ in range(size):
            r = base if constant else (float(rng.randint(0, 1)) if binary else rng.uniform(-1, 2))
            rewards.append(r)
            groups.append(g)
            lengths.append(rng.randint(1, 9))
    order = list(range(len(rewards)))
    rng.shuffle(order)
    T = 10
    logps = torch.randn(len(order), T, generator=torch.Generator().manual_seed(seed), dtype=F64) - 1
    return batch(
        [rewards[i] for i in order],
        [lengths[i] for i in order],
        [groups[i] for i in order],
        T=T,
        old_logps=logps,
    )


def members(inp: AdvantageInputs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(inp.groups.tolist()):
        out.setdefault(g, []).append(i)
    return out


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_group_advantages_sum_to_zero_and_vanish_for_constant_groups(name):
    inp = random_batch(0)
    a = seq(get_advantage(name)(inp)[0], inp)
    for idx in members(inp).values():
        assert abs(float(a[idx].sum())) < 1e-9
        if len(set(inp.rewards[idx].tolist())) == 1:
            assert torch.all(a[idx] == 0)


def test_grpo_is_affine_invariant_and_dr_grpo_scales():
    inp = random_batch(1)
    moved = AdvantageInputs(3.0 * inp.rewards - 2.0, inp.groups, inp.mask)
    grpo = get_advantage("grpo")
    # Invariant up to δ: with a tiny δ the two agree (3σ + δ vs σ + δ).
    assert torch.allclose(grpo(moved, delta=1e-12)[0], grpo(inp, delta=1e-12)[0], atol=1e-6)
    dr = get_advantage("dr_grpo")
    assert torch.allclose(dr(moved)[0], 3.0 * dr(inp)[0])


# Plain loop twins of the vectorised estimators (E1–E4), one group at a time.
def loop_grpo(r, scale="group", delta=1e-4, batch_std=0.0):
    mu = statistics.fmean(r)
    sd = statistics.stdev(r) if len(r) > 1 else 0.0
    if scale == "none":
        return [x - mu for x in r]
    return [(x - mu) / ((sd if scale == "group" else batch_std) + delta) for x in r]


def loop_ngrpo(r, r_max=1.0, k=1, delta=1e-6):
    if len(r) == 1:  # the authors' verl code: a lone response has mu = 0, sigma = 1
        return list(r)
    aug = list(r) + [r_max] * k
    mu = statistics.fmean(aug)
    sd = statistics.stdev(aug) if len(aug) > 1 else 0.0
    return [(x - mu) / (sd + delta) for x in r]


def loop_hapo(r, lengths, delta=1e-6, threshold=5.0):
    total = sum(lengths)
    mu = sum(n * x for x, n in zip(r, lengths, strict=True)) / total
    sd = math.sqrt(sum(n * (x - mu) ** 2 for x, n in zip(r, lengths, strict=True)) / total)
    a = [(x - mu) / (sd + delta) for x in r]
    if any(abs(v) >= threshold for v in a):
        return loop_grpo(r, delta=delta)
    return a


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_estimators_match_loop_versions_on_ragged_groups(seed):
    inp = random_batch(seed, binary=seed % 2 == 0)
    lengths = inp.mask.sum(1).tolist()
    batch_std = statistics.stdev(inp.rewards.tolist())
    cases = {
        ("grpo", "group"): lambda r, n: loop_grpo(r),
        ("grpo", "batch"): lambda r, n: loop_grpo(r, "batch", batch_std=batch_std),
        ("grpo", "none"): lambda r, n: loop_grpo(r, "none"),
        ("dr_grpo", None): lambda r, n: loop_grpo(r, "none"),
        ("ngrpo", None): lambda r, n: loop_ngrpo(r),
        ("hapo", None): loop_hapo,
    }
    for (name, scale), loop in cases.items():
        hp = {"scale": scale} if scale else {}
        a = seq(get_advantage(name)(inp, **hp)[0], inp)
        for idx in members(inp).values():
            r = inp.rewards[idx].tolist()
            expected = torch.tensor(loop(r, [lengths[i] for i in idx]), dtype=F64)
            assert torch.allclose(a[idx], expected, atol=1e-9), (name, scale, r)


def test_hapo_guard_fires_per_group_as_in_the_loop_version():
    # Ex 1's extreme group (id 3) interleaved with Ex 1's ordinary group (id 1).
    rewards = [1.0, 1.0] + [0.0] * 15 + [0.0, 0.0, 1.0]
    lengths = [10, 2] + [400] * 15 + [6, 3, 5]
    groups = [3, 1] + [3] * 15 + [1, 1, 1]
    inp = batch(rewards, lengths, groups)
    A, metrics = get_advantage("hapo")(inp)
    a = seq(A, inp)
    assert metrics["hapo/fallback_group_frac"] == 0.5
    for idx in members(inp).values():
        expected = loop_hapo([rewards[i] for i in idx], [lengths[i] for i in idx])
        assert torch.allclose(a[idx], torch.tensor(expected, dtype=F64), atol=1e-9)
    assert a[0].item() == pytest.approx(3.75, abs=1e-4)  # fell back
    assert a[1].item() == pytest.approx(1.1339, abs=1e-4)  # token-level


def test_grpo_batch_scale_is_trls_formula():
    # TRL 1.16: (r − mean_grouped) / (nanstd(all rewards) + 1e-4), nanstd unbiased
    inp = random_batch(7, with_singletons=False)
    a = seq(get_advantage("grpo")(inp, scale="batch")[0], inp)
    mean = torch.stack([inp.rewards[inp.groups == g].mean() for g in inp.groups])
    assert torch.allclose(a, (inp.rewards - mean) / (inp.rewards.std() + 1e-4))


def test_a_group_of_one_gets_zero_advantage():
    inp = batch([1.0, 0.0, 1.0], [3, 3, 3], groups=[5, 9, 9])
    for name in ("grpo", "dr_grpo", "hapo"):
        assert torch.all(get_advantage(name)(inp)[0][0] == 0)


def test_a_lone_response_keeps_its_reward_under_ngrpo_and_gets_zero_under_grpo():
    """Group of one: NGRPO's authors' code takes mu = 0, sigma = 1 there (A = r); TRL's GRPO
    arithmetic gives sigma = 0 and so A = 0."""
    inp = batch([0.7, 1.0, 0.0], [2, 2, 2], groups=[0, 1, 1])
    assert seq(get_advantage("ngrpo")(inp)[0], inp)[0].item() == 0.7
    assert seq(get_advantage("grpo")(inp)[0], inp)[0].item() == 0.0


def test_ngrpo_reduces_to_grpo_without_virtual_samples():
    inp = random_batch(3)
    ngrpo = get_advantage("ngrpo")(inp, n_virtual=0)[0]
    assert torch.allclose(ngrpo, get_advantage("grpo")(inp, delta=1e-6)[0], atol=1e-12)


def test_ngrpo_all_wrong_groups_are_equal_and_negative_and_sums_are_negative():
    inp = random_batch(5, binary=True)
    a = seq(get_advantage("ngrpo")(inp)[0], inp)
    for idx in members(inp).values():
        r = inp.rewards[idx]
        if len(idx) == 1:  # a lone response keeps its reward (the authors' code)
            assert a[idx].item() == r.item()
            continue
        if torch.all(r == 1):
            assert torch.all(a[idx].abs() < 1e-9)
            continue
        assert a[idx].sum() < 0
        if torch.all(r == 0):
            assert torch.all(a[idx] < 0) and torch.allclose(a[idx], a[idx][:1].expand(len(idx)))


def test_hapo_token_weighted_sum_is_zero_per_group_when_guard_is_quiet():
    inp = random_batch(2)
    A, metrics = get_advantage("hapo")(inp)
    assert metrics["hapo/fallback_group_frac"] == 0
    for idx in members(inp).values():
        assert abs(float(A[idx].sum())) < 1e-8


# ----------------------------------------------------------------------------- XRPO, Ex 3
def novelty_batch(s, rewards=(1.0, 1.0, 0.0, 0.0), lengths=(3, 5, 2, 4)):
    """old_logps whose valid-token mean is s_i; padding holds junk that must be ignored."""
    T = max(lengths) + 1
    lo = torch.full((len(s), T), -50.0, dtype=F64)
    for i, (si, n) in enumerate(zip(s, lengths, strict=True)):
        wiggle = torch.linspace(-0.2, 0.2, n, dtype=F64)  # mean 0
        lo[i, :n] = si + wiggle
    return batch(list(rewards), list(lengths), T=T, old_logps=lo)


def test_ex3_xrpo_sharpens_the_less_likely_correct_answer():
    # s̄ = (−0.30 − 0.62 − 0.50 − 0.58)/4 = −0.5
    # η₁ = e^{0.2} = 1.2214 → bonus max(2.5·(1 − 1.2214), 0) = 0
    # η₂ = e^{−0.12} = 0.8869 → 2.5·0.1131 = 0.2827 < κA = 0.5·0.8659 → A⁺ = 1.1486
    inp = novelty_batch([-0.30, -0.62, -0.50, -0.58])
    A, _ = get_advantage("grpo")(inp)
    shaped, metrics = get_shaper("xrpo_novelty")(inp, A)
    a, out = seq(A, inp), seq(shaped, inp)
    bonus = 2.5 * (1 - math.exp(-0.12))
    assert out[0] == a[0] and torch.equal(out[2:], a[2:])
    assert out[1].item() == pytest.approx(a[1].item() + bonus)
    assert round(out[1].item(), 4) == 1.1486
    assert metrics["xrpo/bonus_frac"] == 0.25


def test_ex3_xrpo_bonus_is_capped_at_kappa_times_advantage():
    # s₂ = −0.95: s̄ = −0.5825, η₂ = e^{−0.3675} = 0.6925, 2.5·0.3075 = 0.769 > 0.5·0.8659 = 0.4329
    inp = novelty_batch([-0.30, -0.95, -0.50, -0.58])
    A, _ = get_advantage("grpo")(inp)
    out = seq(get_shaper("xrpo_novelty")(inp, A)[0], inp)
    assert out[1].item() == pytest.approx(1.5 * A[1, 0].item())
    assert round(out[1].item() - A[1, 0].item(), 4) == 0.4329


def test_xrpo_with_lambda_or_kappa_zero_is_grpo_exactly():
    inp = random_batch(4, binary=True)
    A, _ = get_advantage("grpo")(inp)
    shaper = get_shaper("xrpo_novelty")
    assert torch.equal(shaper(inp, A, lambda_novelty=0.0)[0], A)
    assert torch.equal(shaper(inp, A, kappa_clip=0.0)[0], A)
    assert torch.equal(get_shaper("none")(inp, A)[0], A)


def test_xrpo_bounds_and_monotonicity_on_random_groups():
    for seed in range(4):
        inp = random_batch(seed, binary=True)
        A, _ = get_advantage("grpo")(inp)
        shaped, _ = get_shaper("xrpo_novelty")(inp, A)
        a, out = seq(A, inp), seq(shaped, inp)
        m = inp.mask.double()
        s = (inp.old_logps * m).sum(1) / m.sum(1)
        for idx in members(inp).values():
            s_bar = s[idx].mean()
            for i in idx:
                if inp.rewards[i] < 0.5 or s[i] >= s_bar:
                    assert out[i] == a[i]  # wrong or not novel: unchanged
                else:
                    assert a[i] <= out[i] <= 1.5 * a[i] + 1e-12
            correct = sorted((s[i].item(), out[i].item()) for i in idx if inp.rewards[i] == 1)
            for (_, hi), (_, lo) in itertools.pairwise(correct):
                assert lo <= hi + 1e-12  # non-increasing in s_i
            if torch.all(inp.rewards[idx] == 1):
                assert torch.all(out[idx] == 0)


def test_xrpo_needs_old_logps_and_counts_correct_by_threshold():
    inp = batch([1.0, 0.0], [2, 2])
    with pytest.raises(ValueError, match="old_logps"):
        get_shaper("xrpo_novelty")(inp, torch.zeros(2, 2))
    # r = 0.4 with threshold 0.5 is wrong (no bonus); with threshold 0.3 it is correct.
    inp = novelty_batch([-0.1, -0.9], rewards=(0.0, 0.4), lengths=(2, 2))
    A, _ = get_advantage("grpo")(inp)
    shaper = get_shaper("xrpo_novelty")
    assert torch.equal(shaper(inp, A)[0], A)
    assert shaper(inp, A, correct_threshold=0.3)[0][1, 0] > A[1, 0]
