"""A job's directory on the data volume: where everything a job's runs read and write lives.

``jobs/{id}/`` holds (each path has one accessor here, used by the supervisor, the
file store, the report journals and the API's model access alike):

    inputs/{file_id}.jsonl        the job's own links to its files, made at first start
    output/checkpoint-{step}/     checkpoints (``trainers.contract.checkpoints``)
    output/trackers/{type}/       the job's W&B, TensorBoard and MLflow runs
                                  (``trainers.contract.integrations``)
    plan-{attempt}.json           the run plan of each attempt
    accelerate-{attempt}.json     the launcher's config of a multi-process attempt
    fence                         the fencing token of the claim that owns the job
    reports/{fence}-{attempt}.jsonl  the trainer's journal of its report lines
    pause-{attempt}               the flag that asks every rank of a run to pause
    train.log, vllm.log           the training process's and the rollout server's output

A job id that could leave ``jobs/`` (empty, ``.``, ``..``, or with a ``/``) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainers.contract.integrations import tracker_dir


@dataclass(frozen=True)
class JobDir:
    data_dir: Path
    job_id: str

    def __post_init__(self) -> None:
        if not self.job_id or "/" in self.job_id or self.job_id in (".", ".."):
            raise ValueError(f"not a job id: {self.job_id!r}")
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    @property
    def root(self) -> Path:
        return self.data_dir / "jobs" / self.job_id

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    def input(self, file_id: str) -> Path:
        return self.inputs / f"{file_id}.jsonl"

    @property
    def output(self) -> Path:
        """The run's output directory: its checkpoints."""
        return self.root / "output"

    def tracker(self, kind: str) -> Path:
        """Where the job's tracker of ``kind`` (an integration type) writes."""
        return tracker_dir(self.output, kind)

    def plan(self, attempt: int) -> Path:
        return self.root / f"plan-{attempt}.json"

    def launcher_config(self, attempt: int) -> Path:
        return self.root / f"accelerate-{attempt}.json"

    @property
    def fence(self) -> Path:
        return self.root / "fence"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def journal(self, fence: int | None, attempt: int) -> Path:
        """Where the run of ``attempt`` under the claim ``fence`` journals its report lines."""
        return self.reports / f"{fence or 0}-{attempt}.jsonl"

    def pause_flag(self, attempt: int) -> Path:
        return self.root / f"pause-{attempt}"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def vllm_log(self) -> Path:
        return self.root / "vllm.log"
