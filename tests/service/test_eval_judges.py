"""Model-graded criteria in evals: ``label_model`` and ``score_model`` (a generative judge
or a local reward model), checked at eval creation and graded by eval runs.

The API is in-process; a run is graded by calling the task's function
(``workers.evaltasks.grade_run``) with a stand-in judge that records what it was asked
and answers what the test says, so the prompt, the parsing, the pass rule and the usage
are asserted exactly. The real inference path is ``tests/e2e/test_inference.py``'s.
"""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import EvalCreateResponse
from openai.types.evals import RunRetrieveResponse
from openai.types.evals.runs import OutputItemListResponse

from service.main import create_app
from service.settings import ApiSettings
from workers.evaltasks import grade_run

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
SOURCE = {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True}
LABEL = {
    "type": "label_model",
    "name": "verdict",
    "model": "tiny",
    "input": [
        {"role": "system", "content": "Answer correct or incorrect."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Q: {{item.question}} Gold: {{item.answer}}"},
                {"type": "input_text", "text": " Reply: {{sample.output_text}}"},
            ],
        },
    ],
    "labels": ["correct", "incorrect"],
    "passing_labels": ["correct"],
}
SCORE = {
    "type": "score_model",
    "name": "rating",
    "model": "tiny",
    "input": [{"role": "user", "content": "Rate 0-10: {{sample.output_text}}"}],
    "range": [0, 10],
    "pass_threshold": 7,
    "sampling_params": {"max_completions_tokens": 16, "seed": 3},
}


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-eval-judges",
        api_keys="k1,k2",
        inference_max_tokens=64,
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def sdk(app):
    with TestClient(app) as http:
        yield openai.OpenAI(
            api_key="k1", base_url="http://testserver/v1", http_client=http, max_retries=0
        )


def refusal(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body


def create(sdk, *criteria, source=SOURCE):
    return sdk.evals.create(name="judged", data_source_config=source, testing_criteria=criteria)


def jsonl(outputs: list[str]) -> dict:
    content = [
        {"item": {"question": f"q{i}", "answer": f"a{i}"}, "sample": {"output_text": out}}
        for i, out in enumerate(outputs)
    ]
    return {"type": "jsonl", "source": {"type": "file_content", "content": content}}


# ---- eval creation: the criteria checked, a 400 naming the field
@pytest.mark.parametrize(
    "change,param,words",
    [
        ({"labels": []}, "labels", "at least 1"),
        ({"labels": ["Yes", " yes "]}, "labels", "'Yes' and ' yes ' are the same answer"),
        ({"labels": ["ok", "  "]}, "labels[1]", "must have text"),
        ({"passing_labels": ["correct", "maybe"]}, "passing_labels", "not: 'maybe'"),
        ({"passing_labels": []}, "passing_labels", "at least 1"),
        ({"model": None}, "model", "model"),
        ({"model": "nope"}, "model", "model not found or not allowed"),
        ({"model": "/etc"}, "model", "model not found or not allowed"),
        ({"pass_threshold": 0.5}, "pass_threshold", "Extra inputs"),
        ({"input": []}, "input", "at least 1"),
        ({"input": [{"role": "user", "content": "{{item.gold}}"}]}, "", "'item.gold'"),
        ({"input": [{"role": "user", "content": "{{sample.choices}}"}]}, "input[0].content", ""),
        ({"sampling_params": {"max_completions_tokens": 65}}, "sampling_params.max_", "64"),
        ({"sampling_params": {"temperature": 3}}, "sampling_params.temperature", "2"),
    ],
)
def test_a_bad_label_model_is_a_400_naming_the_field(sdk, change, param, words):
    criterion = {k: v for k, v in {**LABEL, **change}.items() if v is not None}
    err = refusal(lambda: create(sdk, criterion))
    assert err["param"].startswith(f"testing_criteria[0].{param}".rstrip(".")), err
    assert words in err["message"], err
    if words.startswith("model not found"):
        assert err["code"] == "model_not_found"


def test_judge_criteria_need_the_sample_namespace_and_stay_out_of_multi(sdk):
    no_sample = {**SOURCE, "include_sample_schema": False}
    err = refusal(lambda: create(sdk, LABEL, source=no_sample))
    assert err["param"] == "testing_criteria[0]" and "include_sample_schema" in err["message"]
    multi = {
        "type": "multi",
        "name": "m",
        "graders": {"v": {k: v for k, v in LABEL.items()}},
        "calculate_output": "v",
    }
    err = refusal(lambda: create(sdk, multi))
    assert err["param"] == "testing_criteria[0].graders.v.model" and "on its own" in err["message"]
    judge_in_multi = {
        **multi,
        "graders": {"v": {k: v for k, v in SCORE.items() if k != "pass_threshold"}},
    }
    err = refusal(lambda: create(sdk, judge_in_multi))
    assert err["param"] == "testing_criteria[0].graders.v.model"
    assert "not a sequence-classification model" in err["message"]


def test_label_model_and_both_score_models_are_accepted_as_given(sdk):
    reward = {**SCORE, "name": "rm", "model": "reward"}
    body = sdk.evals.with_raw_response.create(
        name="judged", data_source_config=SOURCE, testing_criteria=[LABEL, SCORE, reward]
    ).http_response.json()
    EvalCreateResponse.model_validate(body)
    assert body["testing_criteria"] == [LABEL, SCORE, reward]
    assert "grading" not in body  # the resolved models are never answered


def test_label_model_without_a_judge_endpoint_stays_refused_for_training_and_graders(sdk, app):
    """This server names no judge endpoints (tests/service/test_judge_endpoints_api.py
    has one that does)."""
    with TestClient(app) as http:
        headers = {"Authorization": "Bearer k1"}
        for path, body, words in (
            ("/v1/fine_tuning/alpha/graders/validate", {"grader": LABEL}, "testing criterion"),
            (
                "/v1/fine_tuning/alpha/graders/run",
                {"grader": LABEL, "model_sample": "x"},
                "only during training",
            ),
        ):
            resp = http.post(path, json=body, headers=headers)
            assert resp.status_code == 400
            assert words in resp.json()["error"]["message"]
        fid = http.post(
            "/v1/files",
            files={"file": ("p.jsonl", b'{"prompt": "q", "question": "q", "answer": "a"}\n')},
            data={"purpose": "fine-tune"},
            headers=headers,
        ).json()["id"]
        job = http.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny",
                "training_file": fid,
                "method": {"type": "grpo", "grpo": {"graders": [LABEL]}},
            },
            headers=headers,
        )
    assert job.status_code == 400, job.text
    err = job.json()["error"]
    assert err["param"].startswith("method.grpo.graders[0]")
    assert "label_model" in err["message"] and "eval" in err["message"]


