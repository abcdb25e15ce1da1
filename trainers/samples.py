"""Samples of an RL run's rollouts: which steps report them, and how many rows.

A trainer whose method records samples (``records_samples`` on its contract model: the
GRPO family) builds the rows of a scored rollout batch (prompt, completion, rewards,
advantage; ``trainers.contract.messages.SampleRow``) and hands them to the run's
``SampleRecorder``, which the runner attaches to the trainer from the job's
``sample_every_steps``/``sample_rows`` in the reporting process only. A batch is sampled
when at least ``every`` steps have passed since the last sample, so a method that
generates once for several optimizer steps reports once per generated batch at most.
The same rows (validated and cut as the job stores them) go to the tables of the job's
trackers (``trainers.trackers``), each of which guards itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from trainers.reporting import Reporter


class SampleTable(Protocol):
    def samples(self, step: int, rows: list) -> None: ...


class SampleRecorder:
    def __init__(
        self, reporter: Reporter, every: int, rows: int, tables: Sequence[SampleTable] = ()
    ):
        self.reporter, self.every, self.rows = reporter, every, rows
        self.tables = tables
        self.last: int | None = None

    def due(self, step: int) -> bool:
        """Whether the rollout batch that trains ``step`` is sampled."""
        return self.every > 0 and (self.last is None or step - self.last >= self.every)

    def send(self, step: int, rows: list[dict[str, Any]]) -> None:
        rows = rows[: self.rows]
        if rows:
            sent = self.reporter.samples(step, rows)
            for table in self.tables:
                table.samples(step, sent.rows)
        self.last = step
