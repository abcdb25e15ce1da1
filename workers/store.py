"""Job records in Redis: the state machine, leases, events, metrics and checkpoints.

Keys (all under the settings' ``key_prefix``):
  job:{id}              hash: spec JSON, status, timestamps, attempt, error, lease
  jobs                  sorted set of job ids by creation time (pagination)
  job:{id}:events       stream (bounded, MAXLEN ~) of fine_tuning.job.event payloads
  job:{id}:metrics      stream (bounded, MAXLEN ~) of per-step metric dicts; entry id
                        ``{step}-1``, so a step cursor is a stream-id cursor
  job:{id}:checkpoints  list of checkpoint metadata JSON, oldest first (pruned to the
                        job's retention: the newest N plus the final one)
  leased                sorted set of jobs holding a lease, by expiry (the reaper's index)
  queued                sorted set of queued jobs, by when a broker message was last sent
                        or seen for them (the reconciler's index)
  fence                 counter: the last fencing token handed to a claim
  idem:{tenant}:{key}   Idempotency-Key -> "job_id|request hash" (24 h), per tenant
  tenant:{name}:active  set of the tenant's job ids not yet seen terminal (quota count)

Every status change goes through one Lua compare-and-set, so two actors (the
API cancelling, the worker finishing) can never both win a transition. The
lease fields live in the same hash and are claimed and renewed by Lua too: each
claim takes a new fencing token (``INCR fence``) stored as the record's
``fence``, and a worker's renewals and status writes name it, so a worker whose
job was taken over can no longer touch it. Lease times are Redis server time.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

# The owner of records written without a tenant (auth off, or before tenants existed).
DEFAULT_TENANT = "default"


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


# Leases and the queued index are scored in Redis server time (``TIME`` inside the
# scripts), so hosts with skewed clocks agree on when a lease ran out.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: job hash, lease index, queued index. ARGV: allowed sources (comma list), target,
# required lease owner or "", job id, required fencing token or "", then field/value pairs
# to set with the status.
_CAS = (
    _NOW
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[3] then
  return {-2, cur}
end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[5] then
  return {-2, cur}
end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    if ARGV[2] ~= 'running' and ARGV[2] ~= 'pausing' then
      redis.call('ZREM', KEYS[2], ARGV[4])
    end
    if ARGV[2] == 'queued' then
      redis.call('ZADD', KEYS[3], now, ARGV[4])
    else
      redis.call('ZREM', KEYS[3], ARGV[4])
    end
    return {1, cur}
  end
end
return {0, cur}
"""
)

# KEYS: job hash, lease index, fencing counter, queued index. ARGV: owner, lease seconds,
# max_attempts, job id. Claims a queued job, or a running one whose lease has expired (its
# worker died), with a new fencing token. A pausing job whose worker died is parked as
# paused instead (the user's pause is kept).
_CLAIM = (
    _NOW
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'lease_expires_at', 'attempt')
local cur, exp, attempt = st[1], tonumber(st[2] or '0'), tonumber(st[3] or '0')
if not cur then return {-1, 'missing', 0, 0} end
if cur == 'pausing' and exp < now then
  redis.call('HSET', KEYS[1], 'status', 'paused', 'lease_owner', '', 'lease_expires_at', '0',
             'attempt', 0, 'updated_at', now)
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {-4, cur, attempt, 0}
end
if not (cur == 'queued' or (cur == 'running' and exp < now)) then
  return {0, cur, attempt, 0}
end
if attempt >= tonumber(ARGV[3]) then
  return {-3, cur, attempt, 0}
end
attempt = attempt + 1
local fence = redis.call('INCR', KEYS[3])
local expires = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'running', 'lease_owner', ARGV[1],
           'lease_expires_at', expires, 'attempt', attempt, 'fence', fence, 'updated_at', now)
redis.call('ZADD', KEYS[2], expires, ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[4])
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', now)
end
return {1, cur, attempt, fence}
"""
)

# KEYS: job hash, lease index. ARGV: owner, lease seconds, job id, fencing token or "".
# Renews only the lease of the claim holding the current token.
_RENEW = (
    _NOW
    + """
