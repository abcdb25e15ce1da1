"""API settings: the worker's settings plus what only the HTTP side needs.

Built once in ``create_app`` (never at import time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from trainers.contract.resources import check_queue_name
from workers.settings import WorkerSettings


class ApiSettings(WorkerSettings):
    api_keys: str = Field(
        "", description="Comma-separated bearer tokens, each its own tenant; empty = auth off."
    )
    api_keys_file: Path | None = Field(
        None, description="JSON or TOML file of named tenants with hashed keys (service/auth.py)."
    )
    insecure_no_auth: bool = Field(
        False, description="Allow serving without keys on a non-loopback address."
    )
    model_roots: str = Field(
        "",
        description="Colon-separated directories local models may be loaded from; "
        "empty = <data_dir>/models.",
    )
    hub_access: bool = Field(
        False, description="Accept Hugging Face Hub ids as models (the worker downloads them)."
    )
    max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest accepted upload.")
    grader_workers: int = Field(
        4, ge=1, le=256, description="Threads that wait on grader runs and regex checks."
    )
    grader_runs_per_tenant: int = Field(
        2, ge=1, le=256, description="Grader runs and regex checks one tenant may have in flight."
    )
    max_body_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest request body of every route but the upload (413 beyond it).",
    )
    max_line_bytes: int = Field(
        16 << 20, ge=1024, description="Longest accepted line of an uploaded JSONL file."
    )
    file_sweep_seconds: float = Field(
        60.0,
        gt=0,
        description="How often the API deletes files past their expires_at and fails jobs "
        "waiting on an unserved queue past unserved_queue_seconds.",
    )
    docs_access: Literal["auth", "public", "off"] = Field(
        "auth",
        description="/docs and /openapi.json: 'auth' = need an API key when keys are set, "
        "'public' = open to all, 'off' = not served.",
    )
    metrics_access: Literal["admin", "public", "off"] = Field(
        "admin",
        description="GET /metrics (Prometheus): 'admin' = need an admin tenant's key when "
        "keys are set, 'public' = open to all (a scraper on a private network), 'off' = not "
        "served.",
    )
    webhook_allowed_networks: str = Field(
        "",
        description="Comma-separated networks (CIDR) webhook endpoints may resolve to besides "
        "public addresses, e.g. 10.0.0.0/8 for receivers on a private network.",
    )
    webhook_retry_seconds: float = Field(
        10.0,
        gt=0,
        description="First wait before a failed webhook delivery is retried; "
        "each later wait doubles (at most an hour).",
    )
    webhook_max_age_seconds: float = Field(
        86400.0,
        gt=0,
        description="A webhook delivery is retried until this long after "
        "its event, then marked failed.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="How long one webhook delivery waits for the endpoint."
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often the API looks for new events and due deliveries."
    )
    queues: str = Field(
        "",
        description="Comma-separated worker queues jobs may name besides POSTTRAIN_QUEUE and "
        "the queues live workers serve (e.g. a GPU class whose workers start on demand).",
    )
    unserved_queue_seconds: float = Field(
        3600.0,
        gt=0,
        description="A job queued on a queue that no live worker has served for this long "
        "fails (code no_worker).",
    )
    organization_id: str = Field("org-posttrain", description="organization_id on job objects.")
    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _unset_file(cls, value: object) -> object:
        return None if value == "" else value  # compose passes unset variables as ""

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, value: str) -> str:
        for name in value.split(","):
            if name.strip():
                check_queue_name(name.strip())
        return value

    def queue_names(self) -> frozenset[str]:
        """The queues the server offers whether or not a worker is live on them."""
        return frozenset({self.queue, *(q.strip() for q in self.queues.split(",") if q.strip())})

    def key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def model_root_dirs(self) -> list[Path]:
        roots = [Path(p) for p in self.model_roots.split(":") if p.strip()]
        return roots or [Path(self.data_dir) / "models"]
