"""Generative judges' prompts and answers (``trainers.contract.graders.judging``) and the
``label_model`` spec (``parse_criterion``, ``validate.check_grader_models``): pure
functions, no model."""

from __future__ import annotations

import pytest

from trainers.contract.graders.judging import (
    JudgeParseError,
    judge_messages,
    judge_params,
    label_score,
    parse_label,
    parse_score,
)
from trainers.contract.graders.spec import InvalidGrader, parse_criterion, parse_grader
from trainers.contract.graders.validate import check_grader_models
from trainers.contract.modelfiles import ModelFileError

LABEL = {
    "type": "label_model",
    "name": "verdict",
    "model": "judge",
    "input": [{"role": "user", "content": "Is {{sample.output_text}} right for {{item.q}}?"}],
    "labels": ["Correct", "incorrect", "very good", "good"],
    "passing_labels": ["correct", "Very Good", "good"],
}


@pytest.mark.parametrize(
    "answer,label",
    [
        ("correct", "Correct"),  # exact, ignoring case
        ("  INCORRECT \n", "incorrect"),  # exact once trimmed
        ("The answer is correct.", "Correct"),  # the one label that occurs
        ("I'd say: incorrect!", "incorrect"),  # "correct" inside a longer word is not one
        ("That was very good work", "very good"),  # "good" inside a longer label is that one
        ('"good"', "good"),
    ],
)
def test_parse_label_picks_the_one_label(answer, label):
    assert parse_label(answer, LABEL["labels"]) == label


@pytest.mark.parametrize(
    "answer,words",
    [
        ("", "names none of the labels"),
        ("goodness me, incorrectly", "names none of the labels"),
        ("correct, or incorrect", "more than one label ('Correct', 'incorrect')"),
        ("good and very good", "more than one label"),
    ],
)
def test_parse_label_refuses_no_label_and_two(answer, words):
    with pytest.raises(JudgeParseError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_label(answer, LABEL["labels"])
    assert JudgeParseError.flag == "model_grader_parse_error" and JudgeParseError.soft


def test_a_parse_error_quotes_the_answer_cut_short():
    with pytest.raises(JudgeParseError) as info:
        parse_label("x" * 500, ["yes"])
    assert "'" + "x" * 200 + "...'" in str(info.value)


def test_label_score_is_one_for_a_passing_label():
    grader = parse_criterion(LABEL)
    assert label_score(grader, "Correct") == 1.0 and label_score(grader, "very good") == 1.0
    assert label_score(grader, "incorrect") == 0.0


@pytest.mark.parametrize(
    "answer,bounds,score",
    [
        ("0.8", None, 0.8),
        ("Score: 7/10", [0, 10], 7.0),
        ("-3 points", [-5, 5], -3.0),
        ("about .5, maybe 0.9", None, 0.5),
        ("9", None, 1.0),  # clamped to the default [0, 1]
        ("-2", [0, 10], 0.0),
        ("1e999", [0, 4], 4.0),
        ("2.5e-1", None, 0.25),
    ],
)
def test_parse_score_reads_the_first_number_clamped(answer, bounds, score):
    assert parse_score(answer, bounds) == score


def test_parse_score_without_a_number_is_a_parse_error():
    with pytest.raises(JudgeParseError, match="holds no number: 'excellent'"):
        parse_score("excellent", [0, 10])


def test_the_judge_prompt_and_its_parameters():
    grader = parse_criterion(LABEL)
    assert judge_messages(grader, {"q": "2+2"}, "4") == [
        {"role": "user", "content": "Is 4 right for 2+2?"}
    ]
    assert judge_params(grader) == {"temperature": 0.0}
    params = {"temperature": 0.7, "top_p": 0.9, "seed": 1, "max_completions_tokens": 8}
    sampled = parse_criterion({**LABEL, "sampling_params": {**params, "reasoning_effort": "low"}})
    assert judge_params(sampled) == {
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 1,
        "max_completion_tokens": 8,
    }


@pytest.mark.parametrize(
    "change,param",
    [
        ({"labels": ["a", "A "]}, "c.labels"),
        ({"passing_labels": ["nope"]}, "c.passing_labels"),
        ({"labels": ["a", ""]}, "c.labels[1]"),
        ({"model": ""}, "c.model"),
        ({"input": [{"role": "user", "content": "{{bad.x}}"}]}, "c.input[0].content"),
        ({"extra": 1}, "c.extra"),
    ],
)
def test_a_bad_label_model_names_its_field(change, param):
    with pytest.raises(InvalidGrader) as info:
        parse_criterion({**LABEL, **change}, "c")
    assert info.value.param == param, info.value.message


def test_label_model_grades_training_only_through_a_judge_endpoint():
    multi = {"type": "multi", "name": "m", "graders": {"v": LABEL}, "calculate_output": "v"}
    for raw, param in ((LABEL, "g.model"), (multi, "g.graders.v.model")):
        grader = parse_grader(raw)
        with pytest.raises(ModelFileError, match="testing criterion of an eval") as info:
            check_grader_models(grader, "g")
        assert info.value.param == param
        assert "POSTTRAIN_JUDGE_ENDPOINTS" in str(info.value)
        with pytest.raises(ModelFileError, match="served by none this server names"):
            check_grader_models(grader, "g", judges={"another"})  # a training job's check
        check_grader_models(grader, "g", judges={LABEL["model"]})  # a remote judge: accepted