# ---- runs: the judge asked and its answers read
def fake_judge(answers: dict[str, object], asked: list):
    """A judge that answers by the row's question (found in the prompt); a dict answer
    is returned as is (an error), a string as the judge's text."""

    def judge(header, messages, params):
        asked.append((header, messages, params))
        text = " ".join(m["content"] for m in messages)
        question = next(q for q in answers if f"Q: {q} " in text or text.endswith(q))
        answer = answers[question]
        if isinstance(answer, dict):
            return answer
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        return {"content": answer, "finish_reason": "stop", "usage": usage}

    return judge


def test_a_label_model_run_reads_each_answer_as_a_label(sdk, app, settings, tmp_path):
    ev = create(sdk, LABEL)
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(["a0", "x", "y", "z", "w"]))
    asked: list = []
    answers = {
        "q0": " Correct. ",  # exact, once trimmed and ignoring case
        "q1": "The reply is incorrect, sadly.",  # the one label inside ("correct" is in it)
        "q2": "ahh uhh",  # no label: a fail, the answer quoted
        "q3": "correct or incorrect",  # two labels: a fail
        "q4": {"error": {"code": "inference_unavailable", "message": "no worker"}},
    }
    s = app.state
    judge = fake_judge(answers, asked)
    assert grade_run(run.id, s.eval_runs, s.files, settings, judge=judge) == "completed"

    header, messages, params = asked[0]
    assert header == {"name": "tiny", "path": str(tmp_path / "models" / "tiny"), "base": None}
    assert messages == [
        {"role": "system", "content": "Answer correct or incorrect."},
        {"role": "user", "content": "Q: q0 Gold: a0 Reply: a0"},
    ]
    assert params == {"temperature": 0.0}  # temperature 0 by default
    page = sdk.evals.runs.output_items.with_raw_response.list(run.id, eval_id=ev.id)
    items = page.http_response.json()["data"]
    for item in items:
        OutputItemListResponse.model_validate(item)
    results = [item["results"][0] for item in items]
    assert [r["label"] for r in results] == ["correct", "incorrect", None, None, None]
    assert [r["score"] for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [r["passed"] for r in results] == [True, False, False, False, False]
    assert [i["status"] for i in items] == ["pass", "fail", "fail", "fail", "fail"]
    assert "errors" not in results[0] and "errors" not in results[1]
    assert results[2]["errors"] == {
        "model_grader_parse_error": "the judge's answer names none of the labels "
        "('correct', 'incorrect'): 'ahh uhh'"
    }
    assert "more than one label" in results[3]["errors"]["model_grader_parse_error"]
    assert "no worker" in results[4]["errors"]["model_grader_server_error"]
    judged = results[0]["sample"]
    assert judged["input"] == messages and judged["model"] == "tiny"
    assert judged["output"] == [{"role": "assistant", "content": " Correct. "}]
    assert judged["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "cached_tokens": 0,
    }
    assert judged["temperature"] == 0.0 and judged["finish_reason"] == "stop"
    assert results[4]["sample"]["error"]["code"] == "inference_unavailable"

    body = sdk.evals.runs.with_raw_response.retrieve(run.id, eval_id=ev.id).http_response.json()
    RunRetrieveResponse.model_validate(body)
    # an unparseable answer is a fail; a judge that could not be asked, an error
    assert body["result_counts"] == {"total": 5, "errored": 1, "failed": 3, "passed": 1}
    assert body["per_testing_criteria_results"] == [
        {"testing_criteria": "verdict", "passed": 1, "failed": 4}
    ]
    assert body["per_model_usage"] == [
        {
            "model_name": "tiny",
            "invocation_count": 4,
            "prompt_tokens": 40,
            "completion_tokens": 12,
            "total_tokens": 52,
            "cached_tokens": 0,
        }
    ]


def test_a_generative_score_model_reads_the_first_number(sdk, app, settings):
    ev = create(sdk, SCORE)
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(["r0", "r1", "r2", "r3"]))
    asked: list = []
    answers = {"r0": "8 out of 10", "r1": "Score: 6.5", "r2": "12!", "r3": "great"}
    s = app.state
    judge = fake_judge(answers, asked)
    assert grade_run(run.id, s.eval_runs, s.files, settings, judge=judge) == "completed"
    assert asked[0][1] == [{"role": "user", "content": "Rate 0-10: r0"}]
    assert asked[0][2] == {"temperature": 0.0, "seed": 3, "max_completion_tokens": 16}
    items = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    results = [item.results[0] for item in items]
    assert [r.score for r in results] == [8.0, 6.5, 10.0, 0.0]  # 12 clamped to the range
    assert [r.passed for r in results] == [True, False, True, False]  # pass_threshold 7
    assert "holds no number: 'great'" in results[3].errors["model_grader_parse_error"]
    assert results[0].sample["max_completion_tokens"] == 16
    counts = sdk.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts
    assert (counts.passed, counts.failed, counts.errored) == (2, 2, 0)


