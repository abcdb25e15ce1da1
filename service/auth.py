"""Tenants: who an API key belongs to, and what that tenant may see.

A key ring maps the sha256 of each API key to a tenant. It is built once per API
process from two sources:

* ``POSTTRAIN_API_KEYS_FILE``: a JSON or TOML file of named tenants, each with
  the sha256 hex digests of its keys (never the keys themselves), an optional
  quota of concurrent jobs, an optional limit on its eval runs graded at once (else
  ``POSTTRAIN_EVAL_RUNS_PER_TENANT``), an optional list of the worker queues its jobs
  may use and an optional ``admin`` flag::

      [tenants.team-a]
      keys = ["<sha256 hex of the key>"]
      max_active_jobs = 2
      max_concurrent_eval_runs = 4
      queues = ["posttrain.gpu"]

      [tenants.ops]
      keys = ["<sha256 hex>"]
      admin = true

* ``POSTTRAIN_API_KEYS=k1,k2`` (the first release's form): each listed key is a
  tenant of its own, named ``key-`` plus the first 12 hex digits of its sha256.

No key at all means auth is off: every request is the ``default`` tenant.
Records written before tenants existed carry no tenant and belong to ``default``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from trainers.contract.outbound import TenantOutbound, ToolPolicy
from trainers.contract.resources import check_queue_name
from workers.store import DEFAULT_TENANT

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The form a key is stored in: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False
    max_active_jobs: int | None = None
    queues: frozenset[str] | None = None  # None: every queue the server offers
    max_concurrent_eval_runs: int | None = None  # None: the server's setting; 0: no limit
    # Its own rules for the URLs its jobs call (trainers.contract.outbound.TenantOutbound).
    tool_allowed_networks: tuple[str, ...] = ()
    tool_url_prefixes: tuple[str, ...] = ()

    def outbound(self) -> TenantOutbound:
        return TenantOutbound(
            allowed_networks=list(self.tool_allowed_networks),
            url_prefixes=list(self.tool_url_prefixes),
        )

    def tool_policy(self, server: ToolPolicy) -> ToolPolicy:
        """The server's outbound policy with this tenant's own rules on top."""
        return server.for_tenant(self.outbound())

    def eval_run_slots(self, default: int) -> int:
        """How many of the tenant's eval runs may be graded at once (0 = no limit)."""
        return default if self.max_concurrent_eval_runs is None else self.max_concurrent_eval_runs

    def may_use(self, queue: str) -> bool:
        return self.admin or self.queues is None or queue in self.queues

    def owns(self, record: dict) -> bool:
        """A record is visible to its own tenant and to admins (no tenant = default)."""
        return self.admin or (record.get("tenant") or DEFAULT_TENANT) == self.name


DEFAULT = Tenant(DEFAULT_TENANT)


class KeyFileError(ValueError):
    """The key file cannot be used; the message says why."""


def _outbound_rule(**rule: list[str]) -> TenantOutbound:
    """One field of a tenant's outbound rules, checked by the contract's own model; its
    error raised as this field's (so it names the tenant entry's field, not the model's)."""
    try:
        return TenantOutbound(**rule)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(min_length=1, description="sha256 hex digests of the keys.")
    admin: bool = False
    max_active_jobs: int | None = Field(None, ge=1)
    max_concurrent_eval_runs: int | None = Field(
        None, ge=0, description="Eval runs graded at once (0 = no limit); unset = the setting."
    )
    queues: list[str] | None = Field(
        None, min_length=1, description="Worker queues the tenant's jobs may use; unset = all."
    )
    tool_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Non-public CIDR networks this tenant's tools, environments and endpoint "
        "graders may reach, besides the server's POSTTRAIN_TOOL_ALLOWED_NETWORKS.",
    )
    tool_url_prefixes: list[str] = Field(
        default_factory=list,
        description="This tenant's tool, environment and endpoint-grader URLs must start "
        "with one of these (and with one of POSTTRAIN_TOOL_URL_PREFIXES, if set).",
    )

    @field_validator("tool_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _outbound_rule(allowed_networks=value).allowed_networks

    @field_validator("tool_url_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        return _outbound_rule(url_prefixes=value).url_prefixes

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, queues: list[str] | None) -> list[str] | None:
        return None if queues is None else [check_queue_name(q) for q in queues]

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        keys = [k.strip().lower().removeprefix("sha256:") for k in keys]
        bad = [k for k in keys if not _HEX64.match(k)]
        if bad:
            raise ValueError(
                "keys are stored as sha256 hex digests (64 hex characters), not as the keys "
                "themselves; print one with 'posttrain keys hash'"
            )
        return keys


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, _TenantEntry]