local st = redis.call('HMGET', KEYS[1], 'lease_owner', 'status', 'fence')
if st[1] ~= ARGV[1] then return 0 end
if ARGV[4] ~= '' and st[3] ~= ARGV[4] then return 0 end
if st[2] ~= 'running' and st[2] ~= 'pausing' then return -1 end
local expires = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_expires_at', expires)
redis.call('ZADD', KEYS[2], expires, ARGV[3])
return 1
"""
)

# KEYS: job hash, lease index, queued index. ARGV: job id. Puts a job whose worker vanished
# back in the queue (1), or parks a pausing one as paused (2), only if its lease is still
# expired at this instant (a late renewal wins).
_REQUEUE = (
    _NOW
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'lease_expires_at')
if st[1] ~= 'running' and st[1] ~= 'pausing' then return 0 end
if tonumber(st[2] or '0') >= now then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if st[1] == 'pausing' then
  redis.call('HSET', KEYS[1], 'status', 'paused', 'lease_owner', '', 'lease_expires_at', '0',
             'attempt', 0, 'updated_at', now)
  return 2
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'lease_owner', '', 'lease_expires_at', '0',
           'updated_at', now)
redis.call('ZADD', KEYS[3], now, ARGV[1])
return 1
"""
)


@dataclass
class Claim:
    ok: bool
    previous: str
    attempt: int
    exhausted: bool = False
    fence: int = 0  # this claim's fencing token (0 when the claim did not succeed)
    paused: bool = False  # the job was pausing and its worker died: parked as paused


# KEYS: job hash, stream. ARGV: maxlen, then field/value pairs. Appends only while the job
# record exists, so a late write from a worker never recreates a deleted job's stream.
_XADD_LIVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
"""

# KEYS: job hash, metrics stream. ARGV: step, values JSON, maxlen.
# Entry ids are ``{step}-1``: XRANGE from ``{after+1}-0`` reads a page in O(log n + limit).
# A step at or below the newest entry is a resumed attempt re-running steps after its
# checkpoint: those entries (that step and every later one) belonged to the lost attempt's
# discarded weights, so they are deleted and the stream's last id wound back before the new
# value is added. A stream written before step ids (auto ids) keeps its old way.
_ADD_METRICS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local step = tonumber(ARGV[1])
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if top then
  local top_ms = tonumber(string.match(top[1], '^(%d+)-'))
  local top_step = nil
  for i = 1, #top[2], 2 do
    if top[2][i] == 'step' then top_step = tonumber(top[2][i + 1]) end
  end
  if top_ms ~= top_step then
    return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
                      'step', ARGV[1], 'values', ARGV[2])
  end
  if top_ms >= step then
    for _, e in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+')) do
      redis.call('XDEL', KEYS[2], e[1])
    end
    local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
    redis.call('XSETID', KEYS[2], last and last[1] or '0-0')
  end
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[1] .. '-1',
                  'step', ARGV[1], 'values', ARGV[2])
"""

# KEYS: job hash, checkpoint list. ARGV: new checkpoint's metadata JSON, keep (0 = all).
# Adds the checkpoint (replacing an entry of the same step: a report applied twice), then
# removes the non-final entries beyond the ``keep`` newest and returns them, for the caller
# to delete their files. Final checkpoints are never pruned.
_ADD_CHECKPOINT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local new = cjson.decode(ARGV[1])
for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if cjson.decode(raw).step == new.step then redis.call('LREM', KEYS[2], 0, raw) end
end
redis.call('RPUSH', KEYS[2], ARGV[1])
local keep, seen, pruned = tonumber(ARGV[2]), 0, {}
if keep <= 0 then return pruned end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #items, 1, -1 do
  if not cjson.decode(items[i]).final then
    seen = seen + 1
    if seen > keep then
      redis.call('LREM', KEYS[2], 1, items[i])
      table.insert(pruned, items[i])
    end
  end
