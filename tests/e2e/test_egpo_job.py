"""EGPO through the official ``openai`` SDK against the real API and worker.

The task (``bench/egpo_task.py``): three answer styles that cover every text (the
answer's first character: a letter a-s, a letter t-z, anything else) and a
``pattern_table`` judge that prefers them in a cycle, a ≻ b ≻ c ≻ a at 0.9. The game
then is the tabular 3-cycle of ``docs/algorithms/egpo.md`` on each prompt's style mix,
so its regularised
equilibrium is known exactly from the base model's mix. The tiny model is trained by
EGPO; the final checkpoint's style mix (exact, from the next-token probabilities, and
checked against sampled answers) must beat the base under the judge, end much closer to
the equilibrium than the base is, and not collapse onto one style. Online IPO on the same
data and seed is compared in ``python -m bench.egpo_vs_grpo --curve``, not here: it ends
near the equilibrium on some seeds and far from it on others.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter

import openai
import pytest
from openai import OpenAI

from bench import egpo_task as task
from tests.e2e.test_dpo_job import download_final, wait_done

pytestmark = pytest.mark.e2e
HP = task.HYPERPARAMETERS
STEPS = HP["max_steps"]


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
    return wait_done(sdk, job.id, timeout=600)


def test_egpo_moves_toward_the_equilibrium_of_a_cyclic_judge(stack, sdk, tmp_path):
    t0 = time.monotonic()
    prompts = upload_rows(sdk, task.prompt_rows(task.PROMPTS))
    assert prompts.status == "processed"
    job = train(stack, sdk, prompts.id)
    wall = time.monotonic() - t0
    assert job.status == "succeeded", job.error

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=200))
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert len(metrics) == STEPS
    assert [m["egpo_half"] for m in metrics[:4]] == [0.0, 1.0, 0.0, 1.0]
    assert {"loss", "win_rate_y", "win_rate_y_prime", "kl", "completion_length"} <= (
        metrics[-1].keys()
    )
    final, ckpt = download_final(stack, sdk, job.id, tmp_path / "egpo")
    assert final.step_number == STEPS

    base = task.style_probabilities(stack.model_dir)  # [prompts, 3], exact
    trained = task.style_probabilities(ckpt)
    star = task.equilibrium(base)
    # the exact mix is what the sampler draws: 1024 sampled answers agree with it
    counts = Counter(task.sample_styles(ckpt, 8))
    sampled = [counts[c] / sum(counts.values()) for c in task.CLASSES]
    assert max(abs(s - e) for s, e in zip(sampled, trained.mean(0).tolist(), strict=True)) < 0.05

    win, win_star = task.win_rate(trained, base), task.win_rate(star, base)
    tv, tv_base = task.tv(trained, star), task.tv(base, star)
    print(f"\nEGPO e2e ({wall:.1f} s through the API, {STEPS} steps x {task.PROMPTS} prompts): "
          f"style mix a/b/c base {task.mean_mix(base)}, equilibrium {task.mean_mix(star)}, "
          f"EGPO {task.mean_mix(trained)} (sampled {[round(x, 3) for x in sampled]}); "
          f"win-rate vs base {win:.3f} (the equilibrium's {win_star:.3f}); TV to the "
          f"equilibrium {tv:.3f} (base {tv_base:.3f})")  # fmt: skip

    assert task.win_rate(base, base) == pytest.approx(0.5)  # what the win-rate is read against
    assert win_star > 0.54  # the equilibrium itself beats the base by this much...
    assert win - 0.5 >= 0.5 * (win_star - 0.5)  # ...and EGPO gets at least half of that gain
    assert tv <= 0.5 * tv_base  # at most half the base's distance to the equilibrium
    assert float(trained.max()) < 0.7  # no style takes over on any prompt (no collapse)


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
