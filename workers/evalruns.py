"""Eval runs and their output items in Redis (torch-free; the rows a run grades:
``workers.evalrows``).

  evalrun:{id}              hash: id, eval_id, tenant, name, status, model, created_at,
                            metadata, data_source (JSON, as the caller gave it), spec (JSON:
                            what the worker needs: criteria, model header, sampling
                            parameters), error (JSON or empty), total (rows), queue (the
                            Celery queue it is sent to), limit (its tenant's grading slots
                            when it was created; absent: the worker's setting), and the
                            counts the worker adds as it stores items: progress, passed,
                            failed, errored, c{i}:passed / c{i}:failed (criterion i),
                            regraded (rows graded again after they were stored: a
                            redelivery that should not have happened), and the usage sums
                            invocation_count, prompt_tokens, completion_tokens,
                            total_tokens, cached_tokens of the run's model, the same sums
                            of each judge model as usage:{model}:{sum}; while it
                            runs: worker, attempt (claims so far, the fencing token),
                            lease (expiry, Redis time); while it waits for a slot: waiting, woken
  evalrun:{id}:items        hash: row index -> the output item (JSON)
  evalrun:{id}:all          sorted set of the stored row indexes (score: the index)
  evalrun:{id}:pass / :fail the same, by the output item's status
  evalrun:{id}:events       stream (MAXLEN ~) of the run's events, newest read first
  evalruns:eval:{eval_id}   sorted set of the eval's run ids by creation time
  evalruns:leased           sorted set of in_progress runs by lease expiry (the reaper's)
  evalruns:queued           sorted set of queued runs by when a message was last sent for
                            them (or their last refusal of a slot)
  evalruns:tenant:{t}:grading  sorted set of the tenant's runs holding a grading slot, by
                            lease expiry: a slot of a killed worker's run frees itself
  evalruns:tenant:{t}:waiting  sorted set of the tenant's runs waiting for a slot, by
                            creation time (the oldest is woken first)

An output item and every count it changes are written by one script (``_STORE``) that
does nothing when the row is already stored or the run is gone: a redelivered task
(its worker was killed) skips rows already stored and never counts one twice. A run's
status changes only through Lua compare-and-sets: ``transition`` (a cancel is never
overwritten by a worker finishing the run; a finished run leaves every index at once),
``claim`` (queued, or in_progress with an expired lease, to in_progress: takes a slot
and a lease, or marks the run waiting), ``requeue_if_expired`` (the reaper's).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from workers.jobkeys import webhook_events_key
from workers.store import DEFAULT_TENANT

__all__ = [
    "FINISHED",
    "NO_ERROR",
    "USAGE",
    "Claim",
    "EvalRunNotFound",
    "EvalRunStore",
    "new_run_id",
    "output_item_id",
    "usage_field",
    "wake_waiting",
]

FINISHED = ("completed", "failed", "canceled")
STATUSES = ("queued", "in_progress", *FINISHED)
NO_ERROR = {"code": "", "message": ""}  # OpenAI's schema: error is an object, never null
USAGE = ("invocation_count", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")

# KEYS: run hash, items hash, all index, status index. ARGV: row index, item JSON, status
# ("pass"/"fail"), counter (passed/failed/errored), then field/increment pairs.
# 1 stored; 0 already stored; -1 no such run (deleted).
_STORE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'regraded', 1)
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'progress', 1)
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# Leases and the queued index are scored in Redis server time, as jobs' are.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: run hash, leased, queued, tenant grading, tenant waiting, webhook events (a
# finished run's end is appended there: workers.webhooks). ARGV: new status, error
# JSON ('' = unchanged), run id, 1 if the new status is a finished one, then the allowed
# old statuses. The old status if it changed, else false. A finished run leaves every
# index (its slot frees with the same write).
_TRANSITION = """
local old = redis.call('HGET', KEYS[1], 'status')
if not old then return false end
for i = 5, #ARGV do
  if old == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[2]) end
    if ARGV[4] == '1' then
      for k = 2, 5 do redis.call('ZREM', KEYS[k], ARGV[3]) end
      redis.call('HDEL', KEYS[1], 'waiting', 'woken')
      local kind = ({completed = 'succeeded', failed = 'failed', canceled = 'canceled'})[ARGV[1]]
      if kind and old ~= ARGV[1] then
        local t = redis.call('TIME')
        redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*', 'type', 'eval.run.' .. kind,
                   'object', ARGV[3], 'tenant', redis.call('HGET', KEYS[1], 'tenant') or '',
                   'at', tonumber(t[1]) + tonumber(t[2]) / 1000000)
      end
    end
    return old
  end
