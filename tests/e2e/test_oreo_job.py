"""OREO through the official ``openai`` SDK against the real API and worker.

Upload ``demo_oreo.jsonl`` (scored trajectories: a two-step well-formed answer with
reward 1, or a two-step guess / refusal with reward 0), train the tiny model with OREO,
then check the job's metrics (the value loss falls from the first steps to the last)
and, on rows the job never saw (``demo_oreo_heldout.jsonl``), that the policy's
log-likelihood of rewarded responses rises relative to unrewarded ones.
"""

from __future__ import annotations

import io
import json
import time
from importlib import resources

import openai
import pytest
from openai import OpenAI

from tests.e2e.test_dpo_job import download_final, upload, wait_done

pytestmark = pytest.mark.e2e
ASSETS = resources.files("trainers") / "assets"
TRAIN, HELDOUT = "demo_oreo.jsonl", "demo_oreo_heldout.jsonl"
# The tiny random model needs a large learning rate to move; 3 epochs of 120 rows = 45 steps.
HP = {"n_epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "beta": 0.1}


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def response_logps(model_dir, rows) -> list[float]:
    """log π(response + EOS | prompt) per row, summed over the response's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0, len(p) - 1 : -1].float()
        out.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None]).sum()))
    return out


def gap(logps, rows) -> float:
    """Mean log-likelihood of rewarded responses minus that of unrewarded ones."""
    up = [x for x, r in zip(logps, rows, strict=True) if r["reward"] > 0]
    down = [x for x, r in zip(logps, rows, strict=True) if r["reward"] <= 0]
    return sum(up) / len(up) - sum(down) / len(down)


def test_oreo_job_learns_values_and_prefers_rewarded_held_out_responses(stack, sdk, tmp_path):
    t0 = time.monotonic()
    training_file = upload(sdk, TRAIN)
    assert training_file.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=training_file.id,
        seed=3,
        method={"type": "oreo", "oreo": {"hyperparameters": HP}},
    )
    assert job.status in ("queued", "running") and job.method.type == "oreo"
    job = wait_done(sdk, job.id, timeout=180)
    wall = time.monotonic() - t0
    assert job.status == "succeeded", job.error

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=200))
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert {"value_loss", "policy_loss", "kl", "value/start", "value/end"} <= metrics[-1].keys()
    first = sum(m["value_loss"] for m in metrics[:5]) / 5
    last = sum(m["value_loss"] for m in metrics[-5:]) / 5

    _, ckpt_dir = download_final(stack, sdk, job.id, tmp_path)
    assert (ckpt_dir / "model.safetensors").exists()
    assert (ckpt_dir / "value_model" / "value_head.safetensors").exists()

    rows = [json.loads(x) for x in (ASSETS / HELDOUT).read_text().splitlines() if x.strip()]
    train = {json.loads(x)["prompt"] for x in (ASSETS / TRAIN).read_text().splitlines()}
    assert not any(r["prompt"] in train for r in rows)  # really held out
    gap0 = gap(response_logps(stack.model_dir, rows), rows)
    gap1 = gap(response_logps(ckpt_dir, rows), rows)
    print(
        f"\nOREO e2e: value loss (mean of 5 steps) {first:.3f} -> {last:.3f}; held-out "
        f"log-likelihood gap rewarded - unrewarded ({len(rows)} rows) {gap0:.1f} -> "
        f"{gap1:.1f} nats; job {wall:.1f} s through the API, {job.trained_tokens} tokens"
    )
    assert last < 0.5 * first
    assert gap1 > gap0 + 1.0


def test_a_non_numeric_oreo_reward_is_refused_naming_the_line(sdk):
    good = (ASSETS / TRAIN).read_text().splitlines()[0]
    bad = good.replace('"reward": 1', '"reward": "high"')
    assert bad != good
    body = f"{good}\n{bad}\n".encode()
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="fine-tune")
    assert "line 2" in str(exc.value) and "reward" in str(exc.value)


def test_a_step_level_job_on_responses_without_steps_is_refused_at_creation(stack):
    import httpx

    rows = [
        {"prompt": "2+2?", "response": "First add.\nIt is 4.", "reward": 1},
        {"prompt": "3+3?", "response": "It is 6.", "reward": 1},
    ]
    c = httpx.Client(base_url=f"{stack.base_url}/v1", timeout=30)
    body = "\n".join(json.dumps(r) for r in rows).encode()
    fid = c.post("/files", files={"file": ("s.jsonl", body)}, data={"purpose": "fine-tune"})
    fid = fid.json()["id"]
    method = {"type": "oreo", "oreo": {"hyperparameters": {"variant": "step"}}}
    resp = c.post(
        "/fine_tuning/jobs",
        json={"model": str(stack.model_dir), "training_file": fid, "method": method},
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert "line 2" in err["message"] and "step delimiter" in err["message"]
    assert err["param"] == "training_file"
    # the token-level default accepts the same file, and chat-style scored rows upload
    ok = c.post(
        "/fine_tuning/jobs",
        json={"model": str(stack.model_dir), "training_file": fid, "method": {"type": "oreo"}},
    )
    assert ok.status_code == 200, ok.text
    c.post(f"/fine_tuning/jobs/{ok.json()['id']}/cancel")
    chat = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "reward": 0.5,
    }
    up = c.post(
        "/files",
        files={"file": ("c.jsonl", json.dumps(chat).encode())},
        data={"purpose": "fine-tune"},
    )
    assert up.status_code == 200, up.text  # fits both SFT's chat and OREO's scored format
    chat_job = c.post(
        "/fine_tuning/jobs",
        json={
            "model": str(stack.model_dir),
            "training_file": up.json()["id"],
            "method": {"type": "oreo"},
        },
    )
    assert chat_job.status_code == 200, chat_job.text
    c.post(f"/fine_tuning/jobs/{chat_job.json()['id']}/cancel")
