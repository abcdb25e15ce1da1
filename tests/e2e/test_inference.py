"""Chat with what was trained: the real API, a Celery worker and ``posttrain inference``
running ``transformers serve``, driven by the official ``openai`` SDK.

Two tenants (two keys). Tenant A fine-tunes the tiny model twice (full and LoRA); its
models answer through the API exactly as ``transformers`` ``generate`` answers on the
same checkpoint, token for token; tenant B cannot reach them; a killed engine comes back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from service import stack as local_stack
from tests import redis_server
from tests.e2e.conftest import _free_port, start_stack
from tests.e2e.test_sft_job import wait_done, wait_for

pytestmark = pytest.mark.e2e
INFER_DB = 10
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"
FAST = {"n_epochs": 5, "batch_size": 8, "learning_rate": 5e-3}
QUESTION = [{"role": "user", "content": "What color is the sky?"}]


@pytest.fixture(scope="module")
def istack(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    st = start_stack(
        root,
        redis_server.url(INFER_DB),
        POSTTRAIN_API_KEYS=f"{KEY_A},{KEY_B}",
        POSTTRAIN_INFERENCE_QUEUE=f"posttrain.infer.{root.name}",
        POSTTRAIN_INFERENCE_CACHE_DIR=str(root / "inference-cache"),
        POSTTRAIN_INFERENCE_DEVICE="cpu",
        POSTTRAIN_INFERENCE_MAX_TOKENS="256",
        POSTTRAIN_INFERENCE_LOAD_WAIT_SECONDS="120",
        OMP_NUM_THREADS="1",
    )
    st.inference = None
    try:
        st.inference = local_stack.start_inference(st.env, root / "inference.log", _free_port())
        yield st
    finally:
        local_stack.stop(st.inference)
        st.stop()


@pytest.fixture(scope="module")
def sdk_a(istack):
    return OpenAI(base_url=f"{istack.base_url}/v1", api_key=KEY_A, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def sdk_b(istack):
    return OpenAI(base_url=f"{istack.base_url}/v1", api_key=KEY_B, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def trained(istack, sdk_a):
    """Tenant A's two fine-tunes of the tiny model: full and LoRA (run one after another)."""
    with DEMO.open("rb") as fh:
        upload = sdk_a.files.create(file=("demo_sft.jsonl", fh), purpose="fine-tune")
    jobs = {}
    for kind in ("full", "lora"):
        extra = {"training_type": "lora"} if kind == "lora" else {}
        hp = FAST if kind == "full" else {**FAST, "learning_rate": 2e-2}
        jobs[kind] = sdk_a.fine_tuning.jobs.create(
            model=istack.model_dir.name,
            training_file=upload.id,
            suffix=kind,
            seed=3,
            method={"type": "supervised", "supervised": {"hyperparameters": hp}},
            extra_body=extra,
        )
    done = {kind: wait_done(sdk_a, job.id, timeout=600) for kind, job in jobs.items()}
    for job in done.values():
        assert job.status == "succeeded", job.error
    return done


def final_checkpoint(istack, job_id: str) -> Path:
    dirs = list((istack.data_dir / "jobs" / job_id / "output").glob("checkpoint-*"))
    return max(dirs, key=lambda d: int(d.name.split("-")[-1]))


