"""The judge endpoints setting (``judgeendpoints.parse_endpoints``) and the training-side
judge client's failure paths: a model no endpoint serves, a key the worker lacks, an
endpoint nobody listens on (a real refused connection) under each ``on_error``. What a
judge answers, and how it becomes a score, is tested against posttrain's own inference
(tests/e2e/test_judge_inference.py) and in a GRPO run
(tests/trainers/algorithms/test_grpo_judge.py)."""

from __future__ import annotations

import json
import socket

import pytest

from trainers.contract.graders import judgeendpoints as je
from trainers.contract.graders.spec import parse_grader
from workers.settings import WorkerSettings

SCORE = {
    "type": "score_model",
    "name": "rating",
    "model": "judge-chat",
    "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
}
CONVERSATION = [{"role": "user", "content": "Rate: 4"}]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: a connection is refused


def endpoints(**fields) -> je.JudgeEndpoints:
    base = {"base_url": f"http://127.0.0.1:{_closed_port()}/v1", "models": ["judge-chat"]}
    return je.parse_endpoints(json.dumps({"own": {**base, **fields}}))


@pytest.fixture(autouse=True)
def no_judges():
    yield
    je.configure_judges(je.JudgeEndpoints({}))


def test_an_empty_setting_names_no_endpoint():
    assert je.parse_endpoints("").models() == frozenset()
    assert je.parse_endpoints("  ").root == {}


def test_a_parsed_setting_serves_its_models_with_defaults():
    parsed = je.parse_endpoints(
        json.dumps(
            {
                "a": {"base_url": "http://judge:8000/v1/", "models": ["m1", "m2"]},
                "b": {"base_url": "https://x.example/v1", "models": ["m3"], "on_error": "zero"},
            }
        )
    )
    assert parsed.models() == {"m1", "m2", "m3"}
    name, endpoint = parsed.endpoint_for("m2")
    assert name == "a" and endpoint.base_url == "http://judge:8000/v1"  # trailing / dropped
    assert (endpoint.retries, endpoint.max_concurrency, endpoint.on_error) == (1, 8, "error")
    assert parsed.endpoint_for("m4") is None


@pytest.mark.parametrize(
    "raw,words",
    [
        ("{", "POSTTRAIN_JUDGE_ENDPOINTS is not JSON"),
        ("[]", "POSTTRAIN_JUDGE_ENDPOINTS must be a JSON object"),
        ({"a": {"models": ["m"]}}, "POSTTRAIN_JUDGE_ENDPOINTS.a.base_url: Field required"),
        ({"a": {"base_url": "ftp://h/v1", "models": ["m"]}}, ".a.base_url: the url must be"),
        ({"a": {"base_url": "http://u:p@h/v1", "models": ["m"]}}, "may not carry credentials"),
        ({"a": {"base_url": "http://h/v1", "models": []}}, ".a.models: List should have"),
        ({"a": {"base_url": "http://h/v1", "models": [" "]}}, ".a.models: a model name"),
        (
            {"a": {"base_url": "http://h/v1", "models": ["m"], "api_key_env": "A-B"}},
            ".a.api_key_env: must be the name of an environment variable",
        ),
        ({"a": {"base_url": "http://h/v1", "models": ["m"], "key": "s"}}, ".a.key: Extra"),
        (
            {
                "a": {"base_url": "http://h/v1", "models": ["m"]},
                "b": {"base_url": "http://i/v1", "models": ["m"]},
            },
            "model 'm' is listed by two endpoints ('a' and 'b')",
        ),
    ],
)
def test_a_bad_setting_names_the_setting_and_its_field(raw, words):
    text = raw if isinstance(raw, str) else json.dumps(raw)
    with pytest.raises(ValueError) as info:
        je.parse_endpoints(text)
    assert words in str(info.value)
    with pytest.raises(ValueError, match="POSTTRAIN_JUDGE_ENDPOINTS"):
        WorkerSettings(judge_endpoints=text)


def test_the_worker_settings_hand_the_endpoints_over():
    text = json.dumps({"a": {"base_url": "http://h/v1", "models": ["m"]}})
    assert WorkerSettings(judge_endpoints=text).judges().models() == {"m"}


def test_a_model_no_endpoint_serves_is_a_hard_error():
    grader = parse_grader(SCORE)
    assert not je.is_remote_judge(grader)
    with pytest.raises(je.JudgeEndpointError) as info:
        je.score_judge(grader, [CONVERSATION], [])
    assert not info.value.soft and "served by no judge endpoint" in str(info.value)


def test_a_key_the_worker_lacks_fails_without_showing_any(monkeypatch):
    monkeypatch.delenv("POSTTRAIN_TEST_JUDGE_KEY", raising=False)
    je.configure_judges(endpoints(api_key_env="POSTTRAIN_TEST_JUDGE_KEY"))
    with pytest.raises(je.JudgeEndpointError, match="POSTTRAIN_TEST_JUDGE_KEY, which is not set"):
        je.score_judge(parse_grader(SCORE), [CONVERSATION], [])


def test_an_unreachable_endpoint_fails_the_batch_under_on_error_error(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_JUDGE_KEY", "sk-secret-value")
    je.configure_judges(endpoints(api_key_env="POSTTRAIN_TEST_JUDGE_KEY", retries=1))
    grader = parse_grader(SCORE)
    assert je.is_remote_judge(grader)
    with pytest.raises(je.JudgeEndpointError) as info:
        je.score_judge(grader, [CONVERSATION, CONVERSATION], [])
    message = str(info.value)
    assert "could not answer 2 of 2 samples" in message and "could not be reached" in message
    assert "sk-secret-value" not in message and "127.0.0.1" not in message
    metrics = je.judge_metrics("rating")
    assert metrics["judge_calls"] == 4 and metrics["judge_errors"] == 4  # 2 samples x 2 tries
    assert je.judge_metrics("rating")["judge_calls"] == 0  # taken


def test_an_unreachable_endpoint_scores_zero_under_on_error_zero():
    je.configure_judges(endpoints(on_error="zero", retries=0))
    notes: list = []
    assert je.score_judge(parse_grader(SCORE), [CONVERSATION], notes) == [0.0]
    assert len(notes) == 1 and notes[0].soft and "could not be reached" in str(notes[0])
    assert je.judge_metrics("rating")["judge_errors"] == 1


@pytest.mark.parametrize(
    "reply",
    [b"not json", b"{}", b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}'],
)
def test_a_reply_that_is_no_chat_completion_is_said_so(reply):
    with pytest.raises(ValueError, match="judge endpoint's"):
        je.read_answer(reply)


def test_read_answer_takes_the_first_choice():
    reply = {"choices": [{"message": {"role": "assistant", "content": "7"}}, {}]}
    assert je.read_answer(json.dumps(reply).encode()) == "7"