end
return false
"""

# KEYS: run hash, leased, queued, tenant grading, tenant waiting. ARGV: run id, worker,
# lease seconds, slots (0 = no limit), max attempts. Returns {code, detail, attempt,
# stored rows}: 1 claimed (detail: the old status); 0 no free slot (detail: the slots in
# use; attempt: 1 if the run just started waiting); -1 no such run; -2 finished (detail:
# its status); -3 another worker holds a live lease (detail: that worker); -4 claimed
# more than max attempts times (the caller fails it).
_CLAIM = (
    _NOW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1, '', 0, 0} end
if status == 'completed' or status == 'failed' or status == 'canceled' then
  return {-2, status, 0, 0}
end
if status == 'in_progress' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease') or '0') or 0
  if lease > now then return {-3, redis.call('HGET', KEYS[1], 'worker') or '', 0, 0} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZREM', KEYS[4], ARGV[1])
local slots = tonumber(ARGV[4])
local used = redis.call('ZCARD', KEYS[4])
if slots > 0 and used >= slots then
  local first = redis.call('HSETNX', KEYS[1], 'waiting', tostring(now))
  redis.call('HDEL', KEYS[1], 'woken')
  redis.call('ZADD', KEYS[5], 'NX', tonumber(redis.call('HGET', KEYS[1], 'created_at')) or now,
             ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  return {0, tostring(used), first, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt > tonumber(ARGV[5]) then return {-4, status, attempt, 0} end
local expiry = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[2], 'lease', tostring(expiry))
redis.call('HDEL', KEYS[1], 'waiting', 'woken')
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('ZADD', KEYS[4], expiry, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return {1, status, attempt, redis.call('HGET', KEYS[1], 'progress') or '0'}
"""
)

# KEYS: run hash, leased, tenant grading. ARGV: run id, attempt (the claim's token),
# lease seconds. 1 renewed; 0 the run is no longer this claim's (finished, canceled,
# deleted, requeued, or claimed again after this lease ran out).
_RENEW = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
local expiry = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease', tostring(expiry))
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
return 1
"""
)

# KEYS: run hash, leased, queued, tenant grading. ARGV: run id. An in_progress run whose
# lease ran out goes back to queued and frees its slot; the worker that held it, or
# false (renewed, finished or gone meanwhile: only its stale index entry is dropped).
_REQUEUE = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease') or '0') or 0
if lease > now then return false end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
return redis.call('HGET', KEYS[1], 'worker') or ''
"""
)

# KEYS: tenant grading, tenant waiting, queued. ARGV: slots (0 = no limit), grace. The
# oldest waiting runs, as many as there are free slots, skipping a run woken less than
# ``grace`` s ago (its message is on its way); each is marked woken now. Returns
# {run id, 1 if it had been woken before, ...}. Entries of runs no longer queued go.
_WAKE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local slots = tonumber(ARGV[1])
local free = 1000000
if slots > 0 then free = slots - redis.call('ZCARD', KEYS[1]) end
local out = {}
if free <= 0 then return out end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if #out >= 2 * free then break end
  local run = ARGV[3] .. id
  if redis.call('HGET', run, 'status') ~= 'queued' then
    redis.call('ZREM', KEYS[2], id)
  else
    local woken = tonumber(redis.call('HGET', run, 'woken') or '')
    if not woken or woken <= now - tonumber(ARGV[2]) then
      redis.call('HSET', run, 'woken', tostring(now))
      redis.call('ZADD', KEYS[3], now, id)
      table.insert(out, id)
      table.insert(out, woken and 1 or 0)
    end
  end
