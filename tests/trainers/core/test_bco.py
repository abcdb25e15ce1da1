"""BCO building blocks: the worked example by hand, its invariants, δ, UDM, classifier.

Numbers come from the worked examples of ``docs/algorithms/bco.md``; β = 0.1 throughout
and the arithmetic is in the comments.
softplus(z) = ln(1 + eᶻ) = −logσ(−z).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainers.core.bco import (
    PromptClassifier,
    RunningRewardMean,
    bco_loss,
    bco_row_losses,
    density_ratio_weights,
    implicit_rewards,
    mean_pooled_embedding,
    sample_prompts,
)

F64 = torch.float64
BETA = 0.1


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def sp(z: float) -> float:
    return math.log1p(math.exp(z))


# Batch 1: lpθ − lpref = [2, 1, −1, −1] → r = [0.2, 0.1, −0.1, −0.1], labels [1,1,0,0].
B1 = dict(policy=t([-12.0, -20.0, -15.0, -30.0]), ref=t([-14.0, -21.0, -14.0, -29.0]))
B1_LABELS = torch.tensor([True, True, False, False])
# Batch 2: r = [0.3, −0.1, −0.2, 0.0], labels [1,0,0,0].
B2 = dict(policy=t([3.0, -1.0, -2.0, 0.0]), ref=t([0.0, 0.0, 0.0, 0.0]))
B2_LABELS = torch.tensor([True, False, False, False])


def rewards(batch) -> torch.Tensor:
    return implicit_rewards(batch["policy"], batch["ref"], beta=BETA)


# ----------------------------------------------------------------------------- worked example
def test_batch1_delta_and_per_row_losses():
    running = RunningRewardMean()
    # δ = (0.2 + 0.1 − 0.1 − 0.1)/4 = 0.025, updated before it is read
    delta = running.update(rewards(B1))
    assert delta == pytest.approx(0.025, abs=1e-15)
    # ℓ = [sp(−0.175), sp(−0.075), sp(−0.125), sp(−0.125)] = [0.60947, 0.65635, 0.632599, 0.632599]
    rows = bco_row_losses(rewards(B1), B1_LABELS, delta)
    assert rows.tolist() == pytest.approx([0.60947, 0.65635, 0.632599, 0.632599], abs=5e-6)
    assert rows.tolist() == pytest.approx([sp(-0.175), sp(-0.075), sp(-0.125), sp(-0.125)])
    loss, metrics = bco_loss(B1["policy"], B1["ref"], B1_LABELS, delta, beta=BETA)
    assert loss.item() == pytest.approx(0.632755, abs=1e-6)
    # rewards/chosen = (0.2 + 0.1)/2 = 0.15, rewards/rejected = −0.1
    assert metrics["rewards/chosen"].item() == pytest.approx(0.15)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert metrics["count/chosen"].item() == 2 and metrics["count/rejected"].item() == 2
    assert metrics["delta"].item() == pytest.approx(0.025)


def test_batch2_delta_is_the_mean_of_all_eight_rewards_and_loss_without_udm():
    running = RunningRewardMean()
    running.update(rewards(B1))
    # all eight: (0.1 + 0.0)/8 = 0.0125 (batch sums 0.1 and 0.3 − 0.1 − 0.2 + 0 = 0.0)
    delta = running.update(rewards(B2))
    assert delta == pytest.approx(0.0125, abs=1e-15)
    # ℓ = [sp(−0.2875), sp(−0.1125), sp(−0.2125), sp(−0.0125)], mean 0.619405
    loss, _ = bco_loss(B2["policy"], B2["ref"], B2_LABELS, delta, beta=BETA)
    assert loss.item() == pytest.approx(0.619405, abs=1e-6)


def test_batch2_with_udm_weights_on_the_rejected_rows():
    # p = [0.2, 0.7, 0.95] → odds [0.25, 2.3333, 19] → clip to [0.5, 2.333333, 10]
    w_rej = density_ratio_weights(t([0.2, 0.7, 0.95]))
    assert w_rej.tolist() == pytest.approx([0.5, 7 / 3, 10.0], abs=1e-6)
    weights = torch.cat([t([123.0]), w_rej])  # the chosen row's entry is ignored
    rows = bco_row_losses(rewards(B2), B2_LABELS, 0.0125, weights=weights)
    # [sp(−0.2875), 0.5·sp(−0.1125), 2.3333·sp(−0.2125), 10·sp(−0.0125)]
    assert rows.tolist() == pytest.approx([0.559694, 0.319239, 1.382573, 6.869167], abs=2e-6)
    loss, metrics = bco_loss(B2["policy"], B2["ref"], B2_LABELS, 0.0125, beta=BETA, weights=weights)
    assert loss.item() == pytest.approx(2.282668, abs=1e-6)
    assert metrics["udm_weight/min"].item() == pytest.approx(0.5)
    assert metrics["udm_weight/max"].item() == pytest.approx(10.0)
    # mean over rejected rows (0.5 + 2.3333 + 10)/3 = 4.2778
    assert metrics["udm_weight/mean"].item() == pytest.approx((0.5 + 7 / 3 + 10) / 3, abs=1e-6)


# ----------------------------------------------------------------------------- invariants
def test_zero_delta_unit_weight_is_plain_bce():
    # δ=0: ℓ = BCE(σ(r), label); batch 1: (sp(−0.2) + 3·sp(−0.1))/4 = 0.632832
    r, y = rewards(B1), B1_LABELS
    bce = torch.nn.functional.binary_cross_entropy_with_logits(r, y.to(F64))
    loss, _ = bco_loss(B1["policy"], B1["ref"], y, 0.0, beta=BETA)
    ones, _ = bco_loss(B1["policy"], B1["ref"], y, 0.0, beta=BETA, weights=torch.ones(4, dtype=F64))
    assert loss.item() == pytest.approx(bce.item(), abs=1e-15)
    assert ones.item() == pytest.approx(bce.item(), abs=1e-15)
    assert loss.item() == pytest.approx(0.632832, abs=1e-6)


def test_shifting_every_reward_and_delta_leaves_the_losses_unchanged():
    # + c to every r is + c/β to lpθ; ℓ depends only on r − δ
    c = 0.7
    base = bco_row_losses(rewards(B2), B2_LABELS, 0.0125)
    shifted = implicit_rewards(B2["policy"] + c / BETA, B2["ref"], beta=BETA)
    moved = bco_row_losses(shifted, B2_LABELS, torch.tensor(0.0125 + c, dtype=F64))
    assert torch.allclose(base, moved, atol=1e-12, rtol=0)


def test_step_zero_every_loss_is_ln2():
    # πθ = πref → r = 0 → δ = 0 → ℓ = sp(0) = ln 2 = 0.693147
    lp = t([-12.0, -20.0, -15.0, -30.0])
    running = RunningRewardMean()
    delta = running.update(implicit_rewards(lp, lp, beta=BETA))
    assert delta == 0.0
    rows = bco_row_losses(implicit_rewards(lp, lp, beta=BETA), B1_LABELS, delta)
    assert rows.tolist() == pytest.approx([math.log(2)] * 4, abs=1e-15)


def test_gradient_sign_and_delta_carries_no_gradient():
    policy = B1["policy"].clone().requires_grad_(True)
    delta = torch.tensor(0.025, dtype=F64, requires_grad=True)
    loss, _ = bco_loss(policy, B1["ref"], B1_LABELS, delta, beta=BETA)
    loss.backward()
    # ∂mean/∂lpθ_i = β/4 · (−σ(−z_i)) for label 1, β/4 · σ(z_i) for label 0; z = r − 0.025
    # σ(−0.175) = 0.456361, σ(−0.075) = 0.481259, σ(−0.125) = 0.468791
    expected = [-0.456361, -0.481259, 0.468791, 0.468791]
    assert (policy.grad / (BETA / 4)).tolist() == pytest.approx(expected, abs=1e-6)
    assert delta.grad is None


def test_density_ratio_weights_range_and_midpoint():
    p = torch.linspace(0, 1, 101, dtype=F64)
    w = density_ratio_weights(p)
    assert w.min().item() == 0.5 and w.max().item() == 10.0
    # p = 0.5: 0.5/(0.5 + 1e-8) = 1 − 2e-8
    assert density_ratio_weights(t([0.5])).item() == pytest.approx(1.0, abs=3e-8)
    assert density_ratio_weights(t([0.9]), min_ratio=1.0, max_ratio=2.0).item() == 2.0
    with pytest.raises(ValueError, match="min_ratio"):
        density_ratio_weights(p, min_ratio=3.0, max_ratio=2.0)


def test_chosen_rows_are_never_weighted():
    r = rewards(B1)
    plain = bco_row_losses(r, B1_LABELS, 0.025)
    weighted = bco_row_losses(r, B1_LABELS, 0.025, weights=t([7.0, 0.1, 2.0, 3.0]))
    assert weighted[:2].tolist() == plain[:2].tolist()
    assert weighted[2:].tolist() == pytest.approx((plain[2:] * t([2.0, 3.0])).tolist())


def test_metrics_are_finite_when_a_class_is_absent():
    all_chosen = torch.ones(4, dtype=torch.bool)
    _, m = bco_loss(B1["policy"], B1["ref"], all_chosen, 0.0, beta=BETA, weights=torch.ones(4))
    assert all(torch.isfinite(v) for v in m.values())
    assert m["rewards/rejected"].item() == 0.0 and m["count/rejected"].item() == 0
    assert m["udm_weight/min"].item() == 1.0 and m["udm_weight/max"].item() == 1.0


def test_loss_rejects_bad_shapes_and_float_labels():
    with pytest.raises(ValueError, match="ref_logps"):
        bco_loss(B1["policy"], B1["ref"][:3], B1_LABELS, 0.0, beta=BETA)
    with pytest.raises(ValueError, match="labels"):
        bco_loss(B1["policy"], B1["ref"], B1_LABELS.double(), 0.0, beta=BETA)
    with pytest.raises(ValueError, match="weights"):
        bco_loss(B1["policy"], B1["ref"], B1_LABELS, 0.0, beta=BETA, weights=torch.ones(3))


def test_bf16_inputs_give_a_float32_loss():
    loss, _ = bco_loss(B1["policy"].bfloat16(), B1["ref"].bfloat16(), B1_LABELS, 0.025, beta=BETA)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.632755, abs=2e-3)


# ----------------------------------------------------------------------------- running δ
def test_running_mean_is_the_plain_mean_of_everything_seen():
    running, seen = RunningRewardMean(), []
    gen = torch.Generator().manual_seed(0)
    for size in (3, 1, 7, 5):
        batch = torch.randn(size, generator=gen, dtype=F64)
        seen.append(batch)
        assert running.update(batch) == pytest.approx(torch.cat(seen).mean().item(), abs=1e-14)
    running.update(torch.empty(0, dtype=F64))  # an empty batch changes nothing
    assert running.delta == pytest.approx(torch.cat(seen).mean().item(), abs=1e-14)


def test_all_reduce_sums_ranks_including_an_empty_one():
    # Two ranks hold [0.2, 0.1, −0.1] and [−0.1]; a third holds nothing. Round 1 records
    # what each rank would send; round 2 plays the all-reduce: every rank gets the sum.
    per_rank = [t([0.2, 0.1, -0.1]), t([-0.1]), t([])]
    sent = []
    for r in per_rank:
        RunningRewardMean().update(r, all_reduce=lambda x: sent.append(x) or x)
    total = sum(sent)
    deltas = [RunningRewardMean().update(r, all_reduce=lambda x: total) for r in per_rank]
    # global δ = 0.1/4 = 0.025 on every rank, as batch 1 on one rank
    assert deltas == pytest.approx([0.025] * 3, abs=1e-15)


def test_balanced_delta_is_the_half_sum_and_differs_from_trl_on_unbalanced_data():
    trl, bal = RunningRewardMean(), RunningRewardMean(balanced=True)
    for batch, labels in ((B1, B1_LABELS), (B2, B2_LABELS)):
        trl.update(rewards(batch), labels)
        bal.update(rewards(batch), labels)
    # thumbs-up r = [0.2, 0.1, 0.3] → mean 0.2; thumbs-down [−0.1, −0.1, −0.1, −0.2, 0.0]
    # → mean −0.1; balanced δ = ½(0.2 − 0.1) = 0.05, TRL's δ = 0.0125 (3 up vs 5 down)
    assert bal.delta == pytest.approx(0.05, abs=1e-15)
    assert trl.delta == pytest.approx(0.0125, abs=1e-15)


def test_balanced_delta_before_both_classes_are_seen():
    bal = RunningRewardMean(balanced=True)
    assert bal.delta == 0.0
    # only thumbs-up so far: δ = their mean (0.3 + 0.1)/2 = 0.2, as TRL's δ would be
    assert bal.update(t([0.3, 0.1]), torch.tensor([True, True])) == pytest.approx(0.2)
    # then thumbs-down −0.4: δ = ½(0.2 − 0.4) = −0.1
    assert bal.update(t([-0.4]), torch.tensor([False])) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="labels"):
        bal.update(t([0.1]))


def test_running_state_round_trips_through_json():
    for balanced in (False, True):
        a = RunningRewardMean(balanced=balanced)
        a.update(rewards(B1), B1_LABELS)
        b = RunningRewardMean(balanced=balanced)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert b.state_dict() == a.state_dict()
        assert b.update(rewards(B2), B2_LABELS) == a.update(rewards(B2), B2_LABELS)
    with pytest.raises(ValueError, match="balanced"):
        RunningRewardMean(balanced=True).load_state_dict(RunningRewardMean().state_dict())


# ----------------------------------------------------------------------------- classifier
def test_classifier_matches_the_hand_solved_one_dimensional_case():
    # x = [+1, −1], y = [1, 0]: by symmetry b = 0 and the objective is
    # 2·ln(1 + e^(−w)) + w²/2 (C = 1), so w = 2σ(−w) → w = 0.6748316 (Newton by hand)
    clf = PromptClassifier()
    clf.fit(t([[1.0], [-1.0]]), torch.tensor([True, False]), holdout_fraction=0.0)
    w = clf.weight.item()
    assert w == pytest.approx(0.6748316143, abs=1e-8) and clf.bias == pytest.approx(0, abs=1e-9)
    assert w == pytest.approx(2 / (1 + math.exp(w)), abs=1e-9)


def test_classifier_balances_class_weights():
    # x = [1, 1, −1], y = [1, 1, 0]: balanced weights n/(2·n_c) = 3/4 (each +1) and 3/2 (−1),
    # so both sides weigh 3/2: b = 0 and 3·ln(1 + e^(−w)) + w²/2 → w = 3σ(−w) = 0.8797122
    clf = PromptClassifier()
    clf.fit(t([[1.0], [1.0], [-1.0]]), torch.tensor([True, True, False]), holdout_fraction=0.0)
    assert clf.weight.item() == pytest.approx(0.8797122401, abs=1e-8)
    assert clf.bias == pytest.approx(0.0, abs=1e-9)
    # p at x = 0 is σ(b) = 0.5 → w(x) = 1: the class imbalance alone does not reweight
    assert clf.predict_proba(t([[0.0]])).item() == pytest.approx(0.5, abs=1e-9)


def test_classifier_separates_two_gaussian_blobs_and_reports_holdout_accuracy():
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 8
    shift = torch.zeros(d)
    shift[0] = 1.5
    emb = torch.cat(
        [
            torch.randn(n, d, generator=gen) * 0.5 + shift,
            torch.randn(n, d, generator=gen) * 0.5 - shift,
        ]
    )
    labels = torch.arange(2 * n) < n
    report = PromptClassifier().fit(emb, labels, holdout_fraction=0.1, seed=3)
    # stratified: round(0.1·200) = 20 per class held out
    assert report["n_holdout"] == 40 and report["n_train"] == 360
    assert report["holdout_accuracy"] > 0.9 and report["train_accuracy"] > 0.9


def test_classifier_state_round_trips_exactly_and_is_not_refitted():
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(40, 5, generator=gen)
    labels = torch.arange(40) % 2 == 0
    clf = PromptClassifier()
    clf.fit(emb, labels, seed=1)
    loaded = PromptClassifier()
    loaded.load_state_dict(json.loads(json.dumps(clf.state_dict())))
    assert torch.equal(loaded.weight, clf.weight) and loaded.bias == clf.bias
    assert torch.equal(loaded.predict_proba(emb), clf.predict_proba(emb))
    assert loaded.report == clf.report
    with pytest.raises(RuntimeError, match="not fitted"):
        PromptClassifier().predict_proba(emb)


def test_classifier_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        PromptClassifier().fit(torch.randn(4, 2), torch.ones(4, dtype=torch.bool))


# ----------------------------------------------------------------------------- sampling, embedding
def test_sample_prompts_draws_with_replacement_and_is_seeded():
    up, down = [f"u{i}" for i in range(10)], ["d0", "d1", "d2"]
    prompts, labels = sample_prompts(up, down, size=10, seed=0)
    # min(10, 10) = 10 desirable, min(3, 10) = 3 undesirable
    assert len(prompts) == 13 and labels.tolist() == [True] * 10 + [False] * 3
    assert set(prompts[:10]) <= set(up) and set(prompts[10:]) <= set(down)
    # 10 draws from 10 with replacement repeat one with probability 1 − 10!/10¹⁰ = 0.99964
    assert len(set(prompts[:10])) < 10
    again, labels_again = sample_prompts(up, down, size=10, seed=0)
    assert again == prompts and torch.equal(labels_again, labels)
    assert sample_prompts(up, down, size=2, seed=0)[1].tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        sample_prompts(up, [], size=4, seed=0)


def test_mean_pooled_embedding_ignores_padding_and_is_unit_norm():
    hidden = t([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]], [[0.0, 2.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = mean_pooled_embedding(hidden, mask)
    # row 0: mean [2, 2] → [1/√2, 1/√2]; row 1: [0, 2] → [0, 1]
    assert torch.allclose(out, t([[2**-0.5, 2**-0.5], [0.0, 1.0]]))
    # a row with no valid token is the zero vector
    assert mean_pooled_embedding(hidden, torch.zeros(2, 3)).abs().sum().item() == 0.0
