"""Job records in Redis: the state machine, leases, events, metrics and checkpoints.

Keys (all under the settings' ``key_prefix``):
  job:{id}              hash: spec JSON, status, timestamps, attempt, error, lease
  jobs                  sorted set of job ids by creation time (pagination)
  job:{id}:events       stream (bounded) of fine_tuning.job.event payloads
  job:{id}:metrics      stream (bounded) of per-step metric dicts
  job:{id}:checkpoints  list of checkpoint metadata JSON, oldest first
  leased                sorted set of jobs holding a lease, by expiry (the reaper's index)
  idem:{key}            Idempotency-Key -> "job_id|request hash" (24 h)

Every status change goes through one Lua compare-and-set, so two actors (the
API cancelling, the worker finishing) can never both win a transition. The
lease fields live in the same hash and are claimed and renewed by Lua too.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis


class JobStatus(StrEnum):
    validating_files = "validating_files"  # OpenAI's status; posttrain validates synchronously
    queued = "queued"
    running = "running"
    pausing = "pausing"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


S = JobStatus
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.validating_files: frozenset({S.queued, S.failed, S.cancelled}),
    S.queued: frozenset({S.running, S.failed, S.cancelled}),
    # running -> queued: the worker was lost and the job goes back for another attempt.
    S.running: frozenset({S.succeeded, S.failed, S.cancelled, S.pausing, S.queued}),
    # pausing -> succeeded: the run finished before it reached a step boundary to pause at.
    S.pausing: frozenset({S.paused, S.succeeded, S.failed, S.cancelled, S.queued}),
    S.paused: frozenset({S.queued, S.cancelled}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


def legal_sources(target: JobStatus) -> frozenset[JobStatus]:
    return frozenset(src for src, dsts in TRANSITIONS.items() if target in dsts)


class InvalidTransition(Exception):
    def __init__(self, job_id: str, current: str | None, target: str):
        self.job_id, self.current, self.target = job_id, current, target
        super().__init__(f"job {job_id} is {current}; cannot move to {target}")


class JobNotFound(KeyError):
    pass


# KEYS: job hash, lease index. ARGV: allowed sources (comma list), target, required lease
# owner or "", job id, then field/value pairs to set with the status.
_CAS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[3] then
  return {-2, cur}
end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    if ARGV[2] ~= 'running' and ARGV[2] ~= 'pausing' then
      redis.call('ZREM', KEYS[2], ARGV[4])
    end
    return {1, cur}
  end
end
return {0, cur}
"""

# KEYS: job hash, lease index. ARGV: owner, now, expires_at, max_attempts, job id.
# Claims a queued job, or a running one whose lease has expired (its worker died).
_CLAIM = """
local st = redis.call('HMGET', KEYS[1], 'status', 'lease_expires_at', 'attempt')
local cur, exp, attempt = st[1], tonumber(st[2] or '0'), tonumber(st[3] or '0')
if not cur then return {-1, 'missing', 0} end
local now = tonumber(ARGV[2])
if not (cur == 'queued' or ((cur == 'running' or cur == 'pausing') and exp < now)) then
  return {0, cur, attempt}
end
if attempt >= tonumber(ARGV[4]) then
  return {-3, cur, attempt}
end
attempt = attempt + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'lease_owner', ARGV[1],
           'lease_expires_at', ARGV[3], 'attempt', attempt, 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
end
return {1, cur, attempt}
"""