end
return out
"""
)

# KEYS: run hash, events stream. ARGV: maxlen, then field/value pairs. Appends only while
# the run exists, so a late write never recreates a deleted run's stream.
_XADD_LIVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
"""

EVENTS_MAXLEN = 2_000  # a run's events: progress is at most ~20 a run plus one per 5 s


@dataclass(frozen=True)
class Claim:
    """What ``EvalRunStore.claim`` found: ``outcome`` is ``claimed``, ``waiting`` (no free
    slot; ``first``: it just started waiting), ``missing``, ``finished``, ``busy``
    (another worker holds a live lease) or ``exhausted`` (claimed too often)."""

    outcome: str
    previous: str = ""  # claimed: the old status; finished: the status; busy: the worker
    attempt: int = 0
    stored: int = 0  # claimed: rows already stored
    used: int = 0  # waiting: slots in use
    first: bool = False


class EvalRunNotFound(KeyError):
    pass


def usage_field(model: str, key: str) -> str:
    """The run hash's field summing usage ``key`` of judge ``model``'s calls."""
    return f"usage:{model}:{key}"


def new_run_id() -> str:
    return f"evalrun_{uuid.uuid4().hex}"


def output_item_id(run_id: str, index: int) -> str:
    """An output item's id: its run's hex and its row index (retrieval reads both)."""
    return f"outputitem_{run_id.removeprefix('evalrun_')}_{index}"


