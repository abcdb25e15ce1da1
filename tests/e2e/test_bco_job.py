"""BCO through the official ``openai`` SDK against the real API and worker.

Upload ``demo_bco.jsonl`` (OpenAI-style unpaired rows: the DPO demo's pairs, each
split into a thumbs-up well-formed answer and a thumbs-down refusal or sloppy
copy), train the tiny model with BCO, download the final checkpoint and score
rows the job never saw (``demo_bco_heldout.jsonl``). On those, the implicit reward
β·(log π − log π_ref) must separate thumbs-up from thumbs-down rows (before
training it is 0 everywhere), sign(r − δ) must classify the labels better than a
coin, and the chosen-minus-rejected log-prob margin of the held-out pairs must rise.
"""

from __future__ import annotations

import io
import json
import time
from importlib import resources

import openai
import pytest
from openai import OpenAI

from tests.e2e.test_dpo_job import answer_logp, download_final, upload, wait_done

pytestmark = pytest.mark.e2e
ASSETS = resources.files("trainers") / "assets"
TRAIN, HELDOUT, CHAT = "demo_bco.jsonl", "demo_bco_heldout.jsonl", "demo_sft.jsonl"
BETA = 0.1
# The tiny random model needs a large learning rate to move; 4 epochs of 120 rows = 60 steps.
HP = {"n_epochs": 4, "batch_size": 8, "learning_rate": 3e-3, "beta": BETA}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def logps(model_dir, rows) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return [answer_logp(model, tok, r["input"]["messages"], r["output"]) for r in rows]


def separation(rewards, labels, delta: float) -> tuple[float, float]:
    """(mean r of thumbs-up rows − mean r of thumbs-down rows, accuracy of r − δ > 0)."""
    up = [r for r, lab in zip(rewards, labels, strict=True) if lab]
    down = [r for r, lab in zip(rewards, labels, strict=True) if not lab]
    gap = sum(up) / len(up) - sum(down) / len(down)
    acc = sum((r - delta > 0) == lab for r, lab in zip(rewards, labels, strict=True))
    return gap, acc / len(labels)


def test_bco_job_separates_held_out_thumbs_up_from_thumbs_down(stack, sdk, tmp_path):
    t0 = time.monotonic()
    training_file = upload(sdk, TRAIN)
    assert training_file.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=training_file.id,
        seed=3,
        method={"type": "bco", "bco": {"hyperparameters": HP}},
    )
    assert job.status in ("queued", "running") and job.method.type == "bco"
    job = wait_done(sdk, job.id, timeout=180)
    wall = time.monotonic() - t0
    assert job.status == "succeeded", job.error
    assert job.trained_tokens and job.trained_tokens > 0

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=200))
    metric_events = [e for e in events if e.type == "metrics"]
    assert len(metric_events) >= 10, [e.message for e in events]
    newest = metric_events[0].data
    assert {
        "loss",
        "delta",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
    } <= newest.keys()
    assert newest["step"] == newest["total_steps"] == 60
    delta = newest["delta"]

    final, ckpt_dir = download_final(stack, sdk, job.id, tmp_path)
    assert final.step_number == 60 and (ckpt_dir / "model.safetensors").exists()
    assert (ckpt_dir / "posttrain_bco_state.json").exists()

    rows = [json.loads(x) for x in (ASSETS / HELDOUT).read_text().splitlines() if x.strip()]
    train = {json.dumps(json.loads(x)["input"]) for x in (ASSETS / TRAIN).read_text().splitlines()}
    assert not any(json.dumps(r["input"]) in train for r in rows)  # really held out
    labels = [r["label"] for r in rows]
    base, trained = logps(stack.model_dir, rows), logps(ckpt_dir, rows)
    rewards = [BETA * (t - b) for t, b in zip(trained, base, strict=True)]
    gap0, acc0 = separation([0.0] * len(rows), labels, 0.0)  # the base: r = 0, δ = 0
    gap1, acc1 = separation(rewards, labels, delta)
    # held-out pairs: rows 2k (thumbs-up) and 2k + 1 (thumbs-down) share a prompt
    assert all(rows[i]["input"] == rows[i + 1]["input"] for i in range(0, len(rows), 2))
    pairs = range(0, len(rows), 2)
    margin0 = sum(base[i] - base[i + 1] for i in pairs) / len(pairs)
    margin1 = sum(trained[i] - trained[i + 1] for i in pairs) / len(pairs)
    print(
        f"\nBCO e2e on {len(rows)} held-out rows: reward gap (up - down) {gap0:.2f} -> "
        f"{gap1:.2f}, sign(r - delta) accuracy {acc0:.2f} -> {acc1:.2f} (delta {delta:.3f}), "
        f"pair log-prob margin {margin0:.1f} -> {margin1:.1f} nats; job {wall:.1f} s through "
        f"the API, {job.trained_tokens} trained tokens"
    )
    assert gap1 > gap0 + 1.0
    assert acc1 >= 0.75 and acc1 >= acc0 + 0.2
    assert margin1 > margin0 + 10.0


@pytest.mark.parametrize("label", ['"yes"', "1"])
def test_a_non_boolean_label_is_refused_at_upload(sdk, label):
    good = (ASSETS / TRAIN).read_text().splitlines()[0]
    bad = good.replace('"label": true', f'"label": {label}')
    assert bad != good
    body = f"{good}\n{bad}\n".encode()
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="fine-tune")
    assert "line 2" in str(exc.value) and "label" in str(exc.value)


def test_bco_job_on_a_chat_file_is_refused_at_creation(stack, sdk):
    chat = upload(sdk, CHAT)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(
            model=str(stack.model_dir), training_file=chat.id, method={"type": "bco"}
        )
    err = exc.value.body
    assert err["param"] == "training_file" and "'chat'" in err["message"]
    assert "unpaired_preference" in err["message"]