end
return pruned
"""

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
JOB_KEY_SUFFIXES = ("events", "metrics", "checkpoints")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


class JobStore:
    """Typed access to job records. One instance per process; thread-safe (redis-py pool)."""

    # Stream bounds (XADD MAXLEN ~; settings ``events_maxlen``/``metrics_maxlen`` override).
    events_maxlen = 10_000
    metrics_maxlen = 100_000

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "posttrain:",
        *,
        events_maxlen: int | None = None,
        metrics_maxlen: int | None = None,
    ):
        self.r = client
        self.p = prefix
        self.events_maxlen = events_maxlen or self.events_maxlen
        self.metrics_maxlen = metrics_maxlen or self.metrics_maxlen
        self._cas = client.register_script(_CAS)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)
        self._xadd_live = client.register_script(_XADD_LIVE)
        self._add_metrics = client.register_script(_ADD_METRICS)
        self._add_checkpoint = client.register_script(_ADD_CHECKPOINT)
        self._delete = client.register_script(_DELETE_JOB)

    # ---- keys
    def k_job(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    def k_jobs(self) -> str:
        return f"{self.p}jobs"

    def k_leased(self) -> str:
        """Sorted set: jobs holding a lease, scored by when it expires (the reaper's index)."""
        return f"{self.p}leased"

    def k_queued(self) -> str:
        """Sorted set: queued jobs, scored by when a broker message was last sent or seen
        for them (server time; the reconciler's index)."""
        return f"{self.p}queued"

    def k_fence(self) -> str:
        """Counter: the last fencing token handed to a claim (INCR, never reused)."""
        return f"{self.p}fence"

    def server_time(self) -> float:
        """Redis server time in seconds: the one clock leases are measured by."""
        sec, usec = self.r.time()
        return sec + usec / 1_000_000

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
        if record.get("tenant"):
            pipe.sadd(self.k_active(record["tenant"]), job_id)
        if status == S.queued:
            pipe.zadd(self.k_queued(), {job_id: self.server_time()})
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
    def k_active(self, tenant: str) -> str:
        return f"{self.p}tenant:{tenant}:active"

    def active_count(self, tenant: str) -> int:
        """The tenant's jobs not in a terminal state. Jobs seen terminal (or gone) are
        dropped from the tenant's active set here, so the set never needs the state
        machine's help to shrink."""
        key = self.k_active(tenant)
        ids = sorted(self.r.smembers(key))
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.k_job(job_id), "status")
        states = pipe.execute()
        done = [j for j, st in zip(ids, states, strict=True) if st is None or st in TERMINAL]
        if done:
            self.r.srem(key, *done)
        return len(ids) - len(done)

    # ---- state machine
    def transition(
        self,
        job_id: str,
        target: JobStatus,
        *,
        expect: set[JobStatus] | None = None,
        owner: str | None = None,
        fence: int | None = None,
        **fields: Any,
    ) -> str:
        """Atomically move ``job_id`` to ``target``; return the previous status.

        ``expect`` narrows the legal sources; ``owner`` requires the caller to hold the lease
        and ``fence`` that its claim's fencing token is still the job's current one (a worker
        whose job was taken over can no longer write it). Raises InvalidTransition (current
        status not a legal source, or not the caller's lease) or JobNotFound.
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
        args.append("" if fence is None else str(fence))
        for k, v in fields.items():
            args += [k, _encode(v)]
        keys = [self.k_job(job_id), self.k_leased(), self.k_queued()]
        code, cur = self._cas(keys=keys, args=args)
        if code == -1:
            raise JobNotFound(job_id)
        if code != 1:
            raise InvalidTransition(job_id, cur, str(target))
        return cur

    # ---- leases
    def claim(self, job_id: str, owner: str, lease_seconds: float, max_attempts: int) -> Claim:
        keys = [self.k_job(job_id), self.k_leased(), self.k_fence(), self.k_queued()]
        code, prev, attempt, fence = self._claim(
            keys=keys, args=[owner, lease_seconds, max_attempts, job_id]
        )
        if code == -1:
            raise JobNotFound(job_id)
        return Claim(
            ok=code == 1,
            previous=prev,
            attempt=int(attempt),
            exhausted=code == -3,
            fence=int(fence),
            paused=code == -4,
        )

    def renew(
        self, job_id: str, owner: str, lease_seconds: float, fence: int | None = None
    ) -> bool:
        """Extend the lease of ``owner`` (and, if given, of the claim holding ``fence``)."""
        token = "" if fence is None else str(fence)
        return (
            self._renew(
                keys=[self.k_job(job_id), self.k_leased()],
                args=[owner, lease_seconds, job_id, token],
            )
            == 1
        )

    def expired_leases(self) -> list[str]:
        """Jobs whose lease ran out (their worker is gone), from the lease index."""
        return self.r.zrangebyscore(self.k_leased(), "-inf", f"({self.server_time()}")

    def requeue_if_expired(self, job_id: str) -> str | None:
        """Requeue a job whose lease ran out: ``"queued"``, ``"paused"`` (it was pausing,
        so the user's pause is kept), or None when it was renewed or ended meanwhile."""
        keys = [self.k_job(job_id), self.k_leased(), self.k_queued()]
        return {1: "queued", 2: "paused"}.get(self._requeue(keys=keys, args=[job_id]))

    def queued_since(self, older_than: float) -> list[str]:
        """Queued jobs whose last broker message was sent (or seen) over ``older_than`` s ago."""
        cutoff = self.server_time() - older_than
        return self.r.zrangebyscore(self.k_queued(), "-inf", f"({cutoff}")

    def last_metric_step(self, job_id: str) -> int:
        """The newest step in the job's metrics stream (0 if none)."""
        rows = self.r.xrevrange(f"{self.k_job(job_id)}:metrics", count=1)
        return int(rows[0][1]["step"]) if rows else 0

    def mark_enqueued(self, job_id: str) -> None:
        """Record that a broker message for a queued job was sent (or found) just now."""
        self.r.zadd(self.k_queued(), {job_id: self.server_time()}, xx=True)

    # ---- events, metrics, checkpoints
    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict | None = None,
    ) -> str | None:
        """Append an event; None (nothing written) when the job's record is gone."""
        fields = {
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "type": type,
            "data": json.dumps(data) if data is not None else "",
        }
        args: list[Any] = [self.events_maxlen]
        for k, v in fields.items():
            args += [k, v]
        return self._xadd_live(keys=[self.k_job(job_id), f"{self.k_job(job_id)}:events"], args=args)

    def events(
        self, job_id: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, dict]], bool]:
        """Newest first. ``after`` is a stream id; the page holds entries strictly older."""
        key = f"{self.k_job(job_id)}:events"
        top = f"({after}" if after else "+"
        rows = self.r.xrevrange(key, max=top, min="-", count=limit + 1)
        return rows[:limit], len(rows) > limit

    def add_metrics(self, job_id: str, step: int, values: dict[str, float]) -> None:
        """One step's metrics; a step reported again (a resumed run) replaces the earlier
        value and drops the later steps of the attempt that was lost (see _ADD_METRICS)."""
        self._add_metrics(
            keys=[self.k_job(job_id), f"{self.k_job(job_id)}:metrics"],
            args=[int(step), json.dumps(values), self.metrics_maxlen],
        )

    def metrics(self, job_id: str, after_step: int | None, limit: int) -> tuple[list[dict], bool]:
        """Oldest first, steps strictly greater than ``after_step``: one XRANGE of
        ``limit + 1`` entries from the stream id ``{after_step + 1}-0``."""
        key = f"{self.k_job(job_id)}:metrics"
        start = "-" if after_step is None else f"{max(after_step + 1, 0)}-0"
        pipe = self.r.pipeline(transaction=False)
        pipe.xrange(key, "-", "+", count=1)
        pipe.xrange(key, start, "+", count=limit + 1)
        first, rows = pipe.execute()
        if first and first[0][0].split("-")[0] != first[0][1]["step"]:
            return self._metrics_scan(key, after_step, limit)  # written before step ids
        out = [{"step": int(f["step"]), **json.loads(f["values"])} for _, f in rows]
        return out[:limit], len(out) > limit

    def _metrics_scan(self, key: str, after_step: int | None, limit: int):
        """A stream of an earlier release (auto ids): read from the start."""
        out: list[dict] = []
        for _, f in self.r.xrange(key, "-", "+"):
            step = int(f["step"])
            if after_step is None or step > after_step:
                out.append({"step": step, **json.loads(f["values"])})
            if len(out) > limit:
                break
        return out[:limit], len(out) > limit

    def add_checkpoint(self, job_id: str, meta: dict, keep: int = 0) -> list[dict]:
        """Record a complete checkpoint; with ``keep`` > 0, drop every non-final entry
        beyond the ``keep`` newest from the list and return the dropped entries (whose files
        the caller deletes). Nothing is written when the job's record is gone."""
        pruned = self._add_checkpoint(
            keys=[self.k_job(job_id), f"{self.k_job(job_id)}:checkpoints"],
            args=[json.dumps(meta), int(keep)],
        )
        return [json.loads(x) for x in pruned or []]

    def checkpoints(self, job_id: str) -> list[dict]:
        """Oldest first."""
        return [json.loads(x) for x in self.r.lrange(f"{self.k_job(job_id)}:checkpoints", 0, -1)]

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
