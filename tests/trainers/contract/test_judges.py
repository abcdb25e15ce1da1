"""Judges: each type's P(A ≻ B), the order flip, seeding, and the creation-time checks.

The model judges run real transformers sequence classifiers built offline here
(the tiny model's tokenizer and a one-layer Qwen2 body, randomly initialised)
and are compared with a direct forward pass of the same checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Qwen2ForSequenceClassification,
)

from trainers.contract.judges.spec import (
    DEFAULT_PAIR_TEMPLATE,
    InvalidJudge,
    judge_item_fields,
    render_pair,
)
from trainers.contract.judges.validate import validate_judge
from trainers.judges.registry import build_judge
from trainers.tiny_model import build_tiny_model, build_tokenizer, tiny_config

ROOT = Path(__file__).resolve().parents[3]
OUT = "{{sample.output_text}}"
# Rock-paper-scissors over three styles of the tiny model's text, by first character:
# lower-case a-h beats i-z 0.8 of the time, i-z beats the rest, the rest beats a-h.
CYCLE = [[0.5, 0.8, 0.2], [0.2, 0.5, 0.8], [0.8, 0.2, 0.5]]
STYLES = {
    "type": "pattern_table",
    "classes": [{"name": "low", "pattern": "^[a-h]"}, {"name": "high", "pattern": "^[i-z]"}],
    "other": "rest",
    "preferences": CYCLE,
}
PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three.", "Why?"]
A = ["four", "Blue, I think", "hello there", "1 2 3", "because it is so"]
B = ["It is 4 of course", "red", "hi", "one, two and three", "no idea"]


def _classifier(out: Path, num_labels: int, seed: int = 0) -> Path:
    tok = build_tokenizer()
    config = tiny_config(tok, hidden_size=32, num_layers=1)
    config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory) -> Path:
    return _classifier(tmp_path_factory.mktemp("pair2"), 2)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    return _classifier(tmp_path_factory.mktemp("rm"), 1, seed=1)


def _direct_logits(path: Path, texts: list[str], special: bool) -> torch.Tensor:
    """One text at a time, no padding: the reference the batched judge must match."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt", add_special_tokens=special)
            rows.append(model(**enc).logits[0].float())
    return torch.stack(rows)


# --- preference_model ------------------------------------------------------------------


def test_preference_model_is_the_softmax_of_the_labelled_logit(pair_model):
    spec = {"type": "preference_model", "model": str(pair_model), "flip_order": False,
            "batch_size": 2}  # fmt: skip
    got = build_judge(spec, seed=0, device="cpu").prefer(PROMPTS, A, B)
    texts = [
        render_pair(DEFAULT_PAIR_TEMPLATE, p, a, b) for p, a, b in zip(PROMPTS, A, B, strict=True)
    ]
    want = torch.softmax(_direct_logits(pair_model, texts, True), -1)[:, 0]
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert max(got) - min(got) > 0.05  # a real spread, not a constant
    other = build_judge({**spec, "a_wins_label": 1}, seed=0).prefer(PROMPTS, A, B)
    assert [x + y for x, y in zip(got, other, strict=True)] == pytest.approx([1.0] * 5, abs=1e-6)


def test_one_label_preference_model_reads_the_logit_as_log_odds(reward_model):
    spec = {"type": "preference_model", "model": str(reward_model), "flip_order": False,
            "template": "{{response_a}} | {{response_b}}"}  # fmt: skip
    got = build_judge(spec, seed=0).prefer(PROMPTS, A, B)
    logit = _direct_logits(reward_model, [f"{a} | {b}" for a, b in zip(A, B, strict=True)], True)[
        :, 0
    ]
    assert got == pytest.approx(torch.sigmoid(logit).tolist(), abs=1e-5)


