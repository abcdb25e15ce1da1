"""TRL's own ``AsyncGRPOTrainer`` trains the tiny model on CPU against the sampling
stand-in of ``vllm serve`` (tests/workers/vllm_rollouts.py), in its own process, with
TRL's own rollout worker (a spawned child posting ``/v1/completions`` with aiohttp),
posttrain's CPU varlen kernel under TRL's tree attention and the file weight transfer:

* the rewards rise (later steps' mean above the first steps' by a margin);
* staleness is bounded: no trained sample is more than ``max_staleness`` policy
  versions old (TRL's ``sample/staleness_max``), while some are older than the
  policy (generation did overlap training);
* the importance ratio is the trainer's log-probabilities over the server's: 1 to
  float rounding on the first step, where every sample comes from the weights being
  trained, and off 1 (``kl`` > 0) once samples are stale;
* every optimizer step synced the weights to the server, which sampled with them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from trainers.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[3]
TARGET = 100  # token ids below this are "good"


def low_token_reward(completions, completion_ids, **_):
    """Share of a completion's tokens whose id is below TARGET (about 15% at random)."""
    return [sum(t < TARGET for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "FAKE_VLLM_LOG": str(log), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.workers.vllm_rollouts",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            *extra,
        ],
        cwd=ROOT,
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the stand-in server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the stand-in server did not come up")


class Logs(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.rows.append({"step": state.global_step, **logs})


@pytest.fixture
def server(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    log = tmp_path / "vllm.jsonl"
    proc, url = start_server(model_dir, log)
    try:
        yield model_dir, url, log, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_async_grpo_learns_with_bounded_staleness_and_the_ratio(server, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from trl.experimental.async_grpo import AsyncGRPOConfig

    from trainers.algorithms.grpo_async import varlen
    from trainers.algorithms.grpo_async.trainer import build_trainer

    model_dir, url, log, proc = server
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    steps, staleness = 32, 2
    prompts = [
        [{"role": "user", "content": f"Say something about {w}."}]
        for w in ("cats", "rain", "maps", "tea", "boats", "stars", "bread", "wind")
    ]
    args = AsyncGRPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=3e-2,
        max_steps=steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        temperature=1.0,
        max_staleness=staleness,
        token_budget=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        vllm_server_base_url=url,
        vllm_server_timeout=120,
        dataloader_pin_memory=False,
    )
    logs = Logs()
    wait_healthy(proc, url)
    trainer = build_trainer(
        str(model_dir),
        args,
        reward_funcs=low_token_reward,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[logs],
    )
    assert varlen.installed()
    trainer.train()

    rows = logs.rows
    assert len(rows) == steps
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    print("rewards per step:", [round(r, 3) for r in rewards])
    print("staleness_max per step:", [r.get("sample/staleness_max") for r in rows])
    print("ratio per step:", [round(r["ratio"], 5) for r in rows])
    dropped = sum(r.get("sample/dropped_stale_total") or 0 for r in rows)
    print("dropped as stale:", dropped)
    assert last > first + 0.1, (first, last)

    # Bounded staleness, and real overlap of generation with training.
    stale = [r["sample/staleness_max"] for r in rows]
    assert max(stale) <= staleness
    assert max(stale) >= 1
    assert dropped > 0  # the generator ran ahead, and what grew too old was not trained on
    # The ratio: exactly the same policy on step 1, a real correction later.
    assert abs(rows[0]["ratio"] - 1) < 1e-3 and rows[0]["kl"] < 1e-5
    assert max(r["kl"] for r in rows) > 1e-4
    assert all("clip_ratio/region_mean" in r for r in rows)

    # One weight sync per optimizer step (plus the initial one), and sampling followed.
    events = [json.loads(line) for line in log.read_text().splitlines()]
    versions = [e["version"] for e in events if e["event"] == "weights"]
    assert versions == list(range(1, steps + 2))
    sampled = {e["version"] for e in events if e["event"] == "completion"}
    assert min(sampled) == 1 and max(sampled) >= steps - staleness
