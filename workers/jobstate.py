"""The job state machine and leases: the status table, and the Lua that changes a job's
status, claims it, renews and requeues its lease.

Every status change goes through one Lua compare-and-set, so two actors (the API
cancelling, the worker finishing) can never both win a transition. The lease fields live
in the job's hash and are claimed and renewed by Lua too: each claim takes a new fencing
token (``INCR fence``) stored as the record's ``fence``, and a worker's renewals and
status writes name it, so a worker whose job was taken over can no longer touch it.
Lease times are Redis server time. Callers use these through ``workers.store.JobStore``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from workers.jobkeys import JobKeys, encode


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
    # queued -> paused: a pause before any worker started it (resume queues it again).
    S.queued: frozenset({S.running, S.failed, S.cancelled, S.paused}),
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

# KEYS: job hash, lease index, queued index, webhook events stream. ARGV: allowed sources
# (comma list), target, required lease owner or "", job id, required fencing token or "",
# then field/value pairs to set with the status. A job's end is appended to the webhook
# events (``workers.webhooks``) in the same step, so no end goes unannounced.
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
    if ARGV[2] == 'succeeded' or ARGV[2] == 'failed' or ARGV[2] == 'cancelled' then
      local tenant = redis.call('HGET', KEYS[1], 'tenant') or ''
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100000, '*', 'type',
                 'fine_tuning.job.' .. ARGV[2], 'object', ARGV[4], 'tenant', tenant, 'at', now)
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


class JobLifecycle(JobKeys):
    """Status transitions, claims, lease renewal and the reaper's and reconciler's indexes."""

    def __init__(self, client: redis.Redis, prefix: str = "posttrain:", **kwargs: Any):
        super().__init__(client, prefix, **kwargs)
        self._cas = client.register_script(_CAS)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)

    # ---- status changes
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
            args += [k, encode(v)]
        keys = [self.k_job(job_id), self.k_leased(), self.k_queued(), self.k_webhook_events()]
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

    # ---- the queued index (the reconciler's)
    def queued_since(self, older_than: float) -> list[str]:
        """Queued jobs whose last broker message was sent (or seen) over ``older_than`` s ago."""
        cutoff = self.server_time() - older_than
        return self.r.zrangebyscore(self.k_queued(), "-inf", f"({cutoff}")

    def mark_enqueued(self, job_id: str) -> None:
        """Record that a broker message for a queued job was sent (or found) just now."""
        self.r.zadd(self.k_queued(), {job_id: self.server_time()}, xx=True)
