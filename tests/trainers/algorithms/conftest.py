"""Fixtures shared by the GRPO trainer tests."""

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
