"""Fixtures shared by the trainer tests of this folder."""

from __future__ import annotations

import pytest


@pytest.fixture
def rewards(monkeypatch):
    """(completions, the trainer's rewards per grader, prompts) of every batch the GRPO
    trainer scored, recorded from its ``_calculate_rewards``."""
    from trainers.algorithms.grpo.trainer import PosttrainGRPOTrainer

    seen = []
    original = PosttrainGRPOTrainer._calculate_rewards

    def spy(self, inputs, prompts, completions, completion_ids_list):
        out = original(self, inputs, prompts, completions, completion_ids_list)
        seen.append((completions, out.detach().cpu(), prompts))
        return out

    monkeypatch.setattr(PosttrainGRPOTrainer, "_calculate_rewards", spy)
    return seen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model (seed 0), built once per test module."""
    from trainers.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)
