"""Job records in Redis: ``JobStore``, the one object the API and the workers use.

``JobStore`` is combined from parts, one module each:

* ``workers.jobkeys``: the key layout (listed there), the client and the prefix;
* ``workers.jobstate``: the status table and the Lua compare-and-set every status change
  goes through, claims with fencing tokens, lease renewal, requeue of expired leases, and
  the queued index;
* ``workers.jobstreams``: the events, metrics and samples streams and the checkpoint list;
* this module: creating, reading and listing records, the tenants' active counts,
  deleting finished jobs, and Idempotency-Key bindings.

Callers import ``JobStore`` and the state machine's names (``JobStatus``, ``TERMINAL``,
``InvalidTransition``, ``JobNotFound``, ...) from here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Container
from typing import Any

import redis

from workers.jobkeys import encode
from workers.jobstate import (
    TERMINAL,
    TRANSITIONS,
    Claim,
    InvalidTransition,
    JobLifecycle,
    JobNotFound,
    JobStatus,
    legal_sources,
)
from workers.jobstreams import JobStreams

__all__ = [
    "DEFAULT_TENANT",
    "JOB_KEY_SUFFIXES",
    "TERMINAL",
    "TRANSITIONS",
    "Claim",
    "InvalidTransition",
    "JobNotFound",
    "JobStatus",
    "JobStore",
    "encode",
    "legal_sources",
    "new_id",
]

# The owner of records written without a tenant (auth off, or before tenants existed).
DEFAULT_TENANT = "default"

S = JobStatus

# KEYS: job hash, jobs index, lease index, then the job's other keys. ARGV: job id, the
# terminal statuses (comma list). Deletes a finished job's record and keys at once.
_DELETE_JOB = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
local done = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then done = true end end
if not done then return {0, cur} end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1], unpack(KEYS, 4))
return {1, cur}
"""

