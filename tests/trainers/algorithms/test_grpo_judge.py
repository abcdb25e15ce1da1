"""A GRPO job graded by remote judges (a ``score_model`` and a ``label_model`` whose model a
judge endpoint of the run plan serves, alone and as a multi grader's sub-graders), through
the shared runner. The endpoint is a
loopback OpenAI-compatible chat completions service written here: it stands in for the
user's external judge (the real posttrain inference engine is asked in
tests/e2e/test_judge_inference.py, which is too slow to start inside a training test).
The rewards TRL computes are what parsing the service's answers gives, a parse error
scores 0 and is counted, the key comes from the environment variable the endpoint names,
and the judge calls are logged per grader."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch

from tests.loopback import Handler, serving
from trainers import registry
from trainers.contract.graders.judgeendpoints import parse_endpoints
from trainers.contract.graders.judging import JudgeParseError, parse_label, parse_score
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.graders.reward import completion_text
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model

KEY_ENV, KEY = "POSTTRAIN_TEST_JUDGE_KEY", "sk-judge-test"
RATE, VERDICT = "Rate 0-10 this answer: ", "Say good or bad about: "


def rating(text: str) -> str:
    """The service's answer to a rating request: a number, or no number at all."""
    n = sum(text.encode())
    return "I cannot rate that." if n % 5 == 0 else f"Score: {n % 11}/10"


def verdict(text: str) -> str:
    return "good" if len(text) % 2 == 0 else "This is bad."


class _Judge(Handler):
    asked: ClassVar[list[dict]] = []
    auth: ClassVar[list[str | None]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.asked.append(body)
        self.auth.append(self.headers.get("authorization"))
        prompt = body["messages"][-1]["content"]
        if prompt.startswith(RATE):
            answer = rating(prompt.removeprefix(RATE))
        else:
            answer = verdict(prompt.removeprefix(VERDICT))
        reply = {
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": answer},
                }
            ],
        }
        self.reply(200, json.dumps(reply).encode())


def expected_rating(text: str) -> float:
    try:
        return parse_score(rating(text), [0, 10])
    except JudgeParseError:
        return 0.0


def test_the_rewards_are_the_judges_parsed_answers(tmp_path, rewards, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv(KEY_ENV, KEY)
    rows = [{"prompt": [{"role": "user", "content": f"Say {i}."}]} for i in range(4)]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    graders = [
        {
            "type": "score_model",
            "name": "rating",
            "model": "judge-chat",
            "input": [{"role": "user", "content": RATE + "{{sample.output_text}}"}],
            "range": [0, 10],
        },
        {
            "type": "label_model",
            "name": "verdict",
            "model": "judge-chat",
            "input": [{"role": "user", "content": VERDICT + "{{sample.output_text}}"}],
            "labels": ["good", "bad"],
            "passing_labels": ["good"],
            "sampling_params": {"temperature": 0.5, "max_completions_tokens": 8},
        },
    ]
    subs = {
        "r": {**graders[0], "name": "sub_rating"},
        "v": {**graders[1], "name": "sub_verdict"},
    }
    graders.append(
        {"type": "multi", "name": "both", "graders": subs, "calculate_output": "r / 10 + v"}
    )
    hp = {"num_generations": 4, "batch_size": 8, "max_completion_length": 12, "max_steps": 2}
    spec = JobSpec.model_validate(
        {
            "model": str(build_tiny_model(tmp_path / "base", seed=0)),
            "training_file": "f",
            "method": {"type": "grpo", "grpo": {"graders": graders, "hyperparameters": hp}},
        }
    )
    _Judge.asked.clear()
    _Judge.auth.clear()
    with serving(_Judge) as url:
        setting = {
            "user": {"base_url": f"{url}/v1", "api_key_env": KEY_ENV, "models": ["judge-chat"]}
        }
        plan = RunPlan(
            job_id="j",
            spec=spec,
            training_path=tmp_path / "rl.jsonl",
            output_dir=tmp_path / "out",
            data_dir=tmp_path,
            checkpoint_every_steps=1000,
            judges=parse_endpoints(json.dumps(setting)),
        )
        reporter = Reporter()
        assert run_method(registry.resolve("grpo"), plan, reporter).step == 2
    assert rewards
    parse_errors = 0
    for completions, per_grader, _ in rewards:
        texts = [completion_text(c) for c in completions]
        assert per_grader[:, 0].tolist() == pytest.approx([expected_rating(t) for t in texts])
        labels = [parse_label(verdict(t), ["good", "bad"]) for t in texts]
        passed = [1.0 if lab == "good" else 0.0 for lab in labels]
        assert per_grader[:, 1].tolist() == passed
        both = [expected_rating(t) / 10 + p for t, p in zip(texts, passed, strict=True)]
        assert per_grader[:, 2].tolist() == pytest.approx(both)
        parse_errors += sum(sum(t.encode()) % 5 == 0 for t in texts)
    n = sum(len(c) for c, _, _ in rewards)
    assert len(_Judge.asked) == 4 * n and set(_Judge.auth) == {f"Bearer {KEY}"}
    rated = [b for b in _Judge.asked if b["messages"][-1]["content"].startswith(RATE)]
    assert {b["temperature"] for b in rated} == {0.0} and {b["model"] for b in rated} == {
        "judge-chat"
    }
    judged = [b for b in _Judge.asked if b not in rated]
    assert all(b["temperature"] == 0.5 and b["max_completion_tokens"] == 8 for b in judged)
    logs = [m.model_dump()["metrics"] for m in reporter.sent if m.type == "log"]
    for name in ("rating", "verdict", "sub_rating", "sub_verdict"):
        calls = [
            m[f"graders/{name}/judge_calls"] for m in logs if f"graders/{name}/judge_calls" in m
        ]
        assert calls and max(calls) > 0, name
    logged_parse = [
        m["graders/rating/judge_parse_errors"]
        for m in logs
        if "graders/rating/judge_parse_errors" in m
    ]
    assert logged_parse and (parse_errors == 0) == (max(logged_parse) == 0)
