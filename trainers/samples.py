"""Samples of an RL run's rollouts: which steps report them, and how many rows.

A trainer whose method records samples (``records_samples`` on its contract model: the
GRPO family) builds the rows of a scored rollout batch (prompt, completion, rewards,
advantage; ``trainers.contract.messages.SampleRow``) and hands them to the run's
``SampleRecorder``, which the runner attaches to the trainer from the job's
``sample_every_steps``/``sample_rows`` in the reporting process only. A batch is sampled
when at least ``every`` steps have passed since the last sample, so a method that
generates once for several optimizer steps reports once per generated batch at most.
"""

from __future__ import annotations

from typing import Any

from trainers.reporting import Reporter


class SampleRecorder:
    def __init__(self, reporter: Reporter, every: int, rows: int):
        self.reporter, self.every, self.rows = reporter, every, rows
        self.last: int | None = None

    def due(self, step: int) -> bool:
        """Whether the rollout batch that trains ``step`` is sampled."""
        return self.every > 0 and (self.last is None or step - self.last >= self.every)

    def send(self, step: int, rows: list[dict[str, Any]]) -> None:
        rows = rows[: self.rows]
        if rows:
            self.reporter.samples(step, rows)
        self.last = step