def test_judge_usage_is_counted_beside_the_sampled_models(sdk, app, settings):
    """A completions run sampled by one model and judged by another: per_model_usage
    has both, each under its own name."""
    (app.state.settings.data_dir / "models" / "judge").mkdir()
    (app.state.settings.data_dir / "models" / "judge" / "config.json").write_text(
        json.dumps({"model_type": "llama"})
    )
    ev = create(sdk, {**LABEL, "model": "judge"})
    items = [{"item": {"question": "q0", "answer": "a0"}}]
    template = [{"role": "user", "content": "{{item.question}}"}]
    run = sdk.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": "tiny",
            "source": {"type": "file_content", "content": items},
            "input_messages": {"type": "template", "template": template},
        },
    )

    def sampler(messages):
        usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        return {"content": "a0", "finish_reason": "stop", "usage": usage}

    asked: list = []
    s = app.state
    judge = fake_judge({"q0": "correct"}, asked)
    assert grade_run(run.id, s.eval_runs, s.files, settings, sampler=sampler, judge=judge) == (
        "completed"
    )
    assert asked[0][0]["name"] == "judge"
    usage = {
        u.model_name: u.invocation_count
        for u in sdk.evals.runs.retrieve(run.id, eval_id=ev.id).per_model_usage
    }
    assert usage == {"tiny": 1, "judge": 1}


