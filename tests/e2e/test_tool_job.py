"""A tool-calling RL task whose reward rises, through the real API and worker.

The task: the prompt is ``key K`` (K one of three keys); the model should call
``lookup(key)``, a tool on a loopback HTTP server, and answer with the tool's reply.
Two graders read the episode (trajectory graders): ``called`` scores 1 when the
episode made a call (``{{sample.tool_call_count}}``), ``copied`` 1 when the final
answer holds the first call's result (``{{sample.tool_calls.0.result}}``), so an
answer remembered without the tool earns nothing.

The tiny random model never writes a tool call by chance, so an SFT job first shows it
the format on demonstrations (the tools turn and the tool result written as the system
turns the tiny chat template renders them as). After 30 SFT steps it calls the tool in
about half its episodes; the GRPO job, started from the SFT job's ``ft:`` model, raises
that and the copying. The loopback tool is allowed by the stack's
``POSTTRAIN_TOOL_ALLOWED_NETWORKS``.
"""

from __future__ import annotations

import json
import statistics
from typing import ClassVar

import httpx
import pytest
from openai import OpenAI

from tests import redis_server
from tests.e2e.conftest import start_stack
from tests.e2e.test_grpo_job import all_samples, reward_curve
from tests.e2e.test_sft_job import wait_done
from tests.loopback import Handler, serving

pytestmark = pytest.mark.e2e
TOOLS_DB = 8
VALUES = {"1": "7", "2": "4", "3": "9"}
GRADERS = [
    {
        "type": "string_check",
        "name": "called",
        "input": "{{sample.tool_call_count}}",
        "reference": "0",
        "operation": "ne",
    },
    {
        "type": "string_check",
        "name": "copied",
        "input": "{{sample.output_text}}",
        "reference": "{{sample.tool_calls.0.result}}",
        "operation": "like",
    },
]
SFT_HP = {"learning_rate": 1e-2, "batch_size": 8, "n_epochs": 20, "max_steps": 30}
RL_HP = {
    "num_generations": 8,
    "batch_size": 16,
    "max_completion_length": 96,
    "learning_rate": 2e-3,
    "max_steps": 40,
    "max_turns": 2,
}


class _Lookup(Handler):
    keys: ClassVar[list[str]] = []

    def do_POST(self):
        args = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.keys.append(str(args.get("key")))
        reply = VALUES.get(str(args.get("key")), "").encode()
        self.reply(200 if reply else 404, reply)


@pytest.fixture(scope="module")
def lookup_url():
    with serving(_Lookup) as url:
        yield url + "/lookup"


@pytest.fixture(scope="module")
def tstack(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    st = start_stack(
        root, redis_server.url(TOOLS_DB), POSTTRAIN_TOOL_ALLOWED_NETWORKS="127.0.0.0/8"
    )
    try:
        yield st
    finally:
        st.stop()


def demonstrations() -> list[dict]:
    """Episodes of the task as the tiny template renders them: call, result, answer."""
    rows = []
    for i in range(32):
        key = "123"[i % 3]
        call = json.dumps({"name": "lookup", "arguments": {"key": key}})
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "tools: lookup(key)"},
                    {"role": "user", "content": f"key {key}"},
                    {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                    {"role": "system", "content": f"tool: {VALUES[key]}"},
                    {"role": "assistant", "content": VALUES[key]},
                ]
            }
        )
    return rows


def upload(sdk: OpenAI, name: str, rows: list[dict]) -> str:
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    return sdk.files.create(file=(name, data), purpose="fine-tune").id


def test_a_tool_task_learns_to_call_and_copy_through_the_api(tstack, lookup_url):
    sdk = OpenAI(base_url=f"{tstack.base_url}/v1", api_key="unused", max_retries=0)
    sft = sdk.fine_tuning.jobs.create(
        model=str(tstack.model_dir),
        training_file=upload(sdk, "demos.jsonl", demonstrations()),
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": SFT_HP}},
    )
    sft = wait_done(sdk, sft.id)
    assert sft.status == "succeeded", sft.error
    prompts = [{"messages": [{"role": "user", "content": f"key {k}"}]} for k in "123" * 3]
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "The value stored under a key.",
            "parameters": {
                "type": "object",
                "properties": {"key": {"type": "string"}},
                "required": ["key"],
            },
        },
        "endpoint": {"url": lookup_url},
    }
    _Lookup.keys.clear()
    job = sdk.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=upload(sdk, "keys.jsonl", prompts),
        seed=1,
        method={
            "type": "grpo",
            "grpo": {"graders": GRADERS, "tools": [tool], "hyperparameters": RL_HP},
        },
    )
    job = wait_done(sdk, job.id)
    assert job.status == "succeeded", job.error
    curve = reward_curve(tstack, job.id)
    assert len(curve) == RL_HP["max_steps"]
    first, last = statistics.mean(curve[:10]), statistics.mean(curve[-10:])
    print(f"\ntool task reward per step: {' '.join(f'{r:.2f}' for r in curve)}")
    print(f"mean of the first 10 steps {first:.2f} -> last 10 {last:.2f} (max 2)")
    assert last >= first + 0.2, curve
    rows = httpx.get(f"{tstack.base_url}/v1/fine_tuning/jobs/{job.id}/metrics", timeout=30)
    steps = [r for r in rows.json()["data"] if "reward" in r]
    assert all({"tools/calls_per_episode", "tools/errors"} <= set(r) for r in steps)
    calls = [r["tools/calls_per_episode"] for r in steps]
    print(f"tool calls per episode: {' '.join(f'{c:.2f}' for c in calls)}")
    last_step = {k: v for k, v in steps[-1].items() if k.startswith(("tools/", "reward"))}
    print(f"the last step's episode metrics: {json.dumps(last_step, sort_keys=True)}")
    assert last_step["tools/episode_tokens"] >= last_step["tools/result_tokens"] > 0
    assert statistics.mean(calls[-10:]) > statistics.mean(calls[:10]), calls
    assert set(_Lookup.keys) & set(VALUES)  # the endpoint was called with real keys
    # the samples show each episode's calls with the results the model read back
    samples = all_samples(tstack, job.id)
    episodes = [s for s in samples if s["tool_calls"]]
    assert episodes and all(s["tool_calls"] is not None for s in samples)
    assert any(s["tool_calls"][0]["result"] in VALUES.values() for s in episodes)
    for s in episodes:
        result = s["tool_calls"][0]["result"]  # None: the episode ended before the answer
        assert s["rewards"]["called"] == 1.0
        assert s["rewards"]["copied"] == float(result is not None and result in s["completion"])
    for s in samples:
        if not s["tool_calls"]:
            assert s["rewards"] == {"called": 0.0, "copied": 0.0}, s
