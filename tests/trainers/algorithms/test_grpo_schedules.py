"""Each GRPO preset takes its paper's update schedule, so its clipping acts on a real run.

With one policy update per generated batch the sampling policy is the trained one, the
ratio is 1 and no clip can bind: DAPO's clip-higher, NGRPO's asymmetric widths and HAPO's
adaptive clip would all be the plain policy gradient. The presets now take several
updates per batch (``docs/algorithms/grpo.md``, "Update schedules"); DeepSeekMath's GRPO
takes one by its paper's design. Runs go through the real runner on the tiny model
(``bench/grpo_clip.py``, 64 prompts, 2 a step, lr 5e-3).
"""

from __future__ import annotations

import pytest

from bench.grpo_clip import clip_fractions, run
from trainers.contract.methods.grpo import GRPOHyperparameters, resolve

SCHEDULES = {"grpo": 1, "dapo": 16, "dr_grpo": 8, "ngrpo": 4, "xrpo": 16, "hapo": 16}


def test_each_preset_has_its_recipes_schedule_and_a_request_overrides_it():
    for variant, updates in SCHEDULES.items():
        s = resolve(variant, GRPOHyperparameters())
        assert (s.steps_per_generation, s.num_iterations) == (updates, 1), variant
    mine = GRPOHyperparameters(steps_per_generation=2, num_iterations=3)
    s = resolve("dapo", mine)
    assert (s.steps_per_generation, s.num_iterations) == (2, 3)


@pytest.mark.parametrize("variant", ["dapo", "dr_grpo", "ngrpo", "xrpo", "hapo"])
def test_the_clip_binds_under_each_presets_defaults(model_dir, tmp_path, variant):
    logs = run(variant, model_dir, tmp_path, steps=4, one_update=False)
    assert clip_fractions(logs)["region"] > 0, variant
    # the first update after a generation trains the policy that sampled: ratio 1
    assert (logs[0].get("clip_ratio/region_mean") or 0.0) == 0.0


def test_one_update_per_batch_never_clips(model_dir, tmp_path):
    """DeepSeekMath's recipe (and any preset asked for one update): ratio 1, no clip."""
    logs = run("ngrpo", model_dir, tmp_path, steps=4, one_update=True)
    assert clip_fractions(logs)["region"] == 0.0
