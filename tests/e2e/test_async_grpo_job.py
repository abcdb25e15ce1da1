"""``rollout_mode: "async"`` through the real API and worker.

The worker of this stack has a ``vllm`` command (``POSTTRAIN_VLLM_COMMAND``): the sampling
stand-in of ``vllm serve`` (``tests/workers/vllm_rollouts.py``, transformers in fp32), so
it advertises ``vllm-server`` among its rollout engines and the API accepts async jobs for
its queue. The job runs TRL's ``AsyncGRPOTrainer`` against the server the worker starts
for it; the task is ``test_grpo_job``'s (every answer is "Heidi", which the tiny model
says now and then), and the reward must rise: means of the first and last 10 of its 60
steps went 0.022 -> 1.0, 0.019 -> 0.994 and 0.028 -> 1.0 for seeds 1, 2 and 3 (it asserts
a rise of 0.3; with 40 steps seed 2 rose only 0.04 -> 0.21). The suite's default stack has no vLLM
command, so the same request there is refused at creation naming ``rollout_engine``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests import redis_server
from tests.e2e.conftest import start_stack
from tests.e2e.test_grpo_job import ASSETS, GRADER, reward_curve
from tests.e2e.test_sft_job import wait_done

pytestmark = pytest.mark.e2e
ASYNC_DB = 6
ROLLOUTS = Path(__file__).resolve().parents[1] / "workers" / "vllm_rollouts.py"
STEPS = 60
HP = {
    "rollout_mode": "async",
    "rollout_engine": "vllm",
    "vllm_mode": "server",
    "beta": 0.0,
    "loss_type": "dapo",
    "max_staleness": 1,
    "num_generations": 8,
    "batch_size": 16,
    "max_completion_length": 8,
    "learning_rate": 1e-2,
    "max_steps": STEPS,
}
METHOD = {"type": "grpo", "grpo": {"graders": [GRADER], "hyperparameters": HP}}


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    st = start_stack(
        root,
        redis_server.url(ASYNC_DB),
        POSTTRAIN_VLLM_COMMAND=f"{sys.executable} {ROLLOUTS}",
        POSTTRAIN_VLLM_START_TIMEOUT="180",
        FAKE_VLLM_LOG=str(root / "vllm.jsonl"),
    )
    yield st
    st.stop()


def _sdk(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def _upload(sdk: OpenAI) -> str:
    with (ASSETS / "demo_grpo.jsonl").open("rb") as fh:
        return sdk.files.create(file=("demo_grpo.jsonl", fh), purpose="fine-tune").id


def test_an_async_job_is_refused_where_no_worker_has_vllm(stack):
    sdk = _sdk(stack)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.fine_tuning.jobs.create(
            model=str(stack.model_dir), training_file=_upload(sdk), method=METHOD
        )
    err = info.value.body
    assert err["param"] == "method.grpo.hyperparameters.rollout_engine"
    assert "cannot start a vLLM server" in err["message"]


def test_an_async_grpo_job_trains_on_the_workers_vllm_server(vllm_stack):
    sdk = _sdk(vllm_stack)
    job = sdk.fine_tuning.jobs.create(
        model=str(vllm_stack.model_dir),
        training_file=_upload(sdk),
        method=METHOD,
        seed=1,
    )
    done = wait_done(sdk, job.id, timeout=900)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Started a vLLM server for rollouts") for m in messages)
    assert any(m.startswith("Asynchronous rollouts: TRL's AsyncGRPOTrainer") for m in messages)

    rewards = reward_curve(vllm_stack, job.id)
    print("rewards per step:", [round(r, 3) for r in rewards])
    assert len(rewards) == STEPS
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    assert last > first + 0.3, (first, last)
    url = f"{vllm_stack.base_url}/v1/fine_tuning/jobs/{job.id}/metrics"
    rows = httpx.get(url, params={"limit": 1000}, timeout=30).json()["data"]
    stale = [r["sample/staleness_max"] for r in rows if "sample/staleness_max" in r]
    assert stale and max(stale) <= HP["max_staleness"]
    # the server sampled from every policy version the trainer sent it
    log = [json.loads(x) for x in (vllm_stack.logs / "vllm.jsonl").read_text().splitlines()]
    assert [e["version"] for e in log if e["event"] == "weights"] == list(range(1, STEPS + 2))