def test_flips_remove_the_position_bias_in_expectation(pair_model):
    """A random classifier is position-biased: p(A,B) + p(B,A) != 1. Flipped judging
    returns p(A,B) or 1 - p(B,A), about half each, so the two orders sum to 1 on average."""
    base = {"type": "preference_model", "model": str(pair_model)}
    fixed = build_judge({**base, "flip_order": False}, seed=0)
    p_ab = fixed.prefer(PROMPTS[:1], A[:1], B[:1])[0]
    p_ba = fixed.prefer(PROMPTS[:1], B[:1], A[:1])[0]
    assert abs(p_ab + p_ba - 1.0) > 0.05, "pick a pair the model is biased on"

    n = 400
    judge = build_judge(base, seed=3)
    ab = judge.prefer(PROMPTS[:1] * n, A[:1] * n, B[:1] * n)
    ba = judge.prefer(PROMPTS[:1] * n, B[:1] * n, A[:1] * n)
    shown_flipped = [abs(x - (1 - p_ba)) < 1e-5 for x in ab]
    assert all(abs(x - p_ab) < 1e-5 or f for x, f in zip(ab, shown_flipped, strict=True))
    assert 0.4 < sum(shown_flipped) / n < 0.6
    assert sum(ab) / n + sum(ba) / n == pytest.approx(1.0, abs=0.05)
    assert (p_ab + 1 - p_ba) / 2 == pytest.approx(sum(ab) / n, abs=0.05)


def test_flips_are_seeded_and_resume_from_the_state_dict(pair_model):
    spec = {"type": "preference_model", "model": str(pair_model)}
    n = 40
    args = (PROMPTS[:1] * n, A[:1] * n, B[:1] * n)
    one, two, other = (build_judge(spec, seed=s) for s in (7, 7, 8))
    assert one.prefer(*args) == two.prefer(*args)
    assert one.prefer(*args) != other.prefer(*args)

    state = json.loads(json.dumps(one.state_dict()))  # survives a checkpoint's JSON
    ahead = one.prefer(*args)
    resumed = build_judge(spec, seed=123)
    resumed.load_state_dict(state)
    assert resumed.prefer(*args) == ahead


# --- reward_model ------------------------------------------------------------------------


def test_reward_model_is_bradley_terry_on_its_scores(reward_model):
    spec = {"type": "reward_model", "model": str(reward_model), "flip_order": False,
            "temperature": 2.0, "batch_size": 3}  # fmt: skip
    judge = build_judge(spec, seed=0)
    got = judge.prefer(PROMPTS, A, B)
    tok = AutoTokenizer.from_pretrained(reward_model)

    def text(p, r):
        conv = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        return tok.apply_chat_template(conv, tokenize=False)

    r_a = _direct_logits(
        reward_model, [text(p, a) for p, a in zip(PROMPTS, A, strict=True)], False
    )[:, 0]
    r_b = _direct_logits(
        reward_model, [text(p, b) for p, b in zip(PROMPTS, B, strict=True)], False
    )[:, 0]
    assert judge.rewards(PROMPTS, A) == pytest.approx(r_a.tolist(), abs=1e-4)
    assert got == pytest.approx(torch.sigmoid((r_a - r_b) / 2.0).tolist(), abs=1e-5)
    back = judge.prefer(PROMPTS, B, A)
    assert [x + y for x, y in zip(got, back, strict=True)] == pytest.approx([1.0] * 5, abs=1e-6)


def test_reward_model_scores_follow_the_score_head(tmp_path, reward_model):
    """Doubling the head doubles every score: temperature 2 then gives the same P;
    a zero head scores everything alike, so every pair is a coin toss."""
    base = {"type": "reward_model", "flip_order": False}
    p1 = build_judge({**base, "model": str(reward_model)}, seed=0).prefer(PROMPTS, A, B)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model)
    tok = AutoTokenizer.from_pretrained(reward_model)
    for factor, name in ((2.0, "double"), (0.0, "zero")):
        with torch.no_grad():
            model.score.weight.mul_(factor)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    doubled = {**base, "model": str(tmp_path / "double"), "temperature": 2.0}
    assert build_judge(doubled, seed=0).prefer(PROMPTS, A, B) == pytest.approx(p1, abs=1e-5)
    zero = build_judge({**base, "model": str(tmp_path / "zero")}, seed=0)
    assert zero.prefer(PROMPTS, A, B) == [0.5] * 5


