"""API settings: the worker's settings plus what only the HTTP side needs.

Built once in ``create_app`` (never at import time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

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
    max_line_bytes: int = Field(
        16 << 20, ge=1024, description="Longest accepted line of an uploaded JSONL file."
    )
    file_sweep_seconds: float = Field(
        60.0, gt=0, description="How often the API deletes files past their expires_at."
    )
    docs_access: Literal["auth", "public", "off"] = Field(
        "auth",
        description="/docs and /openapi.json: 'auth' = need an API key when keys are set, "
        "'public' = open to all, 'off' = not served.",
    )
    organization_id: str = Field("org-posttrain", description="organization_id on job objects.")
    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _unset_file(cls, value: object) -> object:
        return None if value == "" else value  # compose passes unset variables as ""

    def key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def model_root_dirs(self) -> list[Path]:
        roots = [Path(p) for p in self.model_roots.split(":") if p.strip()]
        return roots or [Path(self.data_dir) / "models"]
