"""A user's whole journey with the official ``openai`` SDK against the real API and worker.

Upload the demo data, create an SFT job on the tiny model, poll it to success,
read its events and checkpoints, download the final checkpoint, load it with
transformers and check that the model learned the data; then cancel a second
job while it runs and check its training process is gone.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.e2e
DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"
FAST = {"n_epochs": 5, "batch_size": 8, "learning_rate": 5e-3}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def training_file(sdk):
    with DEMO.open("rb") as fh:
        return sdk.files.create(file=("demo_sft.jsonl", fh), purpose="fine-tune")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_long_job(stack, sdk, training_file):
    """A job long enough (20,000 steps) to be cancelled or paused while it trains."""
    hp = {**FAST, "max_steps": 20_000}
    return sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=training_file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
    )


def wait_for_steps(sdk, job_id: str) -> None:
    """Until the job has reported a training step (its trainer is past start-up)."""
    wait_for(
        lambda: any(e.type == "metrics" for e in sdk.fine_tuning.jobs.list_events(job_id, limit=5)),
        120,
        "training steps",
    )


def wait_done(sdk, job_id: str, timeout: float = 240):
    """Poll a job until it reaches an end state; return the job object."""
    ends = ("succeeded", "failed", "cancelled")
    return wait_for(
        lambda: (j := sdk.fine_tuning.jobs.retrieve(job_id)).status in ends and j,
        timeout,
        f"job {job_id} to end",
    )


def assistant_loss(model_dir, rows, adapter: Path | None = None) -> float:
    """Mean loss over assistant tokens of ``rows``, the quantity SFT minimises; with
    ``adapter`` (the base model's directory), ``model_dir`` is a LoRA adapter on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter)
        model = PeftModel.from_pretrained(base, model_dir).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            enc = tok.apply_chat_template(
                row["messages"],
                return_dict=True,
                return_tensors="pt",
                return_assistant_tokens_mask=True,
            )
            labels = enc["input_ids"].clone()
            labels[torch.as_tensor(enc["assistant_masks"]).view_as(labels) == 0] = -100
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=enc["input_ids"], labels=labels).loss
            total += float(loss) * n
            count += n
    return total / count


def test_sft_job_end_to_end_learns_the_data(stack, sdk, training_file, tmp_path):
    import json

    t0 = time.monotonic()
    assert training_file.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=training_file.id,
        suffix="e2e",
        seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": FAST}},
    )
    # a warm worker may already have claimed it by the time the response is built
    assert job.status in ("queued", "running") and job.method.type == "supervised"

    job = wait_done(sdk, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{stack.model_dir.name}:e2e:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at >= job.created_at

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    metric_events = [e for e in events if e.type == "metrics"]
    assert len(metric_events) >= 10 and all("train_runtime" not in e.data for e in metric_events)
    assert {"step", "total_steps", "loss", "learning_rate"} <= metric_events[0].data.keys()

    ckpts = list(sdk.fine_tuning.jobs.checkpoints.list(job.id))
    total_steps = metric_events[0].data["total_steps"]
    assert [c.step_number for c in ckpts] == sorted(
        {*range(10, total_steps, 10), total_steps}, reverse=True
    )
    final = ckpts[0]
    assert final.metrics.train_loss is not None
    assert final.fine_tuned_model_checkpoint.endswith(f"ckpt-step-{total_steps}")

    url = f"{stack.base_url}/v1/fine_tuning/jobs/{job.id}/checkpoints/{final.id}/content"
    blob = httpx.get(url, timeout=60).content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert not any(n.endswith("optimizer.pt") for n in names)
    ckpt_dir = tmp_path / f"{job.id}-step-{total_steps}"
    assert (ckpt_dir / "model.safetensors").exists() and (ckpt_dir / "tokenizer.json").exists()

    rows = [json.loads(x) for x in DEMO.read_text().splitlines() if x.strip()]
    before, after = assistant_loss(stack.model_dir, rows), assistant_loss(ckpt_dir, rows)
    print(
        f"\nSFT e2e: loss {before:.3f} -> {after:.3f} ({1 - after / before:.0%} lower), "
        f"{time.monotonic() - t0:.1f} s"
    )
    assert after <= 0.7 * before


def download(stack, job_id: str, ckpt_id: str, dest) -> list[str]:
    url = f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt_id}/content"
    blob = httpx.get(url, timeout=60).content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
        return tar.getnames()


