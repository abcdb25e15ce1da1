"""Temperature rules: constant and HAPO's adaptive temperature.

Formulas, invariants and Ex 4: ``docs/algorithms/hapo.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from trainers.contract.methods.grpo import TEMPERATURE_RULE_NAMES as RULE_NAMES
from trainers.core.entropy import entropy_stats
from trainers.core.temperature import (
    TEMPERATURE_RULES,
    ConstantTemperature,
    HapoAdaptiveTemperature,
    HapoTemperatureProcessor,
    ats_temperature,
    get_temperature_rule,
    next_token_entropy,
    stats_from_dict,
    stats_to_dict,
)
from trainers.tiny_model import build_tiny_model

EX4_H = torch.tensor([0.01, 0.05, 0.10, 0.30, 0.60, 1.20, 2.00, 3.00])


def ex4_stats():
    return entropy_stats(EX4_H, torch.ones(8))


def test_registry_keys_are_the_method_names():
    assert tuple(TEMPERATURE_RULES) == RULE_NAMES
    assert get_temperature_rule("hapo_ats") is HapoAdaptiveTemperature
    with pytest.raises(KeyError, match="constant, hapo_ats"):
        get_temperature_rule("nope")


def test_example_4_temperatures():
    # h̃ = [−1, −.6962, −.5654, −.3581, −.2272, −.0964, 0, 1]  ->  T = 1 + 0.05·h̃.
    temps = ats_temperature(EX4_H, ex4_stats(), base_temperature=1.0, tau=0.05)
    expected = [0.95, 0.9652, 0.9717, 0.9821, 0.9886, 0.9952, 1.0, 1.05]
    assert temps.tolist() == pytest.approx(expected, abs=1e-4)
    # The paper's variant: τ = 0.1 on the raw z = (ln H − ln 2)/2.6488, clipped to ±1.
    raw = ats_temperature(EX4_H, ex4_stats(), 1.0, 0.1, use_raw_z=True)
    z = (torch.log(EX4_H) - math.log(2.0)) / 2.6488
    assert raw.tolist() == pytest.approx((1 + 0.1 * z.clamp(-1, 1)).tolist(), abs=1e-4)


@pytest.mark.parametrize("use_raw_z", [False, True])
@pytest.mark.parametrize("literal_code_sign", [False, True])
def test_temperature_stays_within_tau_of_base(use_raw_z, literal_code_sign):
    entropies = torch.cat([EX4_H, torch.tensor([1e-12, 1e-3, 50.0, 500.0])])  # beyond the stats
    stats = ex4_stats()
    temps = ats_temperature(entropies, stats, 0.7, 0.1, use_raw_z, literal_code_sign)
    assert temps.min() >= 0.7 * 0.9 - 1e-6 and temps.max() <= 0.7 * 1.1 + 1e-6
    flat = ats_temperature(entropies, stats, 0.7, 0.0, use_raw_z, literal_code_sign)
    assert torch.allclose(flat, torch.full_like(flat, 0.7))  # τ = 0 gives T_base
    assert torch.all(ats_temperature(entropies, None, 0.7, 0.1) == 0.7)  # first step


def test_next_token_entropy_handles_uniform_and_masked_rows():
    scores = torch.zeros(3, 8)
    scores[1, 1:] = -math.inf  # one token left: entropy 0
    scores[2, 4:] = -math.inf  # four equal tokens: ln 4
    assert next_token_entropy(scores).tolist() == pytest.approx([math.log(8), 0.0, math.log(4)])


def test_processor_divides_each_row_by_its_own_temperature():
    torch.manual_seed(0)
    scores = torch.randn(4, 16) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    stats = ex4_stats()
    processor = HapoTemperatureProcessor(stats, base_temperature=1.0, tau=0.05, use_raw_z=False)
    out = processor(torch.zeros(4, 1, dtype=torch.long), scores)
    temps = ats_temperature(next_token_entropy(scores), stats, 1.0, 0.05)
    assert torch.allclose(out, scores / temps[:, None])
    summary = processor.summary()
    assert summary["temperature/min"] == pytest.approx(float(temps.min()))
    assert summary["temperature/mean"] == pytest.approx(float(temps.mean()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    model_dir: Path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


@pytest.mark.parametrize("do_sample", [False, True])
def test_processor_inside_generate_samples_from_tempered_scores(tiny, do_sample):
    model, tok = tiny
    inputs = tok(["The sky is blue.", "What is 12 + 7?"], return_tensors="pt", padding=True)
    with torch.no_grad():  # the "previous step": this policy's entropies on the prompts
        logits = model(**inputs).logits
    stats = entropy_stats(next_token_entropy(logits), inputs["attention_mask"])
    processor = HapoTemperatureProcessor(stats, base_temperature=0.8, tau=0.1, use_raw_z=False)
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        do_sample=do_sample,
        temperature=1.0,  # the rule's generation_temperature(): ATS replaces the warper
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        logits_processor=LogitsProcessorList([processor]),
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    temps = []
    for raw, processed in zip(out.logits, out.scores, strict=True):
        t = ats_temperature(next_token_entropy(raw), stats, 0.8, 0.1)
        assert torch.allclose(processed, raw / t[:, None], atol=1e-5)  # what was sampled from
        temps.append(t)
    temps = torch.cat(temps)
    assert temps.min() >= 0.72 - 1e-6 and temps.max() <= 0.88 + 1e-6
    assert temps.std() > 0  # tokens really get different temperatures
    if not do_sample:  # dividing by T > 0 never moves the argmax
        plain = model.generate(
            **inputs, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id
        )
        assert torch.equal(out.sequences, plain)


def test_constant_rule_leaves_sampling_to_the_generation_config():
    rule = ConstantTemperature(base_temperature=0.7)
    assert rule.generation_temperature() == 0.7 and rule.processor() is None
    rule.observe(EX4_H, torch.ones(8))
    assert rule.state_dict() == {} and rule.metrics() == {"temperature/mean": 0.7}


def test_hapo_rule_uses_previous_step_statistics_and_restores_them():
    rule = HapoAdaptiveTemperature(base_temperature=1.0, tau=0.05)
    assert rule.generation_temperature() == 1.0
    scores = torch.randn(3, 32)
    assert torch.allclose(rule.processor()(None, scores), scores)  # round 1: no stats, T_base
    # Three micro-batches, one with padding: the statistics cover all their valid tokens.
    padded = torch.cat([EX4_H[5:], torch.tensor([9.0, 9.0])])
    rule.observe(EX4_H[:3].view(1, 3), torch.ones(1, 3))
    rule.observe(EX4_H[3:5], torch.ones(2))
    rule.observe(padded.view(1, 5), torch.tensor([[1, 1, 1, 0, 0]]))
    saved = json.loads(json.dumps(rule.state_dict()))  # a checkpoint taken mid-round
    expected = scores / ats_temperature(next_token_entropy(scores), ex4_stats(), 1.0, 0.05)[:, None]
    assert torch.allclose(rule.processor()(None, scores), expected)
    assert rule.metrics()["temperature/entropy_pivot"] == pytest.approx(math.log(2.0))
    assert set(rule.metrics()) >= {"temperature/mean", "temperature/min", "temperature/max"}
    rule.observe(EX4_H, torch.zeros(8))  # nothing valid: the next round keeps the statistics
    assert torch.allclose(rule.processor()(None, scores), expected)

    restored = HapoAdaptiveTemperature(base_temperature=1.0, tau=0.05)
    restored.load_state_dict(saved)
    assert torch.allclose(restored.processor()(None, scores), expected)
    assert stats_to_dict(stats_from_dict(saved["stats"])) == saved["stats"]


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(ValueError):
        HapoAdaptiveTemperature(tau=1.0)
    with pytest.raises(ValueError):
        HapoAdaptiveTemperature(base_temperature=0.0)
    with pytest.raises(ValueError):
        HapoAdaptiveTemperature(quantile=1.5)