# A job's own keys besides its hash: ``job:{id}:<suffix>``. DELETE removes every one.
JOB_KEY_SUFFIXES = ("events", "metrics", "samples", "checkpoints", "evalruns", "secrets")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobStore(JobLifecycle, JobStreams):
    """Typed access to job records. One instance per process; thread-safe (redis-py pool)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "posttrain:",
        *,
        events_maxlen: int | None = None,
        metrics_maxlen: int | None = None,
        samples_maxlen: int | None = None,
    ):
        super().__init__(
            client,
            prefix,
            events_maxlen=events_maxlen,
            metrics_maxlen=metrics_maxlen,
            samples_maxlen=samples_maxlen,
        )
        self._delete = client.register_script(_DELETE_JOB)

    # ---- records
    def create(
        self,
        job_id: str,
        spec_json: str,
        status: JobStatus = S.queued,
        *,
        secrets: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict:
        """Write a new job's record. ``secrets`` (the header values of its tools and
        endpoint graders) go to their own key, ``job:{id}:secrets``, in the same
        transaction: no route reads that key, so nothing that shows a job (GET, lists,
        events, the dashboard) can show them; the worker reads it when it starts a run
        (``tool_secrets``)."""
        now = time.time()
        record = {
            "id": job_id,
            "spec": spec_json,
            "status": str(status),
            "created_at": now,
            "updated_at": now,
            "attempt": 0,
            **fields,
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_job(job_id), mapping={k: encode(v) for k, v in record.items()})
        if secrets:
            pipe.set(self.k_secrets(job_id), json.dumps(secrets))
        pipe.zadd(self.k_jobs(), {job_id: now})
        if record.get("tenant"):
            pipe.sadd(self.k_active(record["tenant"]), job_id)
        if status == S.queued:
            pipe.zadd(self.k_queued(), {job_id: self.server_time()})
        pipe.execute()
        return self.get(job_id)

    def k_secrets(self, job_id: str) -> str:
        return f"{self.k_job(job_id)}:secrets"

    def outbound_rules(self, job_id: str) -> dict[str, Any] | None:
        """The job's tenant's own rules for the URLs it calls (``TenantOutbound``), as the
        API recorded them at creation; None when the tenant has none."""
        raw = self.r.hget(self.k_job(job_id), "outbound")
        return json.loads(raw) if raw else None

    def tool_secrets(self, job_id: str) -> dict[str, dict[str, str]]:
        """The job's secrets (``tool_headers`` by tool name, ``grader_headers`` by grader
        position, ``environment_headers``), for the worker only."""
        raw = self.r.get(self.k_secrets(job_id))
        return json.loads(raw) if raw else {}

    def get(self, job_id: str) -> dict[str, str]:
        rec = self.r.hgetall(self.k_job(job_id))
        if not rec:
            raise JobNotFound(job_id)
        return rec

    def owner(self, job_id: str) -> str | None:
        """The job's tenant (the default tenant for records older than tenants), or None
        when there is no such job: one read of two short fields, whoever owns it."""
        tenant, status = self.r.hmget(self.k_job(job_id), "tenant", "status")
        return None if status is None else tenant or DEFAULT_TENANT

    def status(self, job_id: str) -> str | None:
        """Just the status (the poll loops need no more than this)."""
        return self.r.hget(self.k_job(job_id), "status")

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.k_job(job_id)))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.r.hset(self.k_job(job_id), mapping={k: encode(v) for k, v in fields.items()})

    def list_ids(
        self, after: str | None, limit: int, tenant: str | None = None
    ) -> tuple[list[str], bool]:
        """Newest first; ``after`` is the last id of the previous page. With ``tenant``,
        only that tenant's jobs (a record without one is the default tenant's)."""
        start = 0
        if after:
            rank = self.r.zrevrank(self.k_jobs(), after)
            if rank is None:
                raise JobNotFound(after)
            start = rank + 1
        if tenant is None:
            ids = self.r.zrevrange(self.k_jobs(), start, start + limit)
            return ids[:limit], len(ids) > limit
        out: list[str] = []
        batch = max(limit + 1, 200)
        while len(out) <= limit:
            ids = self.r.zrevrange(self.k_jobs(), start, start + batch - 1)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(self.k_job(job_id), "tenant")
            for job_id, owner in zip(ids, pipe.execute(), strict=True):
                if (owner or DEFAULT_TENANT) == tenant:
                    out.append(job_id)
            start += len(ids)
        return out[:limit], len(out) > limit

    # ---- tenants
    def active_count(self, tenant: str, served: Container[str] | None = None) -> int:
        """The tenant's jobs not in a terminal state; with ``served`` (the queues live
        workers serve), jobs queued on any other queue do not count. Jobs seen terminal (or
        gone) are dropped from the tenant's active set here, so the set never needs the
        state machine's help to shrink."""
        key = self.k_active(tenant)
        ids = sorted(self.r.smembers(key))
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.k_job(job_id), "status", "queue")
        rows = pipe.execute()
        done = [j for j, (st, _) in zip(ids, rows, strict=True) if st is None or st in TERMINAL]
        if done:
            self.r.srem(key, *done)
        waiting = 0
        if served is not None:
            waiting = sum(st == S.queued and q and q not in served for st, q in rows)
        return len(ids) - len(done) - waiting

    # ---- deleting finished jobs
    def delete_job(self, job_id: str) -> dict[str, str]:
        """Delete a finished job's record, streams, checkpoint list, index entries and its
        Idempotency-Key binding; return the deleted record. Raises JobNotFound, or
        InvalidTransition (target ``deleted``) when the job is not finished."""
        rec = self.get(job_id)
        keys = [self.k_job(job_id), self.k_jobs(), self.k_leased()]
        keys += [f"{self.k_job(job_id)}:{suffix}" for suffix in JOB_KEY_SUFFIXES]
        code, cur = self._delete(keys=keys, args=[job_id, ",".join(sorted(TERMINAL))])
        if code == -1:
            raise JobNotFound(job_id)
        if code != 1:
            raise InvalidTransition(job_id, cur, "deleted")
        if rec.get("idempotency_key"):
            self.forget_idempotency(
                rec["idempotency_key"], job_id, rec.get("tenant") or DEFAULT_TENANT
            )
        return rec

    def fine_tuned_models(self) -> list[dict[str, str]]:
        """Records of succeeded jobs whose model was not deleted, newest first (one pipelined
        read of every job's status)."""
        ids = self.r.zrevrange(self.k_jobs(), 0, -1)
        fields = ("id", "status", "fine_tuned_model", "finished_at", "model_deleted_at", "tenant")
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.k_job(job_id), fields)
        out = []
        for values in pipe.execute():
            rec = dict(zip(fields, values, strict=True))
            if rec["status"] == S.succeeded and rec["fine_tuned_model"]:
                if not rec["model_deleted_at"]:
                    out.append({k: v for k, v in rec.items() if v is not None})
        return out

    # ---- idempotency
    def remember_idempotency(
        self,
        key: str,
        job_id: str,
        request_hash: str,
        ttl: int = 86_400,
        tenant: str = DEFAULT_TENANT,
    ) -> str | None:
        """Bind the tenant's ``key`` to ``job_id``; if it was already bound, return the
        stored value. Two tenants using the same key never see each other's jobs."""
        k = f"{self.p}idem:{tenant}:{key}"
        if self.r.set(k, f"{job_id}|{request_hash}", nx=True, ex=ttl):
            return None
        return self.r.get(k)

    def forget_idempotency(self, key: str, job_id: str, tenant: str = DEFAULT_TENANT) -> None:
        """Release a key bound to a job that was then refused (never created)."""
        k = f"{self.p}idem:{tenant}:{key}"
        if (self.r.get(k) or "").split("|", 1)[0] == job_id:
            self.r.delete(k)