def test_a_judge_model_deleted_before_the_run_fails_it_naming_the_criterion(
    sdk, app, settings, tmp_path
):
    judge_dir = tmp_path / "models" / "gone"
    judge_dir.mkdir()
    (judge_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ev = create(sdk, {**LABEL, "model": "gone"})
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(["a0"]))
    (judge_dir / "config.json").unlink()
    judge_dir.rmdir()
    # a new run is refused at once; the queued one fails when it starts
    err = refusal(lambda: sdk.evals.runs.create(ev.id, data_source=jsonl(["a0"])))
    assert err["param"] == "testing_criteria[0].model" and err["code"] == "model_not_found"
    s = app.state
    assert grade_run(run.id, s.eval_runs, s.files, settings, judge=fake_judge({}, [])) == "failed"
    error = sdk.evals.runs.retrieve(run.id, eval_id=ev.id).error
    assert error.code == "model_not_found" and "testing_criteria[0] (verdict)" in error.message


# ---- a local reward model (and an encoder), scored in the run's own process
@pytest.fixture
def local_models(tmp_path):
    """A real one-label reward model and a tiny encoder under the model root."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    from trainers.tiny_model import build_tiny_model, build_tokenizer, tiny_config

    tok = build_tokenizer()
    config = tiny_config(tok, hidden_size=32, num_layers=1)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForSequenceClassification(config)
    rm = tmp_path / "models" / "rm"
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    build_tiny_model(tmp_path / "models" / "enc", hidden_size=32, num_layers=1)
    return rm


def test_a_reward_model_and_an_encoder_score_in_the_run(sdk, app, settings, local_models):
    from trainers.contract.graders.scoring import grade

    reward = {
        "type": "score_model",
        "name": "rm",
        "model": "rm",
        "input": [
            {"role": "user", "content": "{{item.question}}"},
            {"role": "assistant", "content": "{{sample.output_text}}"},
        ],
        "range": [0, 1],
        "pass_threshold": 0.0,
    }
    cosine = {
        "type": "text_similarity",
        "name": "same",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": "cosine",
        "embedding_model": "enc",
        "pass_threshold": 0.999,
    }
    ev = create(sdk, reward, cosine)
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(["a0", "something else"]))
    s = app.state
    assert grade_run(run.id, s.eval_runs, s.files, settings) == "completed"
    items = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    by_path = {**reward, "model": str(local_models)}
    by_path.pop("pass_threshold")
    for i, item in enumerate(items):
        rm, same = item.results
        assert not getattr(rm, "errors", None) and not getattr(same, "errors", None)
        expected = grade(by_path, {"question": f"q{i}"}, item.sample.output[0].content)
        assert rm.score == pytest.approx(expected, abs=1e-5) and rm.passed
    assert items[0].results[1].score == pytest.approx(1.0, abs=1e-5)  # the same text
    assert items[0].results[1].passed and not items[1].results[1].passed
    assert sdk.evals.runs.retrieve(run.id, eval_id=ev.id).per_model_usage == []


def test_a_checkpoint_run_grades_with_the_judge_the_eval_resolved(sdk, app, settings, tmp_path):
    """A run the worker creates for a job's checkpoint has no API request to resolve its
    judge: it takes the eval's grading, resolved when the eval was created."""
    from workers.ckptevals import create_checkpoint_run
    from workers.store import JobStatus

    s = app.state
    ev = create(sdk, LABEL)
    s.jobs.create("ftjob-j", "{}", JobStatus.running, tenant=s.evals.get(ev.id)["tenant"])
    ckpt = tmp_path / "jobs" / "ftjob-j" / "output" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    meta = {"id": "ftckpt-j", "step": 2, "path": "jobs/ftjob-j/output/checkpoint-2"}
    template = [{"role": "user", "content": "Q: {{item.question}} "}]
    spec_eval = {
        "eval_id": ev.id,
        "data_source": {
            "type": "completions",
            "source": {
                "type": "file_content",
                "content": [{"item": {"question": "q0", "answer": "a0"}}],
            },
            "input_messages": {"type": "template", "template": template},
        },
    }
    run_id = create_checkpoint_run(
        s.jobs, s.eval_runs, s.evals, s.files, tmp_path, "ftjob-j", spec_eval, meta, lambda _: None
    )
    asked: list = []
    sampler = lambda messages: {"content": "a0", "usage": {}}  # noqa: E731
    judge = fake_judge({"q0": "correct"}, asked)
    assert grade_run(run_id, s.eval_runs, s.files, settings, sampler=sampler, judge=judge) == (
        "completed"
    )
    assert asked[0][0]["path"] == str(tmp_path / "models" / "tiny")
    assert s.eval_runs.get(run_id)["passed"] == 1
