"""Graders: each type on hand-worked examples, templates, the formula parser, TRL rewards.

Expected values are worked out in the comments. The score_model and cosine
tests build tiny offline models (torch); everything else is torch-free.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.contract.graders import scoring, text
from trainers.contract.graders.expr import FormulaError, compile_formula
from trainers.contract.graders.patterns import PatternError, check_compiles, patterns_in
from trainers.contract.graders.scoring import (
    SCORERS,
    grade,
    grade_batch,
    grade_report,
    run_isolated,
)
from trainers.contract.graders.spec import GRADER_TYPES as GRADER_NAMES
from trainers.contract.graders.spec import (
    InvalidGrader,
    dump_grader,
    missing_item_fields,
    needs_model,
    parse_grader,
    template_fields,
)
from trainers.contract.graders.templates import GraderError, TemplateError, parse_template, render
from trainers.graders.reward import build_reward_function, completion_text

ROOT = Path(__file__).resolve().parents[3]
OUT = "{{sample.output_text}}"
CAT, CAT_REF = "the cat sat on the mat", "the cat is on the mat"


def check(reference: str, operation: str, name: str = "check") -> dict:
    return {"type": "string_check", "name": name, "input": OUT, "reference": reference,
            "operation": operation}  # fmt: skip


def similarity(metric: str) -> dict:
    return {"type": "text_similarity", "name": "sim", "input": OUT,
            "reference": "{{item.ref}}", "evaluation_metric": metric}  # fmt: skip


def test_registry_keys_are_the_grader_names():
    assert set(SCORERS) == set(GRADER_NAMES) and len(SCORERS) == len(GRADER_NAMES)


# --- string_check ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "sample", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),  # case-sensitive
        ("ne", "paris", 1.0),
        ("like", "It is Paris.", 1.0),  # reference occurs in input
        ("like", "It is paris.", 0.0),
        ("ilike", "IT IS PARIS.", 1.0),
    ],
)
def test_string_check_operations(operation, sample, expected):
    grader = check("{{item.city}}", operation)
    assert grade(grader, {"city": "Paris"}, sample) == expected


# --- text_similarity -------------------------------------------------------------------


def test_fuzzy_match_is_the_indel_ratio():
    # kitten/sitting: LCS "ittn" = 4, Indel distance 6 + 7 - 2*4 = 5, 1 - 5/13
    assert grade(similarity("fuzzy_match"), {"ref": "sitting"}, "kitten") == pytest.approx(8 / 13)


def test_bleu_is_smoothed_sentence_bleu():
    # precisions 5/6, 3/5, 1/4, and 0/3 smoothed to 1/(2*3); equal lengths: no brevity penalty
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert grade(similarity("bleu"), {"ref": CAT_REF}, CAT) == pytest.approx(expected, abs=1e-4)


def test_gleu_is_min_of_ngram_precision_and_recall():
    # 1..4-grams: 18 on each side; matches 5 + 3 + 1 + 0 = 9 -> min(9/18, 9/18)
    assert grade(similarity("gleu"), {"ref": CAT_REF}, CAT) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("rouge_1", 5 / 6),  # 5 of 6 unigrams shared each way
        ("rouge_2", 0.6),  # "the cat", "on the", "the mat": 3 of 5 bigrams
        ("rouge_5", 0.0),
        ("rouge_l", 5 / 6),  # LCS "the cat on the mat" = 5 tokens
    ],
)
def test_rouge_f_measures(metric, expected):
    assert grade(similarity(metric), {"ref": CAT_REF}, CAT) == pytest.approx(expected)


def test_rouge_keeps_non_ascii_words():
    # 4 hypothesis words all in the 5-word reference: P 1, R 4/5, F 2*0.8/1.8
    score = grade(similarity("rouge_1"), {"ref": "le café était très bon"}, "le café était bon")
    assert score == pytest.approx(8 / 9)


def test_blank_texts_are_decided_the_same_for_every_metric():
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_l"):
        assert text.text_similarity("", " ", metric) == 1.0
        assert text.text_similarity("words", "", metric) == 0.0


def test_meteor_is_refused_and_cosine_needs_an_embedding_model():
    with pytest.raises(InvalidGrader, match="WordNet") as err:
        parse_grader(similarity("meteor"))
    assert err.value.param == "grader.evaluation_metric"
    with pytest.raises(InvalidGrader, match="embedding_model"):
        parse_grader(similarity("cosine"))
    with pytest.raises(InvalidGrader, match="only used by evaluation_metric 'cosine'"):
        parse_grader({**similarity("bleu"), "embedding_model": "/models/e5"})
    assert needs_model(parse_grader({**similarity("cosine"), "embedding_model": "/models/e5"}))


# --- regex, length_penalty, math_verify ------------------------------------------------


def test_regex_searches_with_inline_flags_and_anchors():
    grader = {"type": "regex", "name": "fmt", "input": OUT, "pattern": r"(?i)^answer: \d+$"}
    assert grade(grader, {}, "ANSWER: 42") == 1.0
    assert grade(grader, {}, "answer: 42 (sure)") == 0.0
    # compiling is the API's bounded check (trainers.contract.graders.patterns)
    unclosed = parse_grader({**grader, "pattern": "(unclosed"})
    with pytest.raises(PatternError, match=r"grader\.pattern: the pattern does not compile"):
        check_compiles(patterns_in(unclosed.model_dump(mode="json"), "grader"))


def test_regex_timeout_scores_zero_and_is_reported(monkeypatch):
    monkeypatch.setattr(text, "REGEX_TIMEOUT_S", 0.05)
    grader = {"type": "regex", "name": "slow", "input": OUT, "pattern": r"^(.+)+\1$"}
    report = grade_report(grader, {}, "a" * 30000 + "b")
    assert report.reward == 0.0 and "other_error" in report.errors


@pytest.mark.parametrize(
    ("length", "expected"),
    [(80, 0.0), (90, -0.5), (100, -1.0), (101, -1.0), (10, 0.0)],
)
def test_length_penalty_is_dapos_soft_overlong_penalty(length, expected):
    # target 80, max 100, buffer 20: 90 chars -> (80 - 90) / 20 = -0.5; 100 -> -1; beyond -> -1
    grader = {"type": "length_penalty", "name": "len", "input": OUT, "max_length": 100,
              "target_length": 80, "unit": "characters"}  # fmt: skip
    assert grade(grader, {}, "x" * length) == pytest.approx(expected)


def test_length_penalty_counts_words_and_defaults_to_a_hard_cutoff():
    grader = {"type": "length_penalty", "name": "len", "input": OUT, "max_length": 3}
    assert grade(grader, {}, "one two  three") == 0.0
    assert grade(grader, {}, "one two three four") == -1.0
    with pytest.raises(InvalidGrader, match="must not exceed") as err:
        parse_grader({**grader, "target_length": 4})
    assert err.value.param == "grader.target_length"


def test_math_verify_compares_answers_symbolically():
    grader = {"type": "math_verify", "name": "math", "input": OUT, "reference": "{{item.answer}}"}
    item = {"answer": r"\frac{1}{2}"}
    assert grade(grader, item, r"So the answer is $\boxed{0.5}$.") == 1.0
    assert grade(grader, item, r"So the answer is $\boxed{0.6}$.") == 0.0
    assert grade(grader, item, "I do not know") == 0.0
    with pytest.raises(GraderError, match="not a parseable answer"):
        grade(grader, {"answer": "hello"}, "42")


# --- templates ---------------------------------------------------------------------------


def test_render_reads_nested_fields_lists_and_json_values():
    item = {"a": {"b": [10, {"c": "deep"}]}, "n": 3, "flag": True, "obj": {"k": 1}}
    tpl = "{{item.a.b[1].c}} {{ item.a.b.0 }} {{item.n}} {{item.flag}} {{item.obj}} [" + OUT + "]"
    assert render(tpl, item, "out") == 'deep 10 3 true {"k": 1} [out]'


def test_render_is_one_pass():
    assert render("{{item.x}}", {"x": "{{item.y}}"}, "") == "{{item.y}}"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{foo.bar}}", "unknown template namespace 'foo'"),
        ("{{item}}", "needs a field"),
        ("{{sample.output_tools}}", "not available in posttrain"),
        ("{{sample.choices.0}}", "not available in posttrain"),
        ("{{sample.text}}", "unknown sample variable"),
        ("{{ item.a b }}", "namespace.variable"),
        ("{{1}}", "unknown template namespace"),
    ],
)
def test_bad_templates_are_rejected(template, message):
    with pytest.raises(TemplateError, match=message):
        parse_template(template)
    with pytest.raises(InvalidGrader, match=message) as err:
        parse_grader(check(template, "eq"))
    assert err.value.param == "grader.reference"


def test_missing_item_field_is_an_invalid_variable_error():
    with pytest.raises(TemplateError, match=r"'item\.city' is not in the item"):
        grade(check("{{item.city}}", "eq"), {"town": "Paris"}, "Paris")
    report = grade_report(check("{{item.city}}", "eq"), {}, "Paris")
    assert report.reward == 0.0 and set(report.errors) == {"invalid_variable_error"}


def test_output_json_reads_the_sample_and_a_non_json_sample_scores_zero():
    grader = check("{{item.name}}", "eq") | {"input": "{{sample.output_json.name}}"}
    assert grade(grader, {"name": "Ada"}, '{"name": "Ada"}') == 1.0
    assert grade(grader, {"name": "Ada"}, "Ada") == 0.0  # not JSON: soft, scores 0
    report = grade_report(grader, {"name": "Ada"}, '{"nom": "Ada"}')
    assert report.reward == 0.0 and "sample_parse_error" in report.errors


def test_template_fields_and_missing_item_fields():
    grader = parse_grader({
        "type": "multi", "name": "m", "calculate_output": "a + b",
        "graders": {
            "a": check("{{item.answer}} and {{item.meta.unit}}", "like"),
            "b": {"type": "score_model", "name": "rm", "model": "/rm", "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "{{item.question}}"}]},
                {"role": "assistant", "content": OUT},
            ]},
        },
    })  # fmt: skip
    assert template_fields(grader) == {"answer", "meta.unit", "question"}
    assert missing_item_fields(grader, {"answer": 1, "meta": {}, "question": "q"}) == ["meta.unit"]
    assert needs_model(grader)


# --- calculate_output ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("0.7 * a + 0.3 * b", 0.7 * 1.0 + 0.3 * 0.5),
        ("(a + b) / 2", 0.75),
        ("a + b * 2", 2.0),  # * binds tighter than +
        ("2 ^ 3 ^ 2", 512.0),  # right-associative: 2^(3^2)
        ("2 ** 3", 8.0),
        ("-2 ^ 2", -4.0),  # power binds tighter than unary minus
        ("2 ^ -1", 0.5),
        ("--a", 1.0),
        ("min(a, b, 0.2) + max(a, b)", 1.2),
        ("abs(b - a) + floor(2.7) + ceil(0.1)", 3.5),
        ("sqrt(4) * exp(0) + log(1)", 2.0),
        (".5e1 + 1E-1", 5.1),
    ],
)
def test_formulas_evaluate_by_hand(formula, expected):
    assert compile_formula(formula, {"a", "b"}).evaluate({"a": 1.0, "b": 0.5}) == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("a.__class__", "unexpected '.'"),
        ("a.real", "unexpected '.'"),
        ("__import__(a)", "unknown function '__import__'"),
        ("__import__('os')", "unexpected"),
        ("eval(a)", "unknown function 'eval'"),
        ("a(1)", "unknown function 'a'"),
        ("a[0]", r"unexpected '\['"),
        ("'text'", "unexpected"),
        ("a < b", "unexpected '<'"),
        ("a + c", "formula reads c, which is not a sub-grader"),
        ("lambda: 1", "unexpected ':'"),
        ("a +", "unexpected 'end of formula'"),
        ("(a", r"expected '\)'"),
        ("a b", "after a complete expression"),
        ("abs(a, b)", r"abs\(\) takes 1 argument"),
        ("1" + "+1" * 600, "longer than 1000"),
        ("(" * 50 + "a" + ")" * 50, "deeper than"),
    ],
)
def test_formulas_outside_the_grammar_are_refused(formula, message):
    with pytest.raises(FormulaError, match=message):
        compile_formula(formula, {"a", "b"})


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("9 ^ 9 ^ 9", "no finite value"),  # float overflow, never a huge integer
        ("10 ** 400", "no finite value"),
        ("exp(1000)", "no finite value"),
        ("a / (b - b)", "divides by zero"),
        ("sqrt(-1)", "no finite value"),
    ],
)
def test_formulas_without_a_finite_value_raise(formula, message):
    with pytest.raises(FormulaError, match=message):
        compile_formula(formula, {"a", "b"}).evaluate({"a": 1.0, "b": 0.5})


# --- multi -------------------------------------------------------------------------------


def multi(formula: str) -> dict:
    return {
        "type": "multi", "name": "combo", "calculate_output": formula,
        "graders": {"exact": check("{{item.answer}}", "eq"),
                    "mentions": check("{{item.answer}}", "like")},
    }  # fmt: skip


def test_multi_combines_sub_grader_scores_by_formula():
    report = grade_report(multi("0.75 * exact + 0.25 * mentions"), {"answer": "42"}, "It is 42")
    assert report.sub_rewards == {"exact": 0.0, "mentions": 1.0}
    assert report.reward == 0.25 and report.errors == {}


def test_multi_formula_division_by_zero_scores_zero_with_a_flag():
    report = grade_report(multi("mentions / exact"), {"answer": "42"}, "It is 42")
    assert report.reward == 0.0 and "formula_parse_error" in report.errors


def test_multi_validation_names_the_field_at_fault():
    with pytest.raises(InvalidGrader, match="not a sub-grader") as err:
        parse_grader(multi("exact + typo"))
    assert err.value.param == "grader.calculate_output"
    nested = multi("exact") | {"graders": {"exact": multi("exact")}}
    with pytest.raises(InvalidGrader, match="cannot be multi graders"):
        parse_grader(nested)
    python = multi("exact") | {"graders": {"exact": {"type": "python", "name": "p", "source": ""}}}
    with pytest.raises(InvalidGrader, match="must define 'def grade") as err:
        parse_grader(python)
    assert err.value.param == "grader.graders.exact.source"
    with pytest.raises(InvalidGrader, match="identifiers"):
        parse_grader(multi("x") | {"graders": {"max": check("a", "eq")}})


def test_multi_accepts_one_grader_object_as_the_sdk_types_spell_it():
    grader = parse_grader(multi("2 * exact") | {"graders": check("{{item.answer}}", "eq", "exact")})
    assert list(grader.graders) == ["exact"]
    assert grade(grader, {"answer": "x"}, "x") == 2.0


def test_unknown_types_list_what_is_supported():
    with pytest.raises(
        InvalidGrader, match="unknown grader type 'nope'; expected one of: string_check"
    ):
        parse_grader({"type": "nope", "name": "x"})


def test_validate_echoes_what_was_set():
    raw = check("{{item.a}}", "ilike")
    assert dump_grader(parse_grader(raw)) == raw


# --- TRL reward functions ----------------------------------------------------------------


def test_reward_function_reads_trl_kwargs_and_both_completion_forms():
    reward = build_reward_function(multi("exact + mentions"))
    logged = {}
    completions = ["42", [{"role": "assistant", "content": "it is 42"}], "no"]
    out = reward(
        prompts=["q1", "q2", "q3"],
        completions=completions,
        completion_ids=[[1], [2], [3]],
        answer=["42", "42", "42"],
        trainer_state=object(),
        log_extra=lambda *a: None,
        log_metric=lambda name, value: logged.setdefault(name, value),
    )
    assert out == [2.0, 1.0, 0.0] and all(isinstance(x, float) for x in out)
    assert reward.__name__ == "combo"
    assert logged["graders/combo/exact"] == pytest.approx(1 / 3)
    assert logged["graders/combo/mentions"] == pytest.approx(2 / 3)
    assert logged["graders/combo/sample_errors"] == 0.0


def test_reward_function_raises_on_a_row_without_the_field():
    reward = build_reward_function(check("{{item.answer}}", "eq"))
    with pytest.raises(TemplateError, match=r"item\.answer"):
        reward(prompts=["q"], completions=["a"], solution=["a"])


def test_completion_text_joins_assistant_text_parts():
    parts = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        }
    ]
    assert completion_text(parts) == "ab"
    assert (
        completion_text([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])
        == "y"
    )


def test_grade_batch_matches_grade():
    items, samples = [{"ref": CAT_REF}] * 2, [CAT, CAT_REF]
    scores = grade_batch(similarity("rouge_l"), items, samples)
    assert scores == [
        grade(similarity("rouge_l"), i, s) for i, s in zip(items, samples, strict=True)
    ]
    assert scores[1] == 1.0


# --- isolation and layering ---------------------------------------------------------------


def test_run_isolated_grades_in_a_child_and_stops_a_slow_one():
    grader = parse_grader(multi("exact + mentions"))
    assert run_isolated(grader, {"answer": "42"}, "42").reward == 2.0
    slow = parse_grader({"type": "math_verify", "name": "m", "input": OUT, "reference": "3"})
    report = run_isolated(slow, {}, r"$\boxed{9^{9^{9^{9}}}}$", timeout_s=1.0)
    assert report.reward == 0.0 and "unresponsive_reward_error" in report.errors


def test_the_grader_modules_leave_torch_out():
    code = (
        "import sys, trainers.contract.graders.scoring, trainers.contract.graders.spec; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --- model graders (torch) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    import torch
    from transformers import Qwen2ForSequenceClassification

    from trainers.tiny_model import build_tokenizer, tiny_config

    tok = build_tokenizer()
    config = tiny_config(tok, hidden_size=32, num_layers=1)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForSequenceClassification(config)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def score_model(path, **extra) -> dict:
    return {"type": "score_model", "name": "rm", "model": str(path), "input": [
        {"role": "developer", "content": "Grade the answer to: {{item.question}}"},
        {"role": "assistant", "content": OUT},
    ], **extra}  # fmt: skip


def test_score_model_is_the_reward_models_logit(reward_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    convs = [
        [
            {"role": "system", "content": "Grade the answer to: 2+2"},
            {"role": "assistant", "content": c},
        ]
        for c in ("4", "five, I think")
    ]
    expected = []
    for conv in convs:  # one at a time: no padding involved
        ids = tok(tok.apply_chat_template(conv, tokenize=False), return_tensors="pt",
                  add_special_tokens=False)  # fmt: skip
        with torch.inference_mode():
            expected.append(rm(**ids).logits[0, 0].item())
    got = grade_batch(score_model(reward_model), [{"question": "2+2"}] * 2, ["4", "five, I think"])
    assert got == pytest.approx(expected, abs=1e-5)  # batched with right padding
    mapped = grade(score_model(reward_model, range=[-2, 2]), {"question": "2+2"}, "4")
    assert mapped == pytest.approx(-2 + 4 / (1 + math.exp(-expected[0])), abs=1e-5)


def test_score_model_reward_function_for_trl(reward_model):
    reward = build_reward_function(score_model(reward_model))
    out = reward(prompts=["p"] * 3, completions=["4", "4", "5"], question=["2+2"] * 3)
    assert len(out) == 3 and out[0] == pytest.approx(out[1]) and out[0] != out[2]


def test_cosine_similarity_with_a_local_encoder(tmp_path):
    from trainers.tiny_model import build_tiny_model

    encoder = build_tiny_model(tmp_path / "enc", hidden_size=32, num_layers=1)
    grader = {**similarity("cosine"), "embedding_model": str(encoder)}
    same, other = grade_batch(grader, [{"ref": CAT}] * 2, [CAT, "1234 zebra"])
    assert same == pytest.approx(1.0, abs=1e-5) and -1.0 <= other < same


def test_the_api_cannot_run_model_graders_but_can_describe_them(reward_model):
    assert needs_model(parse_grader(score_model(reward_model)))
    assert not needs_model(parse_grader(multi("exact")))
    assert scoring.SCORERS["score_model"] is not None


def test_a_nan_reward_fails_the_job_naming_the_grader(tmp_path):
    """A reward model that scores NaN is the grader's failure, never a reward of 0."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    from trainers.contract.errors import JobError
    from trainers.tiny_model import build_tokenizer, tiny_config

    tok = build_tokenizer()
    config = tiny_config(tok, hidden_size=32, num_layers=1)
    config.num_labels = 1
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reward = build_reward_function(score_model(tmp_path))
    with pytest.raises(JobError, match=r"grader 'rm' \(score_model\) returned nan for 2 of 2"):
        reward(prompts=["p"] * 2, completions=["4", "5"], question=["2+2"] * 2)
