"""Evals during fine-tuning, end to end: the real API, a Celery worker and ``posttrain
inference``. An SFT job on the tiny model learns ``demo_sft.jsonl`` with an eval run on
each of its checkpoints; the eval asks demo questions and checks the demo answers, so its
pass rate rises as the model learns them (the first checkpoint answers little of it)."""

from __future__ import annotations

import json
import time
from importlib import resources

import pytest
from openai import OpenAI

from service import stack as local_stack
from tests import redis_server
from tests.e2e.conftest import _free_port, start_stack
from tests.e2e.test_sft_job import wait_done, wait_for

pytestmark = pytest.mark.e2e
CKPT_EVAL_DB = 9
DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"
FAST = {"n_epochs": 5, "batch_size": 8, "learning_rate": 5e-3}
SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}


def demo_items(every: int = 7) -> list[dict]:
    """Every ``every``-th demo row as an item: its question and the mark of its answer's
    form (a greeting's "!", a sum's " = ", a statement's " is"): the tiny model learns the
    forms of the demo answers within a few epochs, not yet their facts."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]
    items = []
    for row in rows[::every]:
        messages = row["messages"]
        answer = messages[-1]["content"]
        answer = " = " if " = " in answer else "!" if answer.endswith("!") else " is"
        items.append({"item": {"question": messages[-2]["content"], "answer": answer}})
    return items


@pytest.fixture(scope="module")
def estack(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpteval")
    st = start_stack(
        root,
        redis_server.url(CKPT_EVAL_DB),
        POSTTRAIN_INFERENCE_QUEUE=f"posttrain.infer.{root.name}",
        POSTTRAIN_INFERENCE_CACHE_DIR=str(root / "inference-cache"),
        POSTTRAIN_INFERENCE_DEVICE="cpu",
        POSTTRAIN_INFERENCE_MAX_TOKENS="64",
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


def test_a_job_with_an_eval_per_checkpoint_shows_the_pass_rate_rising(estack):
    sdk = OpenAI(base_url=f"{estack.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    started = time.monotonic()
    ev = sdk.evals.create(
        name="demo-answers",
        data_source_config={
            "type": "custom",
            "item_schema": SCHEMA,
            "include_sample_schema": True,
        },
        testing_criteria=[
            {
                "type": "string_check",
                "name": "answer",
                "input": "{{ sample.output_text }}",
                "reference": "{{ item.answer }}",
                "operation": "ilike",
            }
        ],
    )
    with DEMO.open("rb") as fh:
        upload = sdk.files.create(file=("demo_sft.jsonl", fh), purpose="fine-tune")
    items = demo_items()
    job = sdk.fine_tuning.jobs.create(
        model=estack.model_dir.name,
        training_file=upload.id,
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": FAST}},
        extra_body={
            "checkpoint_every_steps": 10,
            "keep_checkpoints": 0,
            "eval": {
                "eval_id": ev.id,
                "data_source": {
                    "type": "completions",
                    "source": {"type": "file_content", "content": items},
                    "input_messages": {
                        "type": "template",
                        "template": [{"role": "user", "content": "{{item.question}}"}],
                    },
                    "sampling_params": {"temperature": 0, "max_completion_tokens": 24},
                },
            },
        },
    )
    done = wait_done(sdk, job.id, timeout=600)
    assert done.status == "succeeded", done.error
    ckpts = sorted(sdk.fine_tuning.jobs.checkpoints.list(job.id), key=lambda c: c.step_number)
    assert len(ckpts) >= 3

    def finished_runs():
        runs = list(sdk.evals.runs.list(ev.id))
        finished = [r for r in runs if r.status in ("completed", "failed", "canceled")]
        return len(runs) == len(ckpts) and len(finished) == len(runs) and runs

    runs = wait_for(finished_runs, 600, "an eval run per checkpoint, finished")
    by_step = {int(r.metadata["step"]): r for r in runs}
    assert sorted(by_step) == [c.step_number for c in ckpts]
    rates = {}
    for c in ckpts:
        run = by_step[c.step_number]
        assert run.status == "completed", run.error
        assert run.metadata["fine_tuning_job_id"] == job.id
        assert run.metadata["checkpoint_id"] == run.model == c.id
        assert run.name == f"{job.id} step {c.step_number}"
        counts = run.result_counts
        assert counts.total == len(items) and counts.errored == 0
        rates[c.step_number] = counts.passed / counts.total
    first, last = ckpts[0].step_number, ckpts[-1].step_number
    for step in (first, last):
        outputs = sdk.evals.runs.output_items.list(by_step[step].id, eval_id=ev.id)
        print(step, [o.sample.output[0].content for o in outputs])
    print(f"eval pass rate by step: {rates} ({time.monotonic() - started:.0f}s)")
    assert rates[last] > rates[first], rates

    # the job shows them: each checkpoint's metrics and one event per run
    def reported():
        listed = list(sdk.fine_tuning.jobs.checkpoints.list(job.id))
        metrics = {c.step_number: getattr(c.metrics, "eval_pass_rate", None) for c in listed}
        return all(v is not None for v in metrics.values()) and metrics

    metrics = wait_for(reported, 60, "the pass rates on the checkpoints")
    assert metrics == pytest.approx(rates)
    events = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)]
    for step, rate in rates.items():
        passed = round(rate * len(items))
        assert f"Eval demo-answers: {passed}/{len(items)} passed at step {step}" in events