def generate(model_dir: Path, messages, max_new_tokens: int, base: Path | None = None):
    """Greedy ``generate`` on a checkpoint (an adapter on ``base`` when given): the text
    and the number of tokens it produced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[-1] :]
    return tok.decode(new, skip_special_tokens=True), len(new)


def chat(sdk, model: str, **kw):
    params = {"messages": QUESTION, "temperature": 0, "max_tokens": 24, **kw}
    return sdk.chat.completions.create(model=model, **params)


def test_a_fine_tuned_model_answers_token_for_token_like_generate(istack, sdk_a, trained):
    job = trained["full"]
    answer = chat(sdk_a, job.fine_tuned_model)
    text, n_tokens = generate(final_checkpoint(istack, job.id), QUESTION, 24)
    assert answer.model == job.fine_tuned_model
    assert answer.choices[0].message.content == text
    assert answer.usage.completion_tokens == n_tokens
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + n_tokens
    # it learned the demo data: the reply has the trained answer's form
    assert text.startswith("The sky is")

    # streamed through the SDK: the same text, usage in a last chunk with no choices
    chunks = list(
        chat(sdk_a, job.fine_tuned_model, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens
    assert all(c.model == job.fine_tuned_model for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    # without include_usage no chunk carries usage
    plain = list(chat(sdk_a, job.fine_tuned_model, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_the_cli_chats_with_the_fine_tuned_model(istack, sdk_a, trained):
    """``posttrain chat``: each stdin line a user turn, the streamed answer printed; the
    conversation carries over (the second request holds the first turn and answer)."""
    model = trained["full"].fine_tuned_model
    first = chat(sdk_a, model).choices[0].message.content
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTTRAIN_", "OPENAI_"))}
    env.update(POSTTRAIN_BASE_URL=istack.base_url, POSTTRAIN_API_KEY=KEY_A)
    args = ["chat", model, "--temperature", "0", "--max-tokens", "24"]
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        input=QUESTION[0]["content"] + "\nAnd the grass?\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(first + "\n"), proc.stdout
    turn = [*QUESTION, {"role": "assistant", "content": first}]
    turn.append({"role": "user", "content": "And the grass?"})
    second = (
        sdk_a.chat.completions.create(model=model, messages=turn, temperature=0, max_tokens=24)
        .choices[0]
        .message.content
    )
    assert proc.stdout == f"{first}\n{second}\n"
    # a model the tenant cannot use: the API's 404, exit code 1
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "chat", "ft:nope", "-m", "hi"],
        env={**env, "POSTTRAIN_API_KEY": KEY_B},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr and "ft:nope" in proc.stderr


def test_raw_answers_match_the_sdk_types_and_the_stream_ends_with_done(istack, trained):
    """The bodies themselves, validated against the SDK's types (generated from OpenAI's
    OpenAPI document): required fields present and typed, not only parseable."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    model = trained["full"].fine_tuned_model
    url, headers = istack.base_url + "/v1", {"Authorization": f"Bearer {KEY_A}"}
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    answer = httpx.post(url + "/chat/completions", json=body, headers=headers, timeout=120)
    ChatCompletion.model_validate(answer.json(), strict=False)
    assert answer.json()["object"] == "chat.completion" and answer.json()["usage"]
    text = httpx.post(
        url + "/completions",
        json={"model": model, "prompt": "The sky", "max_tokens": 4},
        headers=headers,
        timeout=120,
    ).json()
    Completion.model_validate(text)
    assert text["object"] == "text_completion" and text["usage"]["completion_tokens"] >= 1
    with httpx.stream(
        "POST",
        url + "/chat/completions",
        json={**body, "stream": True},
        headers=headers,
        timeout=120,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        chunk = ChatCompletionChunk.model_validate(json.loads(event[6:]))
        assert chunk.object == "chat.completion.chunk" and chunk.model == model


def test_a_lora_fine_tune_is_served_through_its_adapter(istack, sdk_a, trained):
    job = trained["lora"]
    ckpt = final_checkpoint(istack, job.id)
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").exists()
    answer = chat(sdk_a, job.fine_tuned_model)
    text, n_tokens = generate(ckpt, QUESTION, 24, base=istack.model_dir)
    assert answer.choices[0].message.content == text
    assert answer.usage.completion_tokens == n_tokens
    base_answer = chat(sdk_a, istack.model_dir.name)
    base_text, _ = generate(istack.model_dir, QUESTION, 24)
    assert base_answer.choices[0].message.content == base_text
    assert base_text != text  # the adapter is what answered


def test_completions_n_stop_and_seed(istack, sdk_a, trained):
    model = trained["full"].fine_tuned_model
    two = sdk_a.completions.create(
        model=model,
        prompt=["<|user|>Hi<|end|><|assistant|>", "x"],
        max_tokens=5,
        temperature=0,
        n=2,
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text  # greedy: both choices agree
    full = chat(sdk_a, model).choices[0].message.content
    cut = chat(sdk_a, model, stop=["sky", "zzz"]).choices[0]
    assert cut.message.content == full[: full.index("sky")] and cut.finish_reason == "stop"
    sampled = [
        chat(sdk_a, model, temperature=1.5, seed=7).choices[0].message.content for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # one seed, one answer


def test_bad_requests_name_the_problem(istack, sdk_a, trained):
    model = trained["full"].fine_tuned_model
    cases = [
        (dict(n=99), 400, "n"),
        (dict(max_tokens=10**6), 400, "max_tokens"),
        (dict(logprobs=True), 400, "logprobs"),
        (dict(presence_penalty=0.5), 400, "presence_penalty"),
        (dict(response_format={"type": "json_object"}), 400, "response_format"),
        (dict(extra_body={"frobnicate": 1}), 400, "frobnicate"),
    ]
    for kw, status, param in cases:
        with pytest.raises(openai.APIStatusError) as err:
            chat(sdk_a, model, **kw)
        assert err.value.status_code == status, kw
        assert param in err.value.message, (kw, err.value.message)
    # a prompt longer than the model's context (1,024 tokens): 400 naming the limit
    long = [{"role": "user", "content": "sky " * 3000}]
    with pytest.raises(openai.BadRequestError) as err:
        sdk_a.chat.completions.create(model=model, messages=long, max_tokens=4)
    assert "1024" in err.value.message and err.value.code == "context_length_exceeded"


def test_another_tenants_model_is_a_404_like_an_unknown_one(istack, sdk_a, sdk_b, trained):
    job = trained["full"]
    ckpts = list(sdk_a.fine_tuning.jobs.checkpoints.list(job.id))
    for name in (job.fine_tuned_model, ckpts[0].id, ckpts[0].fine_tuned_model_checkpoint):
        with pytest.raises(openai.NotFoundError) as theirs:
            chat(sdk_b, name)
        unknown = name[:-3] + "zzz"
        with pytest.raises(openai.NotFoundError) as missing:
            chat(sdk_a, unknown)
        assert theirs.value.body["code"] == missing.value.body["code"] == "model_not_found"
        assert theirs.value.message.replace(name, "?") == missing.value.message.replace(
            unknown, "?"
        )
    # and its own checkpoints, by id and by name, answer for tenant A
    for name in (ckpts[0].id, ckpts[0].fine_tuned_model_checkpoint):
        assert chat(sdk_a, name).model == name


def test_an_eval_run_is_judged_through_the_inference_worker(istack, sdk_a, sdk_b, trained):
    """label_model and a generative score_model, graded by the Celery worker asking the
    inference worker: each judge gets its rendered prompt and its usage is counted. The
    fine-tuned judge answers the demo question as chat completions do ("The sky is ..."),
    which names the label 'sky'; the random base model's answer names no label, a fail
    that quotes it."""
    base, tuned = istack.model_dir.name, trained["full"].fine_tuned_model
    schema = {"type": "object", "properties": {"question": {"type": "string"}}}
    source = {"type": "custom", "item_schema": schema, "include_sample_schema": True}
    criteria = [
        {
            "type": "label_model",
            "name": "sky",
            "model": tuned,
            "input": [{"role": "user", "content": "{{item.question}}"}],
            "labels": ["sky", "xylophone"],
            "passing_labels": ["sky"],
            "sampling_params": {"max_completions_tokens": 24},
        },
        {
            "type": "label_model",
            "name": "gibberish",
            "model": base,
            "input": [{"role": "user", "content": "Right? {{sample.output_text}}"}],
            "labels": ["zyzzyva", "quixotry"],
            "passing_labels": ["zyzzyva"],
            "sampling_params": {"max_completions_tokens": 8},
        },
        {
            "type": "score_model",
            "name": "rating",
            "model": base,
            "input": [{"role": "user", "content": "Rate 0-10: {{sample.output_text}}"}],
            "range": [0, 10],
            "pass_threshold": 5,
            "sampling_params": {"max_completions_tokens": 8},
        },
    ]
    # tenant B may not judge with A's model: the answer an unknown model gets
    for name in (tuned, tuned[:-3] + "zzz"):
        with pytest.raises(openai.BadRequestError) as err:
            sdk_b.evals.create(
                data_source_config=source, testing_criteria=[{**criteria[0], "model": name}]
            )
        assert err.value.body["param"] == "testing_criteria[0].model"
        assert err.value.body["code"] == "model_not_found"
    ev = sdk_a.evals.create(name="judged", data_source_config=source, testing_criteria=criteria)
    questions = [QUESTION[0]["content"], "What is 2 + 2?"]
    run = sdk_a.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": base,
            "source": {
                "type": "file_content",
                "content": [{"item": {"question": q}} for q in questions],
            },
            "input_messages": {
                "type": "template",
                "template": [{"role": "user", "content": "{{item.question}}"}],
            },
            "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
        },
    )
    done = wait_for(
        lambda: (
            (r := sdk_a.evals.runs.retrieve(run.id, eval_id=ev.id)).status
            in ("completed", "failed")
            and r
        ),
        180,
        "the judged eval run to finish",
    )
    assert done.status == "completed", done.error
    assert done.result_counts.total == 2 and done.result_counts.errored == 0
    items = sorted(
        sdk_a.evals.runs.output_items.list(run.id, eval_id=ev.id),
        key=lambda i: i.datasource_item_id,
    )
    sky, gibberish, rating = items[0].results
    # the fine-tuned judge was sent the question as written and answered as chat does
    asked = [{"role": "user", "content": questions[0]}]
    assert sky.sample["input"] == asked and sky.sample["model"] == tuned
    said = chat(sdk_a, tuned).choices[0].message.content
    assert sky.sample["output"] == [{"role": "assistant", "content": said}]
    assert sky.label == "sky" and sky.score == 1.0 and sky.passed
    calls = {tuned: 0, base: 2}  # the run's own samples are the base model's
    for item in items:
        sampled = item.sample.output[0].content
        for result in item.results:
            judged = result.sample
            assert judged["usage"]["completion_tokens"] > 0 and judged["temperature"] == 0.0
            calls[judged["model"]] += 1
        _, gibberish, rating = item.results
        assert gibberish.sample["input"] == [{"role": "user", "content": f"Right? {sampled}"}]
        answer = gibberish.sample["output"][0]["content"]
        assert not gibberish.passed and gibberish.label is None
        quoted = answer.strip()[:200] + ("..." if len(answer.strip()) > 200 else "")
        assert gibberish.errors == {  # quoted, cut at 200 characters
            "model_grader_parse_error": "the judge's answer names none of the labels "
            f"('zyzzyva', 'quixotry'): {quoted!r}"
        }
        assert rating.sample["input"] == [{"role": "user", "content": f"Rate 0-10: {sampled}"}]
        assert 0 <= rating.score <= 10
        assert not getattr(rating, "errors", None) or set(rating.errors) == {
            "model_grader_parse_error"
        }
    usage = {u.model_name: u for u in done.per_model_usage}
    assert {name: u.invocation_count for name, u in usage.items()} == calls == {tuned: 2, base: 6}
    assert usage[tuned].prompt_tokens == sum(
        i.results[0].sample["usage"]["prompt_tokens"] for i in items
    )
    assert done.per_testing_criteria_results[1].failed == 2


def test_a_checkpoint_of_a_running_job_can_be_asked(istack, sdk_a, trained):
    upload_id = trained["full"].training_file
    job = sdk_a.fine_tuning.jobs.create(
        model=istack.model_dir.name,
        training_file=upload_id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {**FAST, "max_steps": 20_000}},
        },
    )
    try:
        ckpt = wait_for(
            lambda: list(sdk_a.fine_tuning.jobs.checkpoints.list(job.id)), 300, "a first checkpoint"
        )[0]
        answer = chat(sdk_a, ckpt.id)
        assert answer.model == ckpt.id and answer.usage.completion_tokens > 0
        assert sdk_a.fine_tuning.jobs.retrieve(job.id).status == "running"
    finally:
        sdk_a.fine_tuning.jobs.cancel(job.id)
        wait_done(sdk_a, job.id)


