"""EGPO through the official ``openai`` SDK against the real API and worker.

The task (``bench/egpo_task.py``): a ``pattern_table`` judge with a cyclic preference
over three answer styles (a ≻ b ≻ c ≻ a at 0.8, by the completion's first character)
that all beat any other answer at 0.9. The tiny model is trained by EGPO and, on the
same prompts and seed, by online IPO (``extragradient: false``); the final checkpoints
are sampled and judged against the base model's samples. EGPO's policy must win
against the base, shed the dominated "other" style, and keep a mix of the three cyclic
styles (no collapse onto one). The distances of both policies' style mixes to the
regularised equilibrium are printed for the closing note.
"""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
from openai import OpenAI

from bench import egpo_task as task
from tests.e2e.test_dpo_job import download_final, wait_done

pytestmark = pytest.mark.e2e
BETA, HP = task.BETA, task.HYPERPARAMETERS


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def upload_rows(sdk, rows: list[dict], name: str = "prompts.jsonl"):
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return sdk.files.create(file=(name, io.BytesIO(body)), purpose="fine-tune")


def train(stack, sdk, file_id: str, **hp):
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=file_id,
        seed=1,
        method={"type": "egpo", "egpo": {"hyperparameters": {**HP, **hp}}},
    )
    assert job.method.type == "egpo"
    return wait_done(sdk, job.id, timeout=300)


def test_egpo_beats_the_base_on_a_non_transitive_judge(stack, sdk, tmp_path):
    t0 = time.monotonic()
    prompts = upload_rows(sdk, task.prompt_rows(32))
    assert prompts.status == "processed"
    egpo = train(stack, sdk, prompts.id)
    wall = time.monotonic() - t0
    assert egpo.status == "succeeded", egpo.error
    oipo = train(stack, sdk, prompts.id, extragradient=False)
    assert oipo.status == "succeeded", oipo.error

    events = list(sdk.fine_tuning.jobs.list_events(egpo.id, limit=200))
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert len(metrics) == 60
    assert [m["egpo_half"] for m in metrics[:4]] == [0.0, 1.0, 0.0, 1.0]
    assert {"loss", "win_rate_y", "win_rate_y_prime", "kl", "completion_length"} <= (
        metrics[-1].keys()
    )
    oipo_metrics = [e.data for e in sdk.fine_tuning.jobs.list_events(oipo.id, limit=200)
                    if e.type == "metrics"]  # fmt: skip
    assert {m["egpo_half"] for m in oipo_metrics} == {0.0}

    base = task.sample_classes(stack.model_dir, 8)
    results = {}
    for name, job in (("EGPO", egpo), ("online IPO", oipo)):
        final, ckpt = download_final(stack, sdk, job.id, tmp_path / name.replace(" ", "_"))
        assert final.step_number == 60
        trained = task.sample_classes(ckpt, 8)
        results[name] = (task.win_rate(trained, base), task.mix(trained))
    ref = task.mix(base)
    star = task.equilibrium_mix(ref, BETA)
    shown = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
    print(f"\nEGPO e2e ({wall:.1f} s through the API): base style mix a/b/c/other "
          f"{shown(ref)}, regularised equilibrium {shown(star)}")  # fmt: skip
    for name, (win, m) in results.items():
        print(f"  {name}: judged win-rate vs base {win:.3f}, mix {shown(m)}, TV to "
              f"equilibrium {task.tv(m, star):.3f} (base {task.tv(ref, star):.3f})")  # fmt: skip

    win, trained_mix = results["EGPO"]
    assert task.win_rate(base, base) == 0.5  # the baseline the win-rate is read against
    assert win >= 0.53
    other = task.CLASSES.index("other")
    assert trained_mix[other] < ref[other] - 0.05  # the dominated style is shed...
    assert max(trained_mix[:3]) < 0.7 and min(trained_mix[:3]) > 0.05  # ...without collapse


def test_a_prompt_less_row_is_refused(stack, sdk):
    body = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"answer": "Heidi"}\n'
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="fine-tune")
    assert "line 2" in str(exc.value)
    # rows with answers are not prompts: an EGPO job on a chat file is a 400 naming the file
    chat = upload_rows(sdk, [{"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a"}]}])  # fmt: skip
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(
            model=str(stack.model_dir),
            training_file=chat.id,
            method={"type": "egpo", "egpo": {"hyperparameters": {"judge": task.JUDGE}}},
        )
    err = exc.value.body
    assert err["param"] == "training_file" and "prompt_only" in err["message"]


def test_bad_egpo_requests_are_a_400_naming_the_field(stack, sdk):
    prompts = upload_rows(sdk, task.prompt_rows(2))
    cases = [
        ({"judge": {"type": "oracle"}}, "method.egpo.hyperparameters.judge", "unknown judge"),
        ({"judge": task.JUDGE, "max_steps": 5}, "method.egpo.hyperparameters", "must be even"),
        (
            {"judge": {"type": "reward_model", "model": "/nonexistent/judge"}},
            "method.egpo.hyperparameters.judge.model",
            "",
        ),
    ]
    for hp, param, fragment in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.fine_tuning.jobs.create(
                model=str(stack.model_dir),
                training_file=prompts.id,
                method={"type": "egpo", "egpo": {"hyperparameters": hp}},
            )
        err = exc.value.body
        assert err["param"].startswith(param) and fragment in err["message"], err
