"""``/metrics`` against the real API and worker: the worker's fleet entry and a running
job's step, tokens and rates, scraped while it trains (the parse is prometheus_client's)."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_sft_job import start_long_job, wait_done, wait_for, wait_for_steps

pytestmark = pytest.mark.e2e


def scrape(stack) -> dict[str, list]:
    text = httpx.get(f"{stack.base_url}/metrics", timeout=30).raise_for_status().text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def of(samples: dict, name: str, **labels) -> list[float]:
    return [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]


def test_a_running_job_and_the_worker_are_scraped(stack):
    sdk = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    with open(stack.data_dir.parent / "prom.jsonl", "w") as fh:
        fh.write(
            '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "hello there"}]}\n' * 16
        )
    with open(stack.data_dir.parent / "prom.jsonl", "rb") as fh:
        upload = sdk.files.create(file=("prom.jsonl", fh), purpose="fine-tune")
    job = start_long_job(stack, sdk, upload)
    try:
        wait_for_steps(sdk, job.id)
        queue = stack.env["POSTTRAIN_QUEUE"]
        first = scrape(stack)
        assert of(first, "posttrain_workers", queue=queue) == [1]
        assert of(first, "posttrain_jobs", status="running", queue=queue) == [1]
        assert of(first, "posttrain_job_step", job=job.id)[0] >= 1
        assert of(first, "posttrain_job_total_steps", job=job.id) == [20_000]

        def rates():
            m = scrape(stack)
            steps = of(m, "posttrain_job_steps_per_second", job=job.id)
            tokens = of(m, "posttrain_job_tokens_per_second", job=job.id)
            return steps and steps[0] > 0 and tokens and tokens[0] > 0 and (steps[0], tokens[0])

        steps_s, tokens_s = wait_for(rates, 60, "the running job's rates between two scrapes")
        assert tokens_s > steps_s  # every step trains on more than one token
        trained = of(scrape(stack), "posttrain_job_trained_tokens", job=job.id)[0]
        assert trained > 0
    finally:
        sdk.fine_tuning.jobs.cancel(job.id)
    assert wait_done(sdk, job.id).status == "cancelled"
    after = scrape(stack)
    assert of(after, "posttrain_job_step", job=job.id) == []  # only running jobs
    route = "/v1/fine_tuning/jobs/{job_id}"
    assert sum(of(after, "posttrain_http_requests_total", route=route, status="200")) >= 1
