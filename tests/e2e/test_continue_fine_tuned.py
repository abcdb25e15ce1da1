"""Continuing from one's own fine-tuned model, through the real API and worker.

The second job names the first one's ``ft:...`` model; the API resolves it to
the first job's final checkpoint (service/modelaccess.py), the worker trains
from there, and the second run starts where the first one ended: its first
loss is far below the first run's first loss.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.test_sft_job import DEMO, FAST, wait_done

pytestmark = pytest.mark.e2e


def first_loss(c: httpx.Client, job_id: str) -> float:
    rows = c.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    return next(r["loss"] for r in rows if "loss" in r)


def test_a_job_continues_from_the_callers_fine_tuned_model(stack):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    with DEMO.open("rb") as fh:
        fid = sdk.files.create(file=("demo_sft.jsonl", fh), purpose="fine-tune").id
    method = {"type": "supervised", "supervised": {"hyperparameters": FAST}}
    first = sdk.fine_tuning.jobs.create(model="tiny-model", training_file=fid, method=method)
    first = wait_done(sdk, first.id)
    assert first.status == "succeeded", first.error
    one_epoch = {"type": "supervised", "supervised": {"hyperparameters": {**FAST, "n_epochs": 1}}}
    second = sdk.fine_tuning.jobs.create(
        model=first.fine_tuned_model, training_file=fid, method=one_epoch
    )
    assert second.model == first.fine_tuned_model
    second = wait_done(sdk, second.id)
    assert second.status == "succeeded", second.error
    # the worker loaded the first job's final checkpoint
    final = sdk.fine_tuning.jobs.checkpoints.list(first.id).data[0]
    plan = json.loads((stack.data_dir / "jobs" / second.id / "plan-1.json").read_text())
    ckpt_dir = stack.data_dir / "jobs" / first.id / "output" / f"checkpoint-{final.step_number}"
    assert plan["spec"]["model"] == str(ckpt_dir.resolve())
    assert second.fine_tuned_model.startswith("ft:tiny-model:")
    with httpx.Client(base_url=stack.base_url) as c:
        start, resumed = first_loss(c, first.id), first_loss(c, second.id)
    assert resumed < 0.7 * start, (start, resumed)
