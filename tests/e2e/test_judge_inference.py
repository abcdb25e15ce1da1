"""Remote judges against posttrain's own inference: the real API (``/v1``, with a
tenant's key) in front of ``posttrain inference`` serving the tiny model is the judge
endpoint a training process asks (``trainers.contract.graders.judgeendpoints``), set up
as an operator would (README, "Judges in training jobs"): first the judge client on its
own, then a grpo job through the API and a Celery worker whose setting names the API.

The tiny model answers near-random text, so the test asserts consistency rather than
particular scores: each score is what parsing the engine's answer to the same request
(asked again here with the ``openai`` SDK, at temperature 0) gives, and every answer
that holds no number (no label) is scored 0 and counted as a parse error.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from openai import OpenAI

from service import stack as local_stack
from tests import redis_server
from tests.e2e.conftest import _free_port
from tests.e2e.test_sft_job import wait_done
from trainers.contract.graders import judgeendpoints as je
from trainers.contract.graders.judging import (
    JudgeParseError,
    judge_messages,
    judge_params,
    label_score,
    parse_label,
    parse_score,
)
from trainers.contract.graders.scoring import SCORERS
from trainers.contract.graders.spec import parse_grader

pytestmark = pytest.mark.e2e
JUDGE_DB = 7
KEY, KEY_ENV = "judge-tenant-key", "POSTTRAIN_TEST_JUDGE_KEY"
SCORE = parse_grader(
    {
        "type": "score_model",
        "name": "rating",
        "model": "tiny-model",
        "input": [
            {"role": "system", "content": "Rate the answer from 0 to 10."},
            {"role": "user", "content": "Q: {{item.q}} A: {{sample.output_text}}"},
        ],
        "range": [0, 10],
        "sampling_params": {"max_completions_tokens": 32},
    }
)
LABEL = parse_grader(
    {
        "type": "label_model",
        "name": "verdict",
        "model": "tiny-model",
        "input": [{"role": "user", "content": "{{item.q}} {{sample.output_text}} a or b?"}],
        "labels": ["a", "b", "e"],
        "passing_labels": ["a"],
        "sampling_params": {"max_completions_tokens": 8},
    }
)
ITEMS = [{"q": "What color is the sky?"}, {"q": "2+2?"}, {"q": "Name a fruit."}, {"q": "7?"}]
SAMPLES = ["blue", "4", "an apple, I think", "seven"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The API's base URL, with an inference worker serving the tiny model behind it."""
    import redis

    from trainers.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("judge")
    url = redis_server.url(JUDGE_DB)
    redis.Redis.from_url(url).flushdb()
    build_tiny_model(root / "models" / "tiny-model", seed=0)
    env = {
        **os.environ,
        "POSTTRAIN_REDIS_URL": url,
        "POSTTRAIN_DATA_DIR": str(root / "data"),
        "POSTTRAIN_MODEL_ROOTS": str(root / "models"),
        "POSTTRAIN_QUEUE": f"posttrain.judge.{root.name}",
        "POSTTRAIN_API_KEYS": KEY,
        "POSTTRAIN_INFERENCE_QUEUE": f"posttrain.infer.{root.name}",
        "POSTTRAIN_INFERENCE_CACHE_DIR": str(root / "inference-cache"),
        "POSTTRAIN_INFERENCE_DEVICE": "cpu",
        "POSTTRAIN_INFERENCE_MAX_TOKENS": "64",
        "POSTTRAIN_INFERENCE_LOAD_WAIT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    port = _free_port()
    # the operator's setting, given to the API and the worker alike: the API itself
    setting = {"own": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": KEY_ENV}}
    setting["own"]["models"] = ["tiny-model"]
    env.update({"POSTTRAIN_JUDGE_ENDPOINTS": json.dumps(setting), KEY_ENV: KEY})
    api_proc = inference = worker = None
    try:
        api_proc = local_stack.start_api(env, port, root / "api.log")
        inference = local_stack.start_inference(env, root / "inference.log", _free_port())
        worker = local_stack.start_worker(env, root / "worker.log", name="judge")
        yield f"http://127.0.0.1:{port}"
    finally:
        local_stack.stop(worker)
        local_stack.stop(inference)
        local_stack.stop(api_proc)
        redis.Redis.from_url(url).flushdb()


@pytest.fixture
def judges(api, monkeypatch):
    """posttrain's own API as the judge endpoint, as a worker would be configured."""
    monkeypatch.setenv(KEY_ENV, KEY)
    setting = {
        "own": {
            "base_url": f"{api}/v1",
            "api_key_env": KEY_ENV,
            "models": ["tiny-model"],
            "timeout_seconds": 300,
            "max_concurrency": 1,
        }
    }
    je.configure_judges(je.parse_endpoints(json.dumps(setting)))
    yield
    je.configure_judges(je.JudgeEndpoints({}))


def _answers(api: str, grader, rows=None) -> list[str]:
    """The engine's answers to the requests the judge client sends for ``rows`` ((item,
    sample) pairs; default the module's), asked with the SDK."""
    sdk = OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0, timeout=300)
    return [
        sdk.chat.completions.create(
            model=grader.model,
            messages=judge_messages(grader, item, sample),
            **judge_params(grader),
        )
        .choices[0]
        .message.content
        for item, sample in rows or zip(ITEMS, SAMPLES, strict=True)
    ]


def _expected(answers: list[str], read) -> tuple[list[float], int]:
    scores, unreadable = [], 0
    for answer in answers:
        try:
            scores.append(read(answer))
        except JudgeParseError:
            scores.append(0.0)
            unreadable += 1
    return scores, unreadable


@pytest.mark.parametrize(
    "grader,read",
    [
        (SCORE, lambda answer: parse_score(answer, SCORE.range)),
        (LABEL, lambda answer: label_score(LABEL, parse_label(answer, LABEL.labels))),
    ],
    ids=["score_model", "label_model"],
)
def test_scores_are_the_parsed_answers_of_posttrains_own_inference(api, judges, grader, read):
    notes: list = []
    scores = SCORERS[grader.type](grader, ITEMS, SAMPLES, notes)
    metrics = je.judge_metrics(grader.name)
    answers = _answers(api, grader)
    expected, unreadable = _expected(answers, read)
    assert scores == expected, answers
    # both branches are taken: the tiny model (seed 0) answers these with and without a
    # number (a label); if a change of the model ends that, pick other samples
    assert 0 < unreadable < len(SAMPLES), answers
    assert sum(isinstance(n, JudgeParseError) for n in notes) == unreadable == len(notes)
    assert metrics == {
        "judge_calls": len(SAMPLES),
        "judge_errors": 0,
        "judge_latency_s": pytest.approx(metrics["judge_latency_s"]),
        "judge_parse_errors": unreadable,
    }


def test_a_wrong_key_is_an_endpoint_failure_that_names_no_key(api, judges, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-a-tenant-key")
    with pytest.raises(je.JudgeEndpointError) as info:
        SCORERS["score_model"](SCORE, ITEMS[:1], SAMPLES[:1], [])
    assert "answered 401" in str(info.value) and "not-a-tenant-key" not in str(info.value)


JOB_JUDGE = {
    "type": "score_model",
    "name": "rating",
    "model": "tiny-model",
    "input": [{"role": "user", "content": "Rate 0-10: {{sample.output_text}}"}],
    "range": [0, 10],
    "sampling_params": {"max_completions_tokens": 16},
}


def test_a_grpo_job_is_rewarded_by_posttrains_own_inference(api):
    """The worker hands the setting to the training process (its run plan) and the key in
    its environment; the rewards the job recorded are the judge's parsed answers."""
    sdk = OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0, timeout=300)
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}]} for i in range(4)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    fid = sdk.files.create(file=("p.jsonl", data), purpose="fine-tune").id
    hp = {"num_generations": 2, "batch_size": 4, "max_completion_length": 8, "max_steps": 2}
    job = sdk.fine_tuning.jobs.create(
        model="tiny-model",
        training_file=fid,
        method={"type": "grpo", "grpo": {"graders": [JOB_JUDGE], "hyperparameters": hp}},
        extra_body={"sample_rows": 4},
    )
    job = wait_done(sdk, job.id, timeout=480)
    assert job.status == "succeeded", job.error
    stored = job.to_dict()["method"]["grpo"]["graders"][0]
    assert stored["model"] == "tiny-model"  # kept as written: the endpoint's name
    samples = httpx.get(
        f"{api}/v1/fine_tuning/jobs/{job.id}/samples",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()["data"]
    assert samples
    grader = parse_grader(JOB_JUDGE)
    for row in samples:
        (answer,) = _answers(api, grader, [({}, row["completion"])])
        expected, _ = _expected([answer], lambda a: parse_score(a, grader.range))
        assert row["rewards"]["rating"] == pytest.approx(expected[0], abs=1e-6), (row, answer)
    metrics = httpx.get(
        f"{api}/v1/fine_tuning/jobs/{job.id}/metrics",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()["data"]
    calls = [m["graders/rating/judge_calls"] for m in metrics if "graders/rating/judge_calls" in m]
    assert calls and max(calls) > 0