# --- grader ----------------------------------------------------------------------------


def test_pointwise_grader_judge_is_bradley_terry_on_grades():
    grader = {"type": "string_check", "name": "right", "input": OUT,
              "reference": "{{item.answer}}", "operation": "ilike"}  # fmt: skip
    judge = build_judge({"type": "grader", "grader": grader, "scale": 0.5}, seed=0)
    items = [{"answer": "4"}] * 3
    got = judge.prefer(["2+2?"] * 3, ["It is 4", "five", "4!"], ["three", "FOUR", "4"], items)
    assert got == pytest.approx([1 / (1 + math.exp(-2)), 0.5, 0.5])
    assert judge_item_fields(judge.spec) == {"answer"}


def test_pairwise_grader_judge_reads_the_other_completion():
    """A grader that sees B in {{item.other_output_text}}: here 'A contains B'."""
    grader = {"type": "string_check", "name": "contains", "input": OUT,
              "reference": "{{item.other_output_text}}", "operation": "like"}  # fmt: skip
    spec = {"type": "grader", "mode": "pairwise", "grader": grader, "flip_order": False}
    judge = build_judge(spec, seed=0)
    assert judge.prefer(["q", "q"], ["abc", "b"], ["b", "abc"]) == [1.0, 0.0]
    assert judge_item_fields(judge.spec) == set()
    # flipped: 'abc' ⊇ 'b' is judged as 1 - P('b' ≻ 'abc') = 1 either way
    flipping = build_judge({**spec, "flip_order": True}, seed=0)
    assert flipping.prefer(["q"] * 20, ["abc"] * 20, ["b"] * 20) == [1.0] * 20


# --- pattern_table -----------------------------------------------------------------------


def test_pattern_table_applies_the_cyclic_matrix():
    judge = build_judge({**STYLES, "flip_order": False}, seed=0)
    low, high, rest = "apple pie", "zebra", "Hello"
    assert judge.classify([low, high, rest, "  bee", "", "9 lives"]) == [
        "low", "high", "rest", "low", "rest", "rest",
    ]  # fmt: skip
    a, b = [low, high, rest, low], [high, rest, low, low]
    assert judge.prefer(["p"] * 4, a, b) == [0.8, 0.8, 0.8, 0.5]
    assert judge.prefer(["p"] * 4, b, a) == pytest.approx([0.2, 0.2, 0.2, 0.5])
    flipping = build_judge(STYLES, seed=5)
    assert flipping.prefer(["p"] * 30, [low] * 30, [high] * 30) == pytest.approx([0.8] * 30)


def test_first_matching_class_wins():
    spec = {"type": "pattern_table",
            "preferences": [[0.5, 1.0, 1.0], [0, 0.5, 0.5], [0, 0.5, 0.5]],
            "classes": [{"name": "yes", "pattern": "(?i)yes"},
                        {"name": "y", "pattern": "^y"}]}  # fmt: skip
    assert build_judge(spec, seed=0).classify(["yes", "yarn", "Oh YES", "no"]) == [
        "yes", "y", "yes", "other",
    ]  # fmt: skip


