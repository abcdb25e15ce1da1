"""The grader endpoints in-process: OpenAI's run/validate shapes, and what posttrain refuses."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings

RUN = "/v1/fine_tuning/alpha/graders/run"
VALIDATE = "/v1/fine_tuning/alpha/graders/validate"
OUT = "{{sample.output_text}}"

# OpenAI's GraderRunResponse: top-level keys, metadata keys and metadata.errors keys.
RUN_KEYS = {"reward", "metadata", "sub_rewards", "model_grader_token_usage_per_model"}
METADATA_KEYS = {
    "name", "type", "errors", "execution_time", "scores", "token_usage", "sampled_model_name",
}  # fmt: skip
ERROR_KEYS = {
    "formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
    "model_grader_refusal_error", "model_grader_server_error",
    "model_grader_server_error_details", "other_error", "python_grader_runtime_error",
    "python_grader_runtime_error_details", "python_grader_server_error",
    "python_grader_server_error_type", "sample_parse_error", "truncated_observation_error",
    "unresponsive_reward_error",
}  # fmt: skip

# One grader of each torch-free type, a sample, an item, and the reward worked out by hand.
CASES = {
    "string_check": (
        {"type": "string_check", "name": "eq", "input": OUT, "reference": "{{item.answer}}",
         "operation": "ilike"},
        "The answer is PARIS.", {"answer": "paris"}, 1.0,
    ),
    "text_similarity": (  # kitten/sitting: 1 - 5/13
        {"type": "text_similarity", "name": "fz", "input": OUT, "reference": "{{item.answer}}",
         "evaluation_metric": "fuzzy_match", "pass_threshold": 0.5},
        "kitten", {"answer": "sitting"}, 8 / 13,
    ),
    "math_verify": (
        {"type": "math_verify", "name": "math", "input": OUT, "reference": "{{item.answer}}"},
        r"so $\boxed{0.5}$", {"answer": r"\frac{1}{2}"}, 1.0,
    ),
    "regex": (
        {"type": "regex", "name": "fmt", "input": OUT, "pattern": r"^Answer: \d+$"},
        "Answer: 12", None, 1.0,
    ),
    "length_penalty": (  # 9 words, target 6, max 8 -> over max -> -1
        {"type": "length_penalty", "name": "len", "input": OUT, "max_length": 8,
         "target_length": 6},
        "one two three four five six seven eight nine", {}, -1.0,
    ),
    "multi": (  # exact 0, mentions 1 -> 0.5 * 0 + 0.5 * 1
        {"type": "multi", "name": "combo", "calculate_output": "0.5 * exact + 0.5 * mentions",
         "graders": {
             "exact": {"type": "string_check", "name": "e", "input": OUT,
                       "reference": "{{item.answer}}", "operation": "eq"},
             "mentions": {"type": "string_check", "name": "m", "input": OUT,
                          "reference": "{{item.answer}}", "operation": "like"}}},
        "It is 42", {"answer": "42"}, 0.5,
    ),
}  # fmt: skip
SCORE_MODEL = {
    "type": "score_model", "name": "rm", "model": "reward", "range": [0, 1],
    "input": [{"role": "user", "content": "Q: {{item.question}}"},
              {"role": "assistant", "content": [{"type": "output_text", "text": OUT}]}],
    "sampling_params": {"temperature": 0.2},
}  # fmt: skip


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-gr"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def error_of(resp) -> dict:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("kind", list(CASES))
def test_run_scores_each_torch_free_grader_in_openais_shape(client, kind):
    grader, sample, item, expected = CASES[kind]
    resp = client.post(RUN, json={"grader": grader, "model_sample": sample, "item": item})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == RUN_KEYS and body["reward"] == pytest.approx(expected)
    meta = body["metadata"]
    assert set(meta) == METADATA_KEYS and set(meta["errors"]) == ERROR_KEYS | {"details"}
    assert meta["name"] == grader["name"] and meta["type"] == kind
    assert not any(v for k, v in meta["errors"].items() if k != "details")
    assert meta["token_usage"] is None and meta["sampled_model_name"] is None
    assert meta["execution_time"] >= 0 and body["model_grader_token_usage_per_model"] == {}


def test_run_multi_reports_sub_rewards(client):
    grader, sample, item, _ = CASES["multi"]
    body = client.post(RUN, json={"grader": grader, "model_sample": sample, "item": item}).json()
    assert body["sub_rewards"] == {"exact": 0.0, "mentions": 1.0}
    assert body["metadata"]["scores"] == body["sub_rewards"]


@pytest.mark.parametrize("kind", list(CASES))
def test_validate_echoes_each_grader(client, kind):
    grader = CASES[kind][0]
    resp = client.post(VALIDATE, json={"grader": grader})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"grader": grader}


def test_score_model_validates_but_runs_only_in_training(client):
    assert client.post(VALIDATE, json={"grader": SCORE_MODEL}).json() == {"grader": SCORE_MODEL}
    err = error_of(client.post(RUN, json={"grader": SCORE_MODEL, "model_sample": "4"}))
    assert "score_model graders" in err["message"] and "only during training" in err["message"]
    assert err["param"] == "grader"
    cosine = {"type": "text_similarity", "name": "c", "input": OUT, "reference": "x",
              "evaluation_metric": "cosine", "embedding_model": "tiny"}  # fmt: skip
    assert client.post(VALIDATE, json={"grader": cosine}).status_code == 200
    assert (
        "only during training"
        in error_of(client.post(RUN, json={"grader": cosine, "model_sample": "x"}))["message"]
    )


@pytest.mark.parametrize(
    "model,message",
    [
        ("/models/reward", "grader.model: model not found or not allowed"),  # no such model
        ("tiny", "is not a sequence-classification model"),  # a causal LM
    ],
)
def test_validate_refuses_score_models_as_job_creation_does(client, model, message):
    """/graders/validate and job creation answer a score_model alike: the same model
    access (a path that is no allowed model) and the same classifier check."""
    grader = {**SCORE_MODEL, "model": model}
    err = error_of(client.post(VALIDATE, json={"grader": grader}))
    assert message in err["message"] and err["param"] == "grader.model"
    fid = client.post(
        "/v1/files",
        files={"file": ("p.jsonl", b'{"prompt": "q", "question": "q"}\n')},
        data={"purpose": "fine-tune"},
    ).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": fid,
            "method": {"type": "grpo", "grpo": {"graders": [grader]}},
        },
    )
    assert job.status_code == 400
    assert message.split(": ", 1)[-1] in job.json()["error"]["message"]
    assert job.json()["error"]["param"] == "method.grpo.graders[0].model"


@pytest.mark.parametrize("path", [RUN, VALIDATE])
def test_python_grader_is_refused_where_the_server_has_it_off(client, path):
    grader = {"type": "python", "name": "py", "source": "def grade(sample, item): return 1.0"}
    body = {"grader": grader} | ({"model_sample": "x"} if path == RUN else {})
    err = error_of(client.post(path, json=body))
    assert err["message"].startswith("grader: the python grader needs the bubblewrap sandbox")
    assert "POSTTRAIN_PYTHON_GRADER=off" in err["message"] and err["param"] == "grader"


def test_unknown_grader_type_is_a_400_listing_the_known_ones(client):
    err = error_of(client.post(VALIDATE, json={"grader": {"type": "vibes", "name": "v"}}))
    assert "unknown grader type 'vibes'" in err["message"] and "string_check" in err["message"]


def test_unknown_template_namespace_is_a_400_naming_the_field(client):
    grader = {**CASES["string_check"][0], "reference": "{{row.answer}}"}
    err = error_of(client.post(RUN, json={"grader": grader, "model_sample": "x"}))
    assert "unknown template namespace 'row'" in err["message"]
    assert err["param"] == "grader.reference"


def test_meteor_and_bad_formulas_are_refused_at_validation(client):
    meteor = {**CASES["text_similarity"][0], "evaluation_metric": "meteor"}
    err = error_of(client.post(VALIDATE, json={"grader": meteor}))
    assert "WordNet" in err["message"] and err["param"] == "grader.evaluation_metric"
    bad = {**CASES["multi"][0], "calculate_output": "exact.__class__"}
    err = error_of(client.post(VALIDATE, json={"grader": bad}))
    assert err["param"] == "grader.calculate_output"


def test_missing_item_field_is_reported_as_openai_does(client):
    grader = CASES["string_check"][0]
    body = client.post(RUN, json={"grader": grader, "model_sample": "x", "item": {}}).json()
    errors = body["metadata"]["errors"]
    assert body["reward"] == 0.0 and errors["invalid_variable_error"] is True
    assert "item.answer" in errors["details"]["invalid_variable_error"]


def test_run_needs_a_model_sample(client):
    err = error_of(client.post(RUN, json={"grader": CASES["regex"][0]}))
    assert err["param"] == "model_sample"