class KeyRing:
    """sha256(key) -> Tenant. Empty ring = auth off."""

    def __init__(self, by_hash: dict[str, Tenant] | None = None):
        self.by_hash = dict(by_hash or {})

    @property
    def enabled(self) -> bool:
        return bool(self.by_hash)

    def tenant_for(self, token: str) -> Tenant | None:
        """The key's tenant, or None. Looks up the key's digest, so lookup time says nothing
        about how much of a key matched."""
        return self.by_hash.get(hash_key(token)) if token else None

    def tenants(self) -> dict[str, Tenant]:
        return {t.name: t for t in self.by_hash.values()}

    @classmethod
    def load(cls, api_keys: str = "", keys_file: Path | None = None) -> KeyRing:
        ring: dict[str, Tenant] = {}

        def add(digest: str, tenant: Tenant, where: str) -> None:
            other = ring.get(digest)
            if other is not None and other != tenant:
                raise KeyFileError(
                    f"{where}: one key is listed for '{other.name}' and "
                    f"'{tenant.name}'; a key belongs to one tenant"
                )
            ring[digest] = tenant

        for key in (k.strip() for k in api_keys.split(",")):
            if key:
                digest = hash_key(key)
                add(digest, Tenant(f"key-{digest[:12]}"), "POSTTRAIN_API_KEYS")
        if keys_file is not None:
            for name, entry in read_key_file(Path(keys_file)).tenants.items():
                queues = None if entry.queues is None else frozenset(entry.queues)
                tenant = Tenant(
                    name,
                    entry.admin,
                    entry.max_active_jobs,
                    queues,
                    max_concurrent_eval_runs=entry.max_concurrent_eval_runs,
                    tool_allowed_networks=tuple(entry.tool_allowed_networks),
                    tool_url_prefixes=tuple(entry.tool_url_prefixes),
                )
                for digest in entry.keys:
                    add(digest, tenant, str(keys_file))
        return cls(ring)


def read_key_file(path: Path) -> KeyFile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"API key file {path} cannot be read: {exc.strerror}") from None
    # by its suffix; a file with neither (a Docker secret has none) by its first character
    is_json = path.suffix == ".json" or (path.suffix != ".toml" and text.lstrip().startswith("{"))
    try:
        raw = json.loads(text) if is_json else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if is_json else "TOML"
        raise KeyFileError(f"API key file {path} is not valid {kind}: {exc}") from None
    try:
        parsed = KeyFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise KeyFileError(f"API key file {path}: {where}: {msg}") from None
    for name in parsed.tenants:
        if not TENANT_NAME.match(name):
            raise KeyFileError(
                f"API key file {path}: tenant name '{name}' must be 1-64 letters, digits, "
                "'_', '.' or '-', starting with a letter or digit"
            )
    return parsed


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; a hostname or wildcard is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, ring: KeyRing, insecure_no_auth: bool) -> str | None:
    """Why the API must not listen on ``host`` (None = it may)."""
    if ring.enabled or insecure_no_auth or is_loopback(host):
        return None
    return (
        f"refusing to serve the API on {host} without authentication: anyone who can reach "
        "that address could read and delete every file, job and checkpoint. Set "
        "POSTTRAIN_API_KEYS or POSTTRAIN_API_KEYS_FILE (see 'posttrain keys add'), bind "
        "127.0.0.1, or pass --insecure-no-auth (POSTTRAIN_INSECURE_NO_AUTH=1) if something "
        "in front of the API authenticates callers"
    )