def test_the_tiny_model_reaches_all_three_styles(tmp_path):
    """The e2e EGPO test's cyclic judge needs all three classes among real samples of the
    tiny model, at the y/y' settings (temperature 2, top-k 10) and at y''s (temperature 1)."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    chat = [{"role": "user", "content": "What is 2+2?"}]
    enc = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    judge = build_judge(STYLES, seed=0)
    torch.manual_seed(0)
    for temperature, top_k in ((2.0, 10), (1.0, None)):
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=top_k,
                             max_new_tokens=8, num_return_sequences=48)  # fmt: skip
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        classes = judge.classify(texts)
        counts = {name: classes.count(name) for name in ("low", "high", "rest")}
        assert min(counts.values()) >= 3, (temperature, counts)


# --- validation --------------------------------------------------------------------------


def _problem(spec) -> InvalidJudge:
    with pytest.raises(InvalidJudge) as err:
        validate_judge(spec)
    return err.value


def test_good_judges_validate(pair_model, reward_model):
    validate_judge({"type": "preference_model", "model": str(pair_model)})
    validate_judge({"type": "preference_model", "model": str(pair_model), "a_wins_label": 1})
    validate_judge({"type": "reward_model", "model": str(reward_model)})
    validate_judge(STYLES)


@pytest.mark.parametrize(
    ("spec", "param", "words"),
    [
        ({"type": "oracle"}, "judge", "unknown judge type 'oracle'"),
        ({"type": "reward_model", "model": "/m", "temp": 1}, "judge.temp", "Extra inputs"),
        ({**STYLES, "classes": [{"name": "x", "pattern": "a{5000}"}], "preferences": [[0.5]]},
         "judge.classes[0].pattern", "counted repeat {5000} is over 1000"),
        ({**STYLES, "preferences": [[0.5, 0.5], [0.5, 0.5]]}, "judge.preferences", "3x3"),
        ({**STYLES, "preferences": [[0.5, 0.8, 0.3], [0.2, 0.5, 0.8], [0.8, 0.2, 0.5]]},
         "judge.preferences", "preferences[0][2] + preferences[2][0] must be 1"),
        ({**STYLES, "preferences": [[0.5, 1.5, 0], [-0.5, 0.5, 0.5], [1, 0.5, 0.5]]},
         "judge.preferences", "is not in [0, 1]"),
        ({**STYLES, "other": "low"}, "judge.preferences", "must be unique"),
        ({"type": "preference_model", "model": "/m", "template": "{{response_a}} {{reply}}"},
         "judge.template", "{{reply}}"),
        ({"type": "preference_model", "model": "/m", "template": "{{response_a}}"},
         "judge.template", "{{response_b}}"),
        ({"type": "grader", "grader": {"type": "regex", "name": "r", "input": "{{sample.x}}",
                                       "pattern": "a"}},
         "judge.grader.input", "unknown sample variable 'x'"),
        ({"type": "grader", "mode": "pairwise", "grader": {"type": "regex", "name": "r",
                                                           "input": OUT, "pattern": "a"}},
         "judge.mode", "item.other_output_text"),
        ({"type": "reward_model", "model": "/m", "temperature": 0}, "judge.temperature",
         "greater than 0"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_field(spec, param, words):
    err = _problem(spec)
    assert err.param == param
    assert words in str(err)


def test_model_paths_that_do_not_load_are_refused(tmp_path, pair_model, reward_model):
    def refused(path, kind="reward_model"):
        return _problem({"type": kind, "model": str(path)})

    err = refused(tmp_path / "missing")
    assert err.param == "judge.model" and "does not load" in str(err)
    assert "absolute path" in str(refused("relative/model"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in str(refused(tmp_path / "empty"))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in str(refused(tmp_path / "garbled"))
    causal = build_tiny_model(tmp_path / "causal")
    assert "not a sequence-classification model" in str(refused(causal))
    assert "has 2 labels; this judge needs 1" in str(refused(pair_model))
    err = _problem({"type": "preference_model", "model": str(reward_model), "a_wins_label": 1})
    assert err.param == "judge.a_wins_label" and "1-label model" in str(err)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((reward_model / "config.json").read_text())
    assert "no weights" in str(refused(weightless))

    score = {"type": "score_model", "name": "rm", "model": str(tmp_path / "missing"),
             "input": [{"role": "assistant", "content": OUT}]}  # fmt: skip
    err = _problem({"type": "grader", "grader": score})
    assert err.param == "judge.grader.model" and "does not load" in str(err)


def test_spec_validate_and_registry_import_without_torch():
    code = (
        "import sys, trainers.contract.judges.spec, trainers.contract.judges.validate, "
        "trainers.judges.registry; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
