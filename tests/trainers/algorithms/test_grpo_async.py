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


def failing_reward(completions, **_):
    raise ValueError("this reward function cannot score")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, log: Path, *extra: str, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "FAKE_VLLM_LOG": str(log), "OMP_NUM_THREADS": "1", **(env or {})}
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
    steps, staleness = 40, 1
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
    assert last > first + 0.3, (first, last)

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


# ----------------------------------------------------------------------------- as a job
def async_plan(root: Path, model_dir: Path, url: str, **spec_fields):
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec

    hp = {
        "rollout_mode": "async",
        "rollout_engine": "vllm",
        "vllm_mode": "server",
        "beta": 0.0,
        "loss_type": "dapo",
        "num_generations": 4,
        "batch_size": 8,
        "max_completion_length": 8,
        "max_steps": 3,
        "max_staleness": 1,
        "learning_rate": 1e-2,
    }
    grader = {
        "type": "length_penalty",
        "name": "short",
        "input": "{{sample.output_text}}",
        "max_length": 40,
        "target_length": 8,
        "unit": "characters",
    }
    spec = JobSpec.model_validate(
        {
            "model": str(model_dir),
            "training_file": "file-x",
            "method": {"type": "grpo", "grpo": {"graders": [grader], "hyperparameters": hp}},
            **spec_fields,
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Count to {i}."}]} for i in range(4)]
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return RunPlan(
        job_id="j",
        spec=spec,
        training_path=train,
        output_dir=root / "out",
        data_dir=root,
        checkpoint_every_steps=100,
        vllm_server_url=url,
    )


def test_an_async_job_runs_through_the_runner(server, tmp_path, monkeypatch):
    """A job with ``rollout_mode: "async"`` goes to TRL's AsyncGRPOTrainer through the
    registry and the shared runner: its grader is the reward, its steps are reported, its
    checkpoint holds moved weights, and every step's weights reached the server. The
    runner loads no copy of the model of its own (the trainer loads it from the path)."""
    from safetensors.torch import load_file

    from trainers import registry, runner
    from trainers.reporting import Reporter
    from trainers.runner import run_method

    def no_second_copy(name):
        raise AssertionError(f"the runner loaded {name} beside the async trainer's copy")

    monkeypatch.setattr(runner, "load_causal_lm", no_second_copy)
    model_dir, url, log, proc = server
    wait_healthy(proc, url)
    plan = async_plan(tmp_path / "job", model_dir, url)
    method = registry.resolve_job(plan.spec)
    assert method.name == "grpo_async"
    reporter = Reporter()
    result = run_method(method, plan, reporter)
    assert result.step == 3 and not result.paused
    logs = [m for m in reporter.sent if m.type == "log"]
    assert [m.step for m in logs] == [1, 2, 3]
    assert all("rewards/short" in m.metrics and "ratio" in m.metrics for m in logs)
    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "job" / result.checkpoint / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["version"] for e in events if e["event"] == "weights"] == [1, 2, 3, 4]


def test_a_lora_job_syncs_the_adapter_alone(tmp_path):
    """With a server started with ``--enable-lora`` (and runtime adapter loading), TRL
    syncs the LoRA adapter alone: every step loads a new adapter version on the server,
    no base weight moves there, and the rollouts ask for the newest adapters."""
    from trainers import registry
    from trainers.reporting import Reporter
    from trainers.runner import run_method

    model_dir = build_tiny_model(tmp_path / "tiny", seed=0)
    log = tmp_path / "vllm.jsonl"
    proc, url = start_server(
        model_dir,
        log,
        "--enable-lora",
        "--max-loras",
        "4",
        "--max-lora-rank",
        "8",
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
    )
    try:
        wait_healthy(proc, url)
        plan = async_plan(
            tmp_path / "job", model_dir, url, training_type="lora", lora={"r": 4, "alpha": 8}
        )
        result = run_method(registry.resolve_job(plan.spec), plan, Reporter())
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert result.step == 3
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [e for e in events if e["event"] == "weights"]
    loads = [e["name"] for e in events if e["event"] == "lora" and e["action"] == "load"]
    assert loads == [f"trl-policy-v{v}" for v in range(1, 5)]
    asked = {e["model"] for e in events if e["event"] == "completion"}
    assert asked <= set(loads) and "trl-policy-v1" in asked


def test_a_failed_rollout_worker_fails_the_run_instead_of_hanging(server, tmp_path):
    """TRL's rollout child dies when a reward function raises; the trainer then raises
    (``guard_worker_stop``: TRL's stop would wait forever on the dead child's Event)."""
    from transformers import AutoTokenizer
    from trl.experimental.async_grpo import AsyncGRPOConfig

    from trainers.algorithms.grpo_async.trainer import build_trainer

    model_dir, url, _log, proc = server
    args = AsyncGRPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        token_budget=0,
        report_to=[],
        save_strategy="no",
        vllm_server_base_url=url,
        vllm_server_timeout=120,
        heartbeat_stale_after_s=60,
    )
    wait_healthy(proc, url)
    trainer = build_trainer(
        str(model_dir),
        args,
        reward_funcs=failing_reward,
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * 2}),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Rollout worker child has failed"):
        trainer.train()
    assert time.monotonic() - started < 120


def test_plain_text_prompts_are_refused_for_async(tmp_path):
    from trainers.algorithms.grpo_async.method import check_messages
    from trainers.contract.errors import JobError

    with pytest.raises(JobError, match="takes prompts as messages") as err:
        check_messages([{"prompt": "Count to 3."}], "training_file")
    assert err.value.param == "training_file"
    chat = [{"prompt": [{"role": "user", "content": "Count to 3."}]}]
    assert check_messages(chat, "training_file") == chat


def test_an_async_job_resumes_from_its_checkpoint(server, tmp_path):
    """A retried run resumes from the newest complete checkpoint: TRL's rollout state
    (the next prompt, the policy version) comes back with it and training goes on to the
    new ``max_steps``."""
    from trainers import registry
    from trainers.reporting import Reporter
    from trainers.runner import run_method

    model_dir, url, _log, proc = server
    wait_healthy(proc, url)
    plan = async_plan(tmp_path / "job", model_dir, url).model_copy(
        update={"checkpoint_every_steps": 2}
    )
    first = run_method(registry.resolve_job(plan.spec), plan, Reporter())
    assert first.step == 3
    state = json.loads(
        (tmp_path / "job" / "out" / "checkpoint-2" / "rollout_state.json").read_text()
    )
    assert state["model_version"] == 3  # the initial sync and one per step

    method = plan.spec.method
    longer = method.hyperparameters.model_copy(update={"max_steps": 5})
    block = method.grpo.model_copy(update={"hyperparameters": longer})
    spec = plan.spec.model_copy(update={"method": method.model_copy(update={"grpo": block})})
    reporter = Reporter()
    again = run_method(registry.resolve_job(spec), plan.model_copy(update={"spec": spec}), reporter)
    assert again.step == 5
    assert [m.step for m in reporter.sent if m.type == "log"] == [4, 5]
