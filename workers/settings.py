"""Worker-side settings, read from the environment once per process (never at import).

The API's settings extend these (``service.settings``): both processes must agree
on Redis, the data directory and the queue name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainers.contract.graders.judgeendpoints import JudgeEndpoints, parse_endpoints
from trainers.contract.integrations import TrackerPolicy, parse_uri_list
from trainers.contract.outbound import ToolPolicy, allowed_networks
from trainers.contract.resources import check_queue_name
from trainers.contract.sandbox import SandboxPolicy


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTTRAIN_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job records and Celery broker.")
    broker_url: str | None = Field(None, description="Celery broker; default = redis_url.")
    data_dir: Path = Field(Path("./posttrain-data"), description="Uploads and checkpoints.")
    queue: str = Field("posttrain.gpu", description="Celery queue the workers consume.")
    key_prefix: str = Field("posttrain:", description="Prefix of every Redis key posttrain owns.")
    checkpoint_every_steps: int = Field(50, ge=1, description="Default checkpoint interval.")
    keep_checkpoints: int = Field(
        3, ge=0, description="Checkpoints a job keeps besides its final one (0 = all)."
    )
    events_maxlen: int = Field(
        10_000, ge=100, description="Approximate cap on a job's events stream (XADD MAXLEN ~)."
    )
    metrics_maxlen: int = Field(
        100_000, ge=100, description="Approximate cap on a job's metrics stream, in steps."
    )
    samples_maxlen: int = Field(
        2_000,
        ge=10,
        description="Approximate cap on an RL job's samples stream, in rows (oldest dropped).",
    )
    lease_seconds: float = Field(30.0, gt=1, description="A job's lease lasts this long unrenewed.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often the supervisor renews.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job before it is failed for good.")
    eval_runs_per_tenant: int = Field(
        2,
        ge=0,
        description="Eval runs of one tenant graded at once (0 = no limit); the others wait "
        "queued for a slot. A tenant's max_concurrent_eval_runs (key file) overrides it.",
    )
    cancel_grace_seconds: float = Field(5.0, ge=0, description="SIGTERM to SIGKILL delay.")
    train_threads: int | None = Field(
        None, ge=1, description="torch threads per job, shared by its training processes."
    )
    concurrency: int = Field(
        1,
        ge=1,
        description="Jobs at once per worker (CPU workers only: a GPU worker gives each job "
        "all its devices, so it runs one job at a time; start a worker per GPU set).",
    )
    worker_gpus: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9,-]*$",
        description="The worker's devices (CUDA_VISIBLE_DEVICES of its training processes), "
        "e.g. '0,1'; '' = CPU-only; unset = every GPU nvidia-smi lists (none without it).",
    )
    exit_deadline_seconds: float = Field(
        120.0, gt=0, description="A trainer still alive this long after its final report is killed."
    )
    stall_seconds: float = Field(
        1800.0, gt=0, description="No report line for this long: the run is stopped as stalled."
    )
    report_flush_seconds: float = Field(
        3600.0, gt=0, description="Report lines are held this long for Redis after a run ends."
    )
    requeue_grace_seconds: float = Field(
        60.0, gt=0, description="A job queued this long with no broker message is re-enqueued."
    )
    redis_socket_timeout: float = Field(5.0, gt=0, description="Seconds a Redis call may block.")
    redis_connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to Redis.")
    redis_retries: int = Field(3, ge=0, description="Retries of a Redis call on connection errors.")
    redis_retry_cap: float = Field(1.0, gt=0, description="Longest backoff between retries (s).")
    redis_health_check_interval: int = Field(
        15, ge=0, description="Idle pooled connections are PINGed before reuse after this many s."
    )
    vllm_command: str = Field(
        "vllm", description="The vLLM executable a worker starts for server-mode rollouts."
    )
    vllm_server_gpus: str | None = Field(
        None, description="CUDA_VISIBLE_DEVICES of the vLLM server; default = inherited."
    )
    vllm_start_timeout: float = Field(
        600.0, gt=0, description="Seconds a starting vLLM server may take to answer /health."
    )
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="How a job's wandb integration runs: 'offline' writes the run directory "
        "into the job's output (downloadable; no network needed), 'online' sends it to W&B "
        "with the worker's own credentials (WANDB_API_KEY), 'disabled' refuses the "
        "integration.",
    )
    mlflow_tracking_uris: str = Field(
        "",
        description="Comma-separated MLflow tracking URIs a job's mlflow integration may "
        "name (exact match); empty = jobs log only to their own file store.",
    )

    # RL jobs' tools (trainers.contract.tools): who may be called, and how much is read.
    tool_allowed_networks: str = Field(
        "",
        description="Comma-separated networks (CIDR) tool endpoints may resolve to besides "
        "public addresses, e.g. 10.0.0.0/8; loopback, private and link-local are refused "
        "otherwise.",
    )
    tool_url_prefixes: str = Field(
        "",
        description="Comma-separated URL prefixes every tool endpoint must start with "
        "(e.g. https://tools.example.com/); empty = any URL the address rule allows.",
    )
    tool_max_reply_bytes: int = Field(
        65536, ge=16, description="Largest tool reply a rollout reads, whatever the job asks."
    )
    judge_endpoints: str = Field(
        "",
        description="JSON {name: {base_url, api_key_env, models, ...}}: OpenAI-compatible "
        "endpoints a training job's score_model / label_model may ask as judges (README, "
        "'Judges in training jobs'); empty = none.",
    )

    # OpenAI's python grader (trainers.contract.graders.python), run in bubblewrap.
    python_grader: Literal["off", "bwrap"] = Field(
        "off",
        description="'bwrap': python graders are accepted and run in a bubblewrap sandbox "
        "(the workers, and the API for /graders/run, need bwrap and user namespaces); "
        "'off': they are refused at creation.",
    )
    python_grader_memory_mb: int = Field(
        512, ge=32, description="Address space of one python grader sandbox, in MiB."
    )
    python_grader_cpu_seconds: int = Field(
        10, ge=1, description="CPU seconds of one python grader sandbox (one batch of rows)."
    )
    python_grader_wall_seconds: float = Field(
        20.0, gt=0, description="Wall-clock seconds of one python grader sandbox."
    )
    python_grader_interpreter: str = Field(
        "",
        description="The Python run in the sandbox (its prefix is bound read-only); empty = "
        "/usr/bin/python3 where it exists, else the worker's own interpreter.",
    )

    # Inference (``posttrain inference`` and the API's chat/completions routes).
    inference_queue: str = Field(
        "posttrain.inference",
        description="Queue (class) of inference workers the API sends chat and completion "
        "requests to.",
    )
    inference_token: str | None = Field(
        None,
        description="Shared secret the API presents to inference workers (Bearer); unset = "
        "the workers accept requests from anyone who reaches their port.",
    )
    inference_max_tokens: int = Field(
        4096, ge=1, description="Largest max_tokens / max_completion_tokens a request may ask."
    )
    inference_max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    inference_timeout_seconds: float = Field(
        600.0, gt=0, description="Longest a proxied chat or completion request may take."
    )

    @field_validator("queue", "inference_queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        return check_queue_name(value)

    @field_validator("mlflow_tracking_uris")
    @classmethod
    def _uri_list(cls, value: str) -> str:
        for uri in parse_uri_list(value):
            if "://" not in uri:
                raise ValueError(f"'{uri}' is not a URI (scheme://...)")
        return value

    def tracker_policy(self) -> TrackerPolicy:
        """What the server lets a job's trackers do (``trainers.contract.integrations``)."""
        return TrackerPolicy(
            wandb_mode=self.wandb_mode,
            mlflow_tracking_uris=parse_uri_list(self.mlflow_tracking_uris),
        )

    @field_validator("tool_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        allowed_networks(value)  # a ValueError names the bad entry
        return value

    @field_validator("judge_endpoints")
    @classmethod
    def _judges(cls, value: str) -> str:
        parse_endpoints(value)  # a ValueError names the setting and the field
        return value

    def judges(self) -> JudgeEndpoints:
        """The judge endpoints (``trainers.contract.graders.judgeendpoints``)."""
        return parse_endpoints(self.judge_endpoints)

    def tool_policy(self) -> ToolPolicy:
        """What the server lets an RL job's tools call (``trainers.contract.outbound``)."""
        return ToolPolicy(
            allowed_networks=self.tool_allowed_networks,
            url_prefixes=[p.strip() for p in self.tool_url_prefixes.split(",") if p.strip()],
            max_reply_bytes=self.tool_max_reply_bytes,
        )

    def sandbox_policy(self) -> SandboxPolicy:
        """How python graders run here (``trainers.contract.sandbox``)."""
        return SandboxPolicy(
            mode=self.python_grader,
            memory_mb=self.python_grader_memory_mb,
            cpu_seconds=self.python_grader_cpu_seconds,
            wall_seconds=self.python_grader_wall_seconds,
            interpreter=self.python_grader_interpreter,
        )

    @property
    def broker_key_prefix(self) -> str:
        """Every key of Celery's Redis transport starts with this (kombu's
        ``global_keyprefix``): queues are never names of posttrain's own keys."""
        return f"{self.key_prefix}celery:"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    def threads_per_job(self) -> int:
        if self.train_threads:
            return self.train_threads
        return max(1, (os.cpu_count() or 1) // self.concurrency)