def test_a_model_that_cannot_load_is_an_error_naming_it(istack, sdk_a):
    broken = istack.model_dir.parent / "broken-model"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text((istack.model_dir / "config.json").read_text())
    with pytest.raises(openai.InternalServerError) as err:
        chat(sdk_a, "broken-model")
    assert err.value.body["code"] == "model_load_failed" and "broken-model" in err.value.message
    assert chat(sdk_a, istack.model_dir.name).choices  # the engine is still fine


def test_a_killed_engine_is_restarted_and_the_next_request_succeeds(istack, sdk_a, trained):
    model = trained["full"].fine_tuned_model
    key = f"posttrain:inference:{istack.env['POSTTRAIN_INFERENCE_QUEUE']}"

    def entry() -> dict:
        (raw,) = istack.redis.hgetall(key).values()
        return json.loads(raw)

    base = istack.model_dir.name  # random weights: it rarely ends a reply early
    chat(sdk_a, base)  # loaded and warm
    (pid,) = entry()["engine_pids"]
    # killed mid-stream: the stream ends in an OpenAI error, not a hang or a silent cut
    stream = chat(sdk_a, base, max_tokens=256, stream=True)
    with pytest.raises(openai.APIError):
        for i, _chunk in enumerate(stream):
            if i == 1:
                os.kill(pid, signal.SIGKILL)
    # the worker restarts its engine; a request answers 503 + Retry-After until it is back
    refusals = []

    def answered():
        try:
            return chat(sdk_a, model)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.response.headers.get("retry-after")
            refusals.append(exc.body["code"])
            time.sleep(1)
            return None

    answer = wait_for(answered, 240, "an answer after the engine was killed")
    assert answer.choices[0].message.content
    assert entry()["engine_pids"] and entry()["engine_pids"][0] != pid
    assert set(refusals) <= {"engine_error", "engine_unavailable", "model_loading"}


def test_a_deleted_model_is_not_served(istack, sdk_a, trained):
    job = trained["lora"]
    assert chat(sdk_a, job.fine_tuned_model).choices
    sdk_a.models.delete(job.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        chat(sdk_a, job.fine_tuned_model)


def test_no_inference_worker_is_a_503_with_retry_after(istack, sdk_a, trained):
    local_stack.stop(istack.inference)
    istack.inference = None
    with pytest.raises(openai.APIStatusError) as err:
        chat(sdk_a, trained["full"].fine_tuned_model)
    assert err.value.status_code == 503 and err.value.body["code"] == "no_inference_worker"
    assert err.value.response.headers["retry-after"]