# KEYS: job hash, lease index. ARGV: owner, expires_at, job id. Renews only the owner's
# live lease.
_RENEW = """
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[1] then return 0 end
local cur = redis.call('HGET', KEYS[1], 'status')
if cur ~= 'running' and cur ~= 'pausing' then return -1 end
redis.call('HSET', KEYS[1], 'lease_expires_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: job hash, lease index. ARGV: now, job id. Puts a job whose worker vanished back in
# the queue, only if its lease is still expired at this instant (a late renewal wins).
_REQUEUE = """
local st = redis.call('HMGET', KEYS[1], 'status', 'lease_expires_at')
if st[1] ~= 'running' and st[1] ~= 'pausing' then return 0 end
if tonumber(st[2] or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'lease_owner', '', 'lease_expires_at', '0',
           'updated_at', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


@dataclass
class Claim:
    ok: bool
    previous: str
    attempt: int
    exhausted: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


class JobStore:
    """Typed access to job records. One instance per process; thread-safe (redis-py pool)."""

    events_maxlen = 10_000
    metrics_maxlen = 100_000

    def __init__(self, client: redis.Redis, prefix: str = "posttrain:"):
        self.r = client
        self.p = prefix
        self._cas = client.register_script(_CAS)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)

    # ---- keys
    def k_job(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    def k_jobs(self) -> str:
        return f"{self.p}jobs"

    def k_leased(self) -> str:
        """Sorted set: jobs holding a lease, scored by when it expires (the reaper's index)."""
        return f"{self.p}leased"

    # ---- records
    def create(
        self, job_id: str, spec_json: str, status: JobStatus = S.queued, **fields: Any
    ) -> dict:
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
        pipe.hset(self.k_job(job_id), mapping={k: _encode(v) for k, v in record.items()})
        pipe.zadd(self.k_jobs(), {job_id: now})
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str) -> dict[str, str]:
        rec = self.r.hgetall(self.k_job(job_id))
        if not rec:
            raise JobNotFound(job_id)
        return rec

    def status(self, job_id: str) -> str | None:
        """Just the status (the poll loops need no more than this)."""
        return self.r.hget(self.k_job(job_id), "status")

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.k_job(job_id)))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.r.hset(self.k_job(job_id), mapping={k: _encode(v) for k, v in fields.items()})

    def list_ids(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Newest first; ``after`` is the last id of the previous page."""
        start = 0
        if after:
            rank = self.r.zrevrank(self.k_jobs(), after)
            if rank is None:
                raise JobNotFound(after)
            start = rank + 1
        ids = self.r.zrevrange(self.k_jobs(), start, start + limit)
        return ids[:limit], len(ids) > limit

    # ---- state machine
    def transition(
        self,
        job_id: str,
        target: JobStatus,
        *,
        expect: set[JobStatus] | None = None,
        owner: str | None = None,
        **fields: Any,
    ) -> str:
        """Atomically move ``job_id`` to ``target``; return the previous status.

        ``expect`` narrows the legal sources; ``owner`` requires the caller to hold the lease.
        Raises InvalidTransition (current status not a legal source) or JobNotFound.
        """
        sources = legal_sources(target) if expect is None else expect
        illegal = [s for s in sources if target not in TRANSITIONS[s]]
        if illegal:
            raise ValueError(f"{illegal} -> {target} is not in the transition table")
        now = time.time()
        fields.setdefault("updated_at", now)
        if target in TERMINAL:
            fields.setdefault("finished_at", now)
        args = [",".join(sorted(sources)), str(target), owner or "", job_id]
        for k, v in fields.items():
            args += [k, _encode(v)]
        code, cur = self._cas(keys=[self.k_job(job_id), self.k_leased()], args=args)
        if code == -1:
            raise JobNotFound(job_id)
        if code != 1:
            raise InvalidTransition(job_id, cur, str(target))
        return cur

    # ---- leases
    def claim(self, job_id: str, owner: str, lease_seconds: float, max_attempts: int) -> Claim:
        now = time.time()
        code, prev, attempt = self._claim(
            keys=[self.k_job(job_id), self.k_leased()],
            args=[owner, now, now + lease_seconds, max_attempts, job_id],
        )
        if code == -1:
            raise JobNotFound(job_id)
        return Claim(ok=code == 1, previous=prev, attempt=int(attempt), exhausted=code == -3)

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        return (
            self._renew(
                keys=[self.k_job(job_id), self.k_leased()],
                args=[owner, time.time() + lease_seconds, job_id],
            )
            == 1
        )

    def expired_leases(self) -> list[str]:
        """Jobs whose lease ran out (their worker is gone), from the lease index."""
        return self.r.zrangebyscore(self.k_leased(), "-inf", f"({time.time()}")

    def requeue_if_expired(self, job_id: str) -> bool:
        keys = [self.k_job(job_id), self.k_leased()]
        return self._requeue(keys=keys, args=[time.time(), job_id]) == 1

    # ---- events, metrics, checkpoints
    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict | None = None,
    ) -> str:
        fields = {
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "type": type,
            "data": json.dumps(data) if data is not None else "",
        }
        return self.r.xadd(
            f"{self.k_job(job_id)}:events", fields, maxlen=self.events_maxlen, approximate=True
        )

    def events(
        self, job_id: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, dict]], bool]:
        """Newest first. ``after`` is a stream id; the page holds entries strictly older."""
        key = f"{self.k_job(job_id)}:events"
        top = f"({after}" if after else "+"
        rows = self.r.xrevrange(key, max=top, min="-", count=limit + 1)
        return rows[:limit], len(rows) > limit

    def add_metrics(self, job_id: str, step: int, values: dict[str, float]) -> None:
        self.r.xadd(
            f"{self.k_job(job_id)}:metrics",
            {"step": step, "values": json.dumps(values)},
            maxlen=self.metrics_maxlen,
            approximate=True,
        )

    def metrics(self, job_id: str, after_step: int | None, limit: int) -> tuple[list[dict], bool]:
        """Oldest first, steps strictly greater than ``after_step``."""
        out: list[dict] = []
        for _, f in self.r.xrange(f"{self.k_job(job_id)}:metrics", "-", "+"):
            step = int(f["step"])
            if after_step is None or step > after_step:
                out.append({"step": step, **json.loads(f["values"])})
            if len(out) > limit:
                break
        return out[:limit], len(out) > limit

    def add_checkpoint(self, job_id: str, meta: dict) -> None:
        self.r.rpush(f"{self.k_job(job_id)}:checkpoints", json.dumps(meta))

    def checkpoints(self, job_id: str) -> list[dict]:
        """Oldest first."""
        return [json.loads(x) for x in self.r.lrange(f"{self.k_job(job_id)}:checkpoints", 0, -1)]

    # ---- idempotency
    def remember_idempotency(
        self, key: str, job_id: str, request_hash: str, ttl: int = 86_400
    ) -> str | None:
        """Bind ``key`` to ``job_id``; if it was already bound, return the stored value."""
        k = f"{self.p}idem:{key}"
        if self.r.set(k, f"{job_id}|{request_hash}", nx=True, ex=ttl):
            return None
        return self.r.get(k)