def test_lora_job_trains_an_adapter_through_the_sdk(stack, sdk, training_file, tmp_path):
    """The job names its model by the model root's directory name; the downloaded adapter
    names its base the same way (not the server's path), and loads on any machine where
    that name is the base (here: passed to peft explicitly)."""
    import json

    job = sdk.fine_tuning.jobs.create(
        model=stack.model_dir.name,
        training_file=training_file.id,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 8, "batch_size": 8, "learning_rate": 1e-2}
            },
        },
        extra_body={"training_type": "lora", "lora": {"r": 8, "alpha": 16}},
    )
    job = wait_done(sdk, job.id)
    assert job.status == "succeeded", job.error
    final = next(iter(sdk.fine_tuning.jobs.checkpoints.list(job.id)))
    names = download(stack, job.id, final.id, tmp_path)
    assert any(n.endswith("adapter_model.safetensors") for n in names)
    assert not any(n.endswith("/model.safetensors") for n in names)  # the adapter only
    ckpt_dir = tmp_path / names[0].split("/")[0]
    adapter = json.loads((ckpt_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == stack.model_dir.name == job.model
    rows = [json.loads(x) for x in DEMO.read_text().splitlines() if x.strip()]
    before = assistant_loss(stack.model_dir, rows)
    after = assistant_loss(ckpt_dir, rows, adapter=stack.model_dir)
    print(f"\nLoRA e2e: loss {before:.3f} -> {after:.3f} ({1 - after / before:.0%} lower)")
    assert after <= 0.7 * before


def test_running_job_is_cancelled_and_its_process_freed(stack, sdk, training_file):
    job = start_long_job(stack, sdk, training_file)
    wait_for_steps(sdk, job.id)
    pid = int(stack.redis.hget(f"posttrain:job:{job.id}", "pid"))
    assert os.path.exists(f"/proc/{pid}")

    t0 = time.monotonic()
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the training process to exit")
    wait_for(
        lambda: any(
            "stopped after cancellation" in e.message
            for e in sdk.fine_tuning.jobs.list_events(job.id, limit=5)
        ),
        10,
        "the worker to confirm the stop",
    )
    stopped_in = time.monotonic() - t0
    assert stopped_in < 10
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_queued_job_cancelled_before_it_starts_never_runs(stack, sdk, training_file):
    # The worker runs one job at a time: occupy it, queue a second, cancel the second.
    busy = start_long_job(stack, sdk, training_file)
    queued = sdk.fine_tuning.jobs.create(model=str(stack.model_dir), training_file=training_file.id)
    assert sdk.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    wait_for(lambda: sdk.fine_tuning.jobs.retrieve(busy.id).status == "running", 60, "busy job")
    sdk.fine_tuning.jobs.cancel(busy.id)
    # once the worker is free it receives the cancelled job's message and must skip it
    wait_for(
        lambda: "skipped:cancelled" in (stack.logs / "e2e.log").read_text(),
        30,
        "the worker to drop the cancelled job",
    )
    job = sdk.fine_tuning.jobs.retrieve(queued.id)
    assert job.status == "cancelled"
    assert stack.redis.hget(f"posttrain:job:{queued.id}", "started_at") is None


def test_unloadable_model_fails_with_a_reason(stack, sdk, training_file):
    # A path outside the model roots is refused at creation, before any worker tries it.
    with pytest.raises(openai.BadRequestError, match="model not found or not allowed"):
        sdk.fine_tuning.jobs.create(model="/nonexistent/model", training_file=training_file.id)
    # One under a root whose config passes the creation check but whose weights are garbage
    # fails in the worker, naming the model.
    broken = stack.model_dir.parent / "broken-model"
    shutil.copytree(stack.model_dir, broken, dirs_exist_ok=True)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    job = sdk.fine_tuning.jobs.create(model=str(broken), training_file=training_file.id)
    job = wait_done(sdk, job.id, timeout=120)
    assert job.status == "failed"
    assert job.error.code == "model_load_failed" and "broken-model" in job.error.message


def test_pause_saves_a_checkpoint_and_resume_continues_from_it(stack, sdk, training_file):
    job = start_long_job(stack, sdk, training_file)
    wait_for_steps(sdk, job.id)
    pid = int(stack.redis.hget(f"posttrain:job:{job.id}", "pid"))
    assert sdk.fine_tuning.jobs.pause(job.id).status == "pausing"
    wait_for(lambda: sdk.fine_tuning.jobs.retrieve(job.id).status == "paused", 30, "the pause")
    assert not os.path.exists(f"/proc/{pid}")  # a paused job holds no process (or GPU)
    newest = next(iter(sdk.fine_tuning.jobs.checkpoints.list(job.id)))  # saved by the pause
    paused_at = newest.step_number
    assert 0 < paused_at < 35 * 100
    with pytest.raises(Exception, match="cannot be paused"):
        sdk.fine_tuning.jobs.pause(job.id)

    assert sdk.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_for(
        lambda: any(
            e.message == f"Resumed from checkpoint at step {paused_at}"
            for e in sdk.fine_tuning.jobs.list_events(job.id, limit=20)
        ),
        60,
        "the resumed run",
    )
    sdk.fine_tuning.jobs.cancel(job.id)
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert f"Job paused at step {paused_at} with a resumable checkpoint" in messages
