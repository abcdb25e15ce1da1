"""DPO through the official ``openai`` SDK against the real API and worker.

Upload ``demo_dpo.jsonl`` (OpenAI's preference rows: a well-formed answer is
preferred over a refusal or a sloppy lower-case copy), train the tiny model with
DPO, download the final checkpoint and score pairs the job never saw
(``demo_dpo_heldout.jsonl``: new names, countries, fruits and sums). On those,
the base model prefers the chosen answer about as often as a coin; the trained
one must prefer it clearly more often, by a clearly larger log-prob margin.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from importlib import resources

import httpx
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.e2e
ASSETS = resources.files("trainers") / "assets"
TRAIN, HELDOUT, CHAT = "demo_dpo.jsonl", "demo_dpo_heldout.jsonl", "demo_sft.jsonl"
# The tiny random model needs a large learning rate to move; 8 epochs of 60 pairs = 64 steps.
HP = {"n_epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "beta": 0.1}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def wait_done(sdk, job_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def upload(sdk, name: str):
    with (ASSETS / name).open("rb") as fh:
        return sdk.files.create(file=(name, fh), purpose="fine-tune")


def answer_logp(model, tok, prompt: list[dict], answer: list[dict]) -> float:
    """log π(answer | prompt), summed over the answer's tokens (as DPO scores it)."""
    import torch

    p = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)
    full = tok.apply_chat_template(prompt + answer, return_dict=True)["input_ids"]
    start = len(p["input_ids"])
    assert full[:start] == p["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(logp.gather(-1, ids[0, 1:, None])[start - 1 :].sum())


def preference(model_dir, rows) -> tuple[float, float]:
    """(fraction of pairs with logp(chosen) > logp(rejected), mean margin) under a model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    margins = []
    for r in rows:
        prompt = r["input"]["messages"]
        margins.append(
            answer_logp(model, tok, prompt, r["preferred_output"])
            - answer_logp(model, tok, prompt, r["non_preferred_output"])
        )
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def download_final(stack, sdk, job_id: str, dest):
    final = next(iter(sdk.fine_tuning.jobs.checkpoints.list(job_id)))
    url = f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/checkpoints/{final.id}/content"
    blob = httpx.get(url, timeout=60).content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    return final, dest / names[0].split("/")[0]


def test_dpo_job_learns_held_out_preferences(stack, sdk, tmp_path):
    t0 = time.monotonic()
    training_file = upload(sdk, TRAIN)
    assert training_file.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=training_file.id,
        seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": HP}},
    )
    assert job.status in ("queued", "running") and job.method.type == "dpo"
    job = wait_done(sdk, job.id, timeout=180)
    wall = time.monotonic() - t0
    assert job.status == "succeeded", job.error
    assert job.trained_tokens and job.trained_tokens > 0

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=200))
    metric_events = [e for e in events if e.type == "metrics"]
    assert len(metric_events) >= 10, [e.message for e in events]
    newest = metric_events[0].data
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= newest.keys()
    assert newest["step"] == newest["total_steps"] == 64
    assert newest["rewards/accuracies"] >= 0.9 and newest["rewards/margins"] > 0

    final, ckpt_dir = download_final(stack, sdk, job.id, tmp_path)
    assert final.step_number == 64 and final.metrics.train_loss is not None
    assert (ckpt_dir / "model.safetensors").exists()

    rows = [json.loads(x) for x in (ASSETS / HELDOUT).read_text().splitlines() if x.strip()]
    train = {json.dumps(json.loads(x)["input"]) for x in (ASSETS / TRAIN).read_text().splitlines()}
    assert not any(json.dumps(r["input"]) in train for r in rows)  # really held out
    acc0, margin0 = preference(stack.model_dir, rows)
    acc1, margin1 = preference(ckpt_dir, rows)
    print(
        f"\nDPO e2e on {len(rows)} held-out pairs: accuracy {acc0:.2f} -> {acc1:.2f}, "
        f"mean log-prob margin {margin0:.1f} -> {margin1:.1f} nats; job {wall:.1f} s "
        f"through the API, {job.trained_tokens} trained tokens"
    )
    assert acc1 >= 0.85 and acc1 >= acc0 + 0.3
    assert margin1 > margin0 + 10.0


def test_dpo_job_on_a_chat_file_is_refused_at_creation(stack, sdk):
    chat = upload(sdk, CHAT)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(
            model=str(stack.model_dir), training_file=chat.id, method={"type": "dpo"}
        )
    err = exc.value.body
    assert err["param"] == "training_file" and "'chat'" in err["message"]
    assert "preference" in err["message"]


def test_a_row_without_a_rejected_answer_is_refused_at_upload(sdk):
    good = (ASSETS / TRAIN).read_text().splitlines()[0]
    bad = json.loads(good)
    del bad["non_preferred_output"]
    body = f"{good}\n{json.dumps(bad)}\n".encode()
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="fine-tune")
    assert "line 2" in str(exc.value) and "non_preferred_output" in str(exc.value)
