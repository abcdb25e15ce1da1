"""OpenAI's ``python`` grader (``trainers.contract.graders.python``): the source is checked
at parse time, ``grade(sample, item)`` sees the sample view and the row, its floats are
the scores (in a multi grader too), a row that raises or answers no finite number is an
error under ``on_error``, and a source that does not load fails the grader. Runs in the
real sandbox; skipped where bwrap does not work."""

from __future__ import annotations

import pytest

from trainers.contract.errors import JobError
from trainers.contract.graders.python import MAX_SOURCE_BYTES, PythonError, configure
from trainers.contract.graders.scoring import grade_batch, grade_report
from trainers.contract.graders.spec import InvalidGrader, parse_grader
from trainers.contract.sandbox import SandboxPolicy, probe
from trainers.graders.reward import build_reward_function

POLICY = SandboxPolicy(mode="bwrap", cpu_seconds=5, wall_seconds=30)
WHY = probe(POLICY)
needs_sandbox = pytest.mark.skipif(bool(WHY), reason=f"no working bubblewrap sandbox: {WHY}")
EXACT = (
    "def grade(sample, item):\n"
    "    return 1.0 if sample['output_text'].strip() == item['answer'] else 0.25\n"
)


def python(source: str, **fields) -> dict:
    return {"type": "python", "name": "py", "source": source, **fields}


@pytest.fixture(autouse=True)
def sandbox():
    configure(POLICY)
    yield
    configure(SandboxPolicy())


@pytest.mark.parametrize(
    "source,words",
    [
        ("def grade(sample, item) return 1", "source does not parse: expected ':' (line 1)"),
        ("def score(sample, item):\n    return 1\n", "must define 'def grade(sample, item)'"),
        ("class A:\n    def grade(self, s, i):\n        return 1\n", "at its top level"),
        ("def grade(sample):\n    return 1\n", "must take two arguments"),
        ("x = 1\n" * (MAX_SOURCE_BYTES // 6 + 1), f"at most {MAX_SOURCE_BYTES} are accepted"),
    ],
)
def test_a_bad_source_is_refused_at_parse_time_naming_the_field(source, words):
    with pytest.raises(InvalidGrader, match=r"grader\.source: ") as err:
        parse_grader(python(source))
    assert words in err.value.message and err.value.param == "grader.source"


def test_image_tag_is_accepted_and_on_error_is_checked():
    assert parse_grader(python(EXACT, image_tag="2025-05-08")).image_tag == "2025-05-08"
    with pytest.raises(InvalidGrader) as err:
        parse_grader(python(EXACT, on_error="ignore"))
    assert err.value.param == "grader.on_error"


@needs_sandbox
def test_grade_sees_the_sample_view_and_the_row():
    source = (
        "def grade(sample, item):\n"
        "    parsed = sample['output_json'] or {}\n"
        "    words = len(sample['output_text'].split())\n"
        "    roles = [m['role'] for m in sample['messages']]\n"
        "    assert roles == ['assistant'] and sample['tool_calls'] == []\n"
        "    return item['weight'] * words + parsed.get('bonus', 0)\n"
    )
    rows = [{"weight": 0.5}, {"weight": 2}]
    # 'three words here' -> 0.5 * 3; '{"bonus": 1.5}' is two words -> 2 * 2 + 1.5
    assert grade_batch(python(source), rows, ["three words here", '{"bonus": 1.5}']) == [1.5, 5.5]


@needs_sandbox
def test_more_rows_than_one_batch_are_all_scored_in_order():
    rows = [{"answer": str(i)} for i in range(150)]
    samples = [str(i) if i % 3 else "wrong" for i in range(150)]
    expected = [0.25 if i % 3 == 0 else 1.0 for i in range(150)]
    assert grade_batch(python(EXACT), rows, samples) == expected


@needs_sandbox
def test_a_multi_grader_combines_a_python_sub_grader():
    multi = {
        "type": "multi",
        "name": "combo",
        "graders": {
            "exact": python(EXACT),
            "shout": {"type": "regex", "name": "r", "input": "{{sample.output_text}}",
                      "pattern": "!$"},
        },
        "calculate_output": "exact + 2 * shout",
    }  # fmt: skip
    rows = [{"answer": "4"}, {"answer": "4"}]
    assert grade_batch(multi, rows, ["4", "5!"]) == [1.0, 2.25]


@needs_sandbox
@pytest.mark.parametrize(
    "body,words",
    [
        ("raise KeyError('answer')", "KeyError: 'answer'"),
        ("return 'high'", "grade returned str, not a number"),
        ("return True", "grade returned bool, not a number"),
        ("return float('nan')", "grade returned nan; a score must be finite"),
        ("import sys; sys.exit(3)", "SystemExit: 3"),
    ],
)
def test_a_row_without_a_finite_number_is_an_error_under_on_error(body, words):
    source = f"def grade(sample, item):\n    if item['bad']:\n        {body}\n    return 0.5\n"
    rows = [{"bad": False}, {"bad": True}, {"bad": False}]
    with pytest.raises(PythonError, match="could not score sample 1") as err:
        grade_batch(python(source), rows, ["a", "b", "c"])
    assert words in str(err.value) and not err.value.soft
    report = grade_report(python(source, on_error="zero"), {"bad": True}, "x")
    assert report.reward == 0.0 and words in report.errors["python_grader_runtime_error"]
    assert grade_batch(python(source, on_error="zero"), rows, ["a", "b", "c"]) == [0.5, 0.0, 0.5]


@needs_sandbox
def test_a_source_that_does_not_load_fails_the_grader():
    source = "import numpy\ndef grade(sample, item):\n    return 1.0\n"
    with pytest.raises(PythonError, match="the source failed to load") as err:
        grade_batch(python(source, on_error="zero"), [{}], ["x"])
    assert "No module named 'numpy'" in str(err.value) and not err.value.soft


def test_a_server_without_the_sandbox_reports_a_server_error():
    configure(SandboxPolicy())
    report = grade_report(python(EXACT), {"answer": "4"}, "4")
    assert report.reward == 0.0
    assert "the python grader is off" in report.errors["python_grader_server_error"]


@needs_sandbox
def test_the_reward_function_fails_the_job_or_zeroes_as_on_error_says():
    source = "def grade(sample, item):\n    return 1 / int(item['d'])\n"
    reward = build_reward_function(python(source), sandbox=POLICY)
    assert reward(prompts=["p", "p"], completions=["a", "b"], d=["2", "4"]) == [0.5, 0.25]
    with pytest.raises(JobError) as caught:
        reward(prompts=["p"], completions=["a"], d=["0"])
    assert caught.value.code == "grader_failed" and "ZeroDivisionError" in caught.value.message
    zero = build_reward_function(python(source, on_error="zero"), sandbox=POLICY)
    logged = {}
    assert zero(prompts=["p"], completions=["a"], d=["0"], log_metric=logged.__setitem__) == [0]
    assert logged["graders/py/sample_errors"] == 1.0
    off = build_reward_function(python(source), sandbox=SandboxPolicy())
    with pytest.raises(JobError, match="POSTTRAIN_PYTHON_GRADER=off"):
        off(prompts=["p"], completions=["a"], d=["1"])
