"""The run plan: what the supervisor hands one training process (torch-free).

The job spec names files by id; the plan resolves them to paths on the data
volume and adds the worker's settings for this run (threads, checkpoint
interval, attempt number, what the job's trackers may do). Written as JSON by
``workers.supervisor``, read by ``trainers.run``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from trainers.contract.graders.judgeendpoints import JudgeEndpoints
from trainers.contract.integrations import TrackerPolicy
from trainers.contract.outbound import ToolPolicy
from trainers.contract.sandbox import SandboxPolicy
from trainers.contract.spec import JobSpec


class RunPlan(BaseModel):
    job_id: str
    spec: JobSpec
    training_path: Path
    validation_path: Path | None = None
    output_dir: Path
    data_dir: Path
    checkpoint_every_steps: int = 50
    threads: int = 1
    attempt: int = 1
    vllm_server_url: str | None = None  # a vLLM server the worker started for this run
    fence: int | None = None  # this run's fencing token (trainers.contract.fencing)
    fence_file: Path | None = None  # the job's fence file; a checkpoint is written only
    # while it still holds ``fence``
    report_journal: Path | None = None  # the trainer also appends its report lines here
    processes: int = 1  # training processes (ranks) of this run; threads is per process
    pause_path: Path | None = None  # a file whose existence asks every rank to pause
    model_name: str | None = None  # the model as the job named it (spec.model is its path)
    # how the job's integrations run: the worker's W&B mode and allowed MLflow servers
    trackers: TrackerPolicy = Field(default_factory=TrackerPolicy)
    # what the job's tools may call (the worker's outbound policy); header values are not
    # here: they reach the process in its environment (trainers.contract.tools)
    tools: ToolPolicy = Field(default_factory=ToolPolicy)
    # how the job's python graders run (the worker's sandbox settings; default: off)
    python_graders: SandboxPolicy = Field(default_factory=SandboxPolicy)
    # the OpenAI-compatible endpoints score_model / label_model graders may ask (the
    # worker's POSTTRAIN_JUDGE_ENDPOINTS); their keys are not here: each endpoint names
    # the environment variable holding its key, which the process inherits
    judges: JudgeEndpoints = Field(default_factory=lambda: JudgeEndpoints({}))

    def relative(self, path: Path) -> str:
        """A path as stored in records: relative to the data dir, so volumes can move."""
        return str(Path(path).resolve().relative_to(Path(self.data_dir).resolve()))
