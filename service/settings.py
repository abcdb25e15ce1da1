"""API settings: the worker's settings plus what only the HTTP side needs.

Built once in ``create_app`` (never at import time).
"""

from __future__ import annotations

from pydantic import Field

from workers.settings import WorkerSettings


class ApiSettings(WorkerSettings):
    api_keys: str = Field("", description="Comma-separated bearer tokens; empty = auth off.")
    max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest accepted upload.")
    organization_id: str = Field("org-posttrain", description="organization_id on job objects.")
    host: str = "127.0.0.1"
    port: int = 8000

    def key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())