class EvalRunStore:
    def __init__(
        self, client: redis.Redis, prefix: str = "posttrain:", *, events_maxlen: int | None = None
    ):
        self.r = client
        self.p = prefix
        self.events_maxlen = events_maxlen or EVENTS_MAXLEN
        self._store = client.register_script(_STORE)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)
        self._wake = client.register_script(_WAKE)
        self._xadd_live = client.register_script(_XADD_LIVE)

    # ---- keys
    def k_run(self, run_id: str) -> str:
        return f"{self.p}evalrun:{run_id}"

    def k_items(self, run_id: str, which: str = "items") -> str:
        """``items`` (the hash), ``all``, ``pass`` or ``fail`` (the indexes)."""
        return f"{self.p}evalrun:{run_id}:{which}"

    def k_index(self, eval_id: str) -> str:
        return f"{self.p}evalruns:eval:{eval_id}"

    def k_leased(self) -> str:
        return f"{self.p}evalruns:leased"

    def k_queued(self) -> str:
        return f"{self.p}evalruns:queued"

    def k_grading(self, tenant: str) -> str:
        return f"{self.p}evalruns:tenant:{tenant}:grading"

    def k_waiting(self, tenant: str) -> str:
        return f"{self.p}evalruns:tenant:{tenant}:waiting"

    def _tenant(self, run_id: str) -> str:
        return self.r.hget(self.k_run(run_id), "tenant") or DEFAULT_TENANT

    def _state_keys(self, run_id: str, tenant: str | None = None) -> list[str]:
        """The run's hash and the four indexes its state is in."""
        tenant = tenant or self._tenant(run_id)
        return [
            self.k_run(run_id),
            self.k_leased(),
            self.k_queued(),
            self.k_grading(tenant),
            self.k_waiting(tenant),
        ]

    def server_time(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1_000_000

    # ---- runs
    def create(
        self,
        *,
        eval_id: str,
        name: str,
        model: str,
        data_source: dict[str, Any],
        spec: dict[str, Any],
        total: int,
        metadata: dict[str, str] | None = None,
        tenant: str = DEFAULT_TENANT,
        run_id: str | None = None,
        queue: str = "",
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Write a queued run (its ``created`` event with it); ``queue``: where its task
        is sent (the reaper sends it there again); ``limit``: its tenant's grading slots
        (None: the grading worker's setting)."""
        run_id = run_id or new_run_id()
        now = time.time()
        record = {
            "id": run_id,
            "eval_id": eval_id,
            "tenant": tenant,
            "name": name,
            "model": model,
            "status": "queued",
            "created_at": str(int(now)),
            "metadata": json.dumps(metadata or {}),
            "data_source": json.dumps(data_source),
            "spec": json.dumps(spec),
            "error": "",
            "total": str(total),
            "queue": queue,
        }
        if limit is not None:
            record["limit"] = str(limit)
        event = _event_fields(
            f"Run created with {total} rows; queued for a worker",
            "created",
            "info",
            {"total": total, "queue": queue or None},
        )
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_run(run_id), mapping=record)
        pipe.zadd(self.k_index(eval_id), {run_id: now})
        pipe.zadd(self.k_queued(), {run_id: self.server_time()})
        pipe.xadd(self.k_items(run_id, "events"), event, maxlen=self.events_maxlen)
        pipe.execute()
        return self.get(run_id)

    def owner(self, run_id: str) -> str | None:
        tenant, created = self.r.hmget(self.k_run(run_id), "tenant", "created_at")
        return None if created is None else tenant or DEFAULT_TENANT

    def get(self, run_id: str) -> dict[str, Any]:
        rec = self.r.hgetall(self.k_run(run_id))
        if not rec:
            raise EvalRunNotFound(run_id)
        return _decode(rec)

    def list(
        self,
        eval_id: str,
        after: str | None,
        limit: int,
        *,
        order: str = "asc",
        status: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of the eval's runs, oldest first (``order="desc"``: newest first),
        only those in ``status`` if given; ``after`` is the last id of the previous page
        (EvalRunNotFound if it is not one of the eval's runs)."""
        key, desc = self.k_index(eval_id), order == "desc"
        start = 0
        if after:
            rank = self.r.zrevrank(key, after) if desc else self.r.zrank(key, after)
            if rank is None:
                raise EvalRunNotFound(after)
            start = rank + 1
        out: list[dict[str, Any]] = []
        while len(out) <= limit:
            ids = self.r.zrange(key, start, start + max(limit, 20), desc=desc)
            if not ids:
                break
            start += len(ids)
            pipe = self.r.pipeline(transaction=False)
            for run_id in ids:
                pipe.hgetall(self.k_run(run_id))
            recs = [_decode(rec) for rec in pipe.execute() if rec]
            out += [r for r in recs if status is None or r["status"] == status]
        return out[:limit], len(out) > limit

    def transition(
        self, run_id: str, status: str, allowed: Iterable[str], error: dict | None = None
    ) -> str | None:
        """Set ``status`` if the run is in one of ``allowed``; the old status, else None.
        A finished status takes the run out of every index (its slot frees)."""
        args = [status, json.dumps(error) if error else "", run_id, int(status in FINISHED)]
        keys = [*self._state_keys(run_id), webhook_events_key(self.p)]
        return self._transition(keys=keys, args=[*args, *allowed])

    def delete(self, run_id: str) -> None:
        rec = self.get(run_id)
        state = self._state_keys(run_id, rec["tenant"])
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_run(run_id), *(self.k_items(run_id, w) for w in _ITEM_KEYS))
        pipe.zrem(self.k_index(rec["eval_id"]), run_id)
        for key in state[1:]:
            pipe.zrem(key, run_id)
        pipe.execute()

    # ---- claims, leases and grading slots
    def claim(
        self, run_id: str, worker: str, lease_seconds: float, slots: int, max_attempts: int
    ) -> Claim:
        """Take the run for ``worker``: a lease and one of its tenant's ``slots`` (0 = no
        limit), when it is queued, or in_progress with a lease that ran out (its worker
        was lost). With no slot free the run stays (or goes back to) queued and waiting."""
        code, detail, attempt, stored = self._claim(
            keys=self._state_keys(run_id),
            args=[run_id, worker, lease_seconds, int(slots), int(max_attempts)],
        )
        code, attempt = int(code), int(attempt)
        if code == 1:
            return Claim("claimed", detail, attempt, int(stored))
        if code == 0:
            return Claim("waiting", used=int(detail), first=bool(attempt))
        outcome = {-1: "missing", -2: "finished", -3: "busy", -4: "exhausted"}[code]
        return Claim(outcome, detail, attempt)

    def renew(self, run_id: str, attempt: int, lease_seconds: float) -> bool:
        """Extend the lease of the claim ``attempt``; False once the run is not its own."""
        keys = [self.k_run(run_id), self.k_leased(), self.k_grading(self._tenant(run_id))]
        return bool(self._renew(keys=keys, args=[run_id, attempt, lease_seconds]))

    def expire_lease(self, run_id: str) -> None:
        """End the run's lease now, as if its worker had been lost a lease ago."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_run(run_id), "lease", "0")
        pipe.zadd(self.k_leased(), {run_id: 0}, xx=True)
        pipe.zrem(self.k_grading(self._tenant(run_id)), run_id)
        pipe.execute()

    def expired_leases(self) -> list[str]:
        return self.r.zrangebyscore(self.k_leased(), "-inf", f"({self.server_time()}")

    def requeue_if_expired(self, run_id: str) -> str | None:
        """Put an in_progress run whose lease ran out back to queued; the worker that held
        it, or None when it was renewed or ended meanwhile."""
        keys = self._state_keys(run_id)[:4]
        return self._requeue(keys=keys, args=[run_id])

    def queued_runs(self) -> list[tuple[str, float]]:
        """Every queued run with when a message was last sent for it (server time)."""
        return self.r.zrange(self.k_queued(), 0, -1, withscores=True)

    def mark_enqueued(self, run_id: str) -> None:
        self.r.zadd(self.k_queued(), {run_id: self.server_time()}, xx=True)

    def slots_in_use(self, tenant: str) -> int:
        """The tenant's runs holding a live slot."""
        return self.r.zcount(self.k_grading(tenant), f"({self.server_time()}", "+inf")

    def wake(self, tenant: str, slots: int, grace: float) -> list[tuple[str, bool]]:
        """The tenant's oldest waiting runs that the free slots can take, each marked woken
        now, with whether it had been woken before (its message may still be queued);
        the caller sends each one's task. A run woken less than ``grace`` s ago is left
        alone."""
        keys = [self.k_grading(tenant), self.k_waiting(tenant), self.k_queued()]
        out = self._wake(keys=keys, args=[int(slots), grace, f"{self.p}evalrun:"])
        return [(out[i], bool(int(out[i + 1]))) for i in range(0, len(out), 2)]

    # ---- events
    def add_event(
        self,
        run_id: str,
        message: str,
        *,
        type: str = "message",
        level: str = "info",
        data: dict | None = None,
    ) -> str | None:
        """Append an event; None (nothing written) when the run is gone."""
        args: list[Any] = [self.events_maxlen]
        for k, v in _event_fields(message, type, level, data).items():
            args += [k, v]
        return self._xadd_live(keys=[self.k_run(run_id), self.k_items(run_id, "events")], args=args)

    def events(
        self, run_id: str, after: str | None, limit: int
    ) -> tuple[list[tuple[str, dict]], bool]:
        """Newest first; ``after`` is a stream id, the page holds entries strictly older."""
        top = f"({after}" if after else "+"
        rows = self.r.xrevrange(self.k_items(run_id, "events"), max=top, min="-", count=limit + 1)
        return rows[:limit], len(rows) > limit

    def delete_eval_runs(self, eval_id: str) -> None:
        """Every run of an eval (the eval is being deleted)."""
        for run_id in self.r.zrange(self.k_index(eval_id), 0, -1):
            try:
                self.delete(run_id)
            except EvalRunNotFound:
                pass
        self.r.delete(self.k_index(eval_id))

    # ---- output items
    def stored(self, run_id: str) -> set[int]:
        return {int(i) for i in self.r.zrange(self.k_items(run_id, "all"), 0, -1)}

    def store_item(
        self, run_id: str, index: int, item: dict[str, Any], counter: str, increments: dict
    ) -> int:
        """Store row ``index``'s output item and add to the run's counts, atomically:
        1 stored, 0 it was already stored (nothing changes), -1 the run is gone."""
        pairs = [x for k, v in increments.items() if v for x in (k, int(v))]
        keys = [
            self.k_run(run_id),
            self.k_items(run_id),
            self.k_items(run_id, "all"),
            self.k_items(run_id, item["status"]),
        ]
        args = [index, json.dumps(item), item["status"], counter, *pairs]
        return int(self._store(keys=keys, args=args))

    def item(self, run_id: str, index: int) -> dict[str, Any] | None:
        raw = self.r.hget(self.k_items(run_id), str(index))
        return json.loads(raw) if raw else None

    def items(
        self,
        run_id: str,
        after: int | None,
        limit: int,
        *,
        order: str = "asc",
        status: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of output items by row index; ``after`` is the index the previous page
        ended with; ``status``: only ``pass`` or only ``fail`` items."""
        key = self.k_items(run_id, status or "all")
        desc = order == "desc"
        if after is None:
            lo, hi = ("+inf", "-inf") if desc else ("-inf", "+inf")
        else:
            lo, hi = (f"({after}", "-inf") if desc else (f"({after}", "+inf")
        if desc:
            found = self.r.zrevrangebyscore(key, lo, hi, start=0, num=limit + 1)
        else:
            found = self.r.zrangebyscore(key, lo, hi, start=0, num=limit + 1)
        raws = self.r.hmget(self.k_items(run_id), found[:limit]) if found else []
        return [json.loads(r) for r in raws if r], len(found) > limit


def wake_waiting(
    runs: EvalRunStore,
    run: dict[str, Any],
    slots: int,
    settings: Any,
    enqueue: Callable[[str, str], None],
) -> list[str]:
    """``run`` (a record) freed its grading slot: send the task of its tenant's oldest
    waiting runs, as many as ``slots`` leaves free, each to its own queue (else
    ``settings.queue``); their ids. A run woken less than ``settings.requeue_grace_seconds``
    ago is not sent twice."""
    woken = runs.wake(run["tenant"], slots, settings.requeue_grace_seconds)
    for other, _ in woken:
        enqueue(other, runs.r.hget(runs.k_run(other), "queue") or settings.queue)
    return [other for other, _ in woken]


_ITEM_KEYS = ("items", "all", "pass", "fail", "events")
_JSON = ("metadata", "data_source", "spec", "error")
_COUNTS = ("total", "progress", "passed", "failed", "errored", "regraded", "attempt", *USAGE)


def _event_fields(message: str, type: str, level: str, data: dict | None) -> dict[str, Any]:
    return {
        "created_at": int(time.time()),
        "level": level,
        "message": message,
        "type": type,
        "data": json.dumps(data) if data is not None else "",
    }


def _decode(rec: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(rec)
    for field in _JSON:
        out[field] = json.loads(rec[field]) if rec.get(field) else None
    out["metadata"] = out["metadata"] or {}
    out["spec"] = out["spec"] or {}
    for field in _COUNTS:
        out[field] = int(rec.get(field) or 0)
    out["created_at"] = int(float(rec.get("created_at") or 0))
    out["tenant"] = rec.get("tenant") or DEFAULT_TENANT
    out["limit"] = int(rec["limit"]) if rec.get("limit") else None
    judges: dict[str, dict[str, int]] = {}
    for field, value in rec.items():
        if field.startswith("usage:"):
            model, _, key = field.removeprefix("usage:").rpartition(":")
            judges.setdefault(model, {})[key] = int(value or 0)
    out["judge_usage"] = judges
    criteria = out["spec"].get("criteria") or []
    out["criteria_counts"] = [
        (int(rec.get(f"c{i}:passed") or 0), int(rec.get(f"c{i}:failed") or 0))
        for i in range(len(criteria))
    ]
    return out
