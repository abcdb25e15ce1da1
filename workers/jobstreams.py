"""A job's events, metrics and samples streams and its checkpoint list in Redis.

Every write is Lua that first checks the job's hash exists, so a late write from a
worker never recreates a deleted job's keys. Callers use these through
``workers.store.JobStore``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from workers.jobkeys import JobKeys

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

# KEYS: job hash, checkpoint list, the job's eval-run bindings (``job:{id}:evalruns``).
# ARGV: new checkpoint's metadata JSON ('' = none: a pruning pass only), keep (0 = all),
# the key prefix of eval runs (``{prefix}evalrun:``). Adds the checkpoint (replacing an
# entry of the same step: a report applied twice), then removes the non-final entries
# beyond the ``keep`` newest and returns them, for the caller to delete their files.
# Final checkpoints are never pruned, nor is one whose eval run (bound to its step,
# ``workers.ckptevals``) is still queued or in progress: that one is pruned by a later
# pass, which the run's end makes.
_ADD_CHECKPOINT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] ~= '' then
  local new = cjson.decode(ARGV[1])
  for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if cjson.decode(raw).step == new.step then redis.call('LREM', KEYS[2], 0, raw) end
  end
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
local keep, seen, pruned = tonumber(ARGV[2]), 0, {}
if keep <= 0 then return pruned end
local pinned = {}
local bindings = redis.call('HGETALL', KEYS[3])
for i = 1, #bindings, 2 do
  local step = string.match(bindings[i], '^(%d+):')
  if step then
    local status = redis.call('HGET', ARGV[3] .. bindings[i + 1], 'status')
    if status == 'queued' or status == 'in_progress' then pinned[tonumber(step)] = true end
  end
end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #items, 1, -1 do
  local meta = cjson.decode(items[i])
  if not meta.final then
    seen = seen + 1
    if seen > keep and not pinned[meta.step] then
      redis.call('LREM', KEYS[2], 1, items[i])
      table.insert(pruned, items[i])
    end
  end
end
return pruned
"""

# KEYS: job hash, checkpoint list. ARGV: step, metrics JSON. Merges the metrics into the
# checkpoint entry of that step; 1 if there was one, 0 if not (pruned, or the job gone).
_CHECKPOINT_METRICS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local step, add = tonumber(ARGV[1]), cjson.decode(ARGV[2])
for i, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local meta = cjson.decode(raw)
  if meta.step == step then
    for k, v in pairs(add) do meta.metrics[k] = v end
    redis.call('LSET', KEYS[2], i - 1, cjson.encode(meta))
    return 1
  end
end
return 0
"""


# KEYS: job hash, samples stream. ARGV: step, maxlen, then one row JSON per entry.
# Entry ids are ``{step}-{n}`` (n from 1, per report), so a row's id is a cursor and a step
# is an id range. A report at or below the newest step is a resumed attempt re-running
# steps after its checkpoint: the lost attempt's rows from that step on go first (as
# _ADD_METRICS does).
_ADD_SAMPLES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local step = tonumber(ARGV[1])
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if top and tonumber(string.match(top[1], '^(%d+)-')) >= step then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+')) do
    redis.call('XDEL', KEYS[2], e[1])
  end
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  redis.call('XSETID', KEYS[2], last and last[1] or '0-0')
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], ARGV[1] .. '-' .. (i - 2), 'row', ARGV[i])
end
return #ARGV - 2
"""

_ID_MAX = 2**64 - 1  # the largest sequence number of a stream id


class JobStreams(JobKeys):
    """Events (newest first), per-step metrics (a step cursor), samples of RL rollouts
    (oldest first, a row cursor) and checkpoint metadata."""

    # Stream bounds (XADD MAXLEN ~; the settings ``events_maxlen``, ``metrics_maxlen`` and
    # ``samples_maxlen`` override).
    events_maxlen = 10_000
    metrics_maxlen = 100_000
    samples_maxlen = 2_000

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "posttrain:",
        *,
        events_maxlen: int | None = None,
        metrics_maxlen: int | None = None,
        samples_maxlen: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(client, prefix, **kwargs)
        self.events_maxlen = events_maxlen or self.events_maxlen
        self.metrics_maxlen = metrics_maxlen or self.metrics_maxlen
        self.samples_maxlen = samples_maxlen or self.samples_maxlen
        self._add_samples = client.register_script(_ADD_SAMPLES)
        self._xadd_live = client.register_script(_XADD_LIVE)
        self._add_metrics = client.register_script(_ADD_METRICS)
        self._add_checkpoint = client.register_script(_ADD_CHECKPOINT)
        self._checkpoint_metrics = client.register_script(_CHECKPOINT_METRICS)

    # ---- events
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

    # ---- metrics
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

    def last_metric_step(self, job_id: str) -> int:
        """The newest step in the job's metrics stream (0 if none)."""
        rows = self.r.xrevrange(f"{self.k_job(job_id)}:metrics", count=1)
        return int(rows[0][1]["step"]) if rows else 0

    # ---- samples
    def add_samples(self, job_id: str, step: int, rows: list[dict[str, Any]]) -> int:
        """Append one report's rows (oldest first); a step reported again (a resumed run)
        replaces the rows from that step on. Returns how many were written (0 when the
        job's record is gone)."""
        if not rows:
            return 0
        created = int(time.time())
        args: list[Any] = [int(step), self.samples_maxlen]
        args += [json.dumps({"step": int(step), "created_at": created, **r}) for r in rows]
        written = self._add_samples(
            keys=[self.k_job(job_id), f"{self.k_job(job_id)}:samples"], args=args
        )
        return int(written or 0)

    def samples(
        self, job_id: str, after: str | None, limit: int, step: int | None = None
    ) -> tuple[list[tuple[str, dict]], bool]:
        """Oldest first: (stream id, row) pairs after the stream id ``after``, of ``step``
        alone when it is given; one XRANGE of ``limit + 1`` entries."""
        start, end = "-", "+"
        if step is not None:
            start, end = f"{step}-0", f"{step}-{_ID_MAX}"
        if after is not None and (step is None or _id_key(after) >= (step, 0)):
            start = f"({after}"
        rows = self.r.xrange(f"{self.k_job(job_id)}:samples", start, end, count=limit + 1)
        out = [(sid, json.loads(f["row"])) for sid, f in rows]
        return out[:limit], len(out) > limit

    # ---- checkpoints
    def add_checkpoint(self, job_id: str, meta: dict, keep: int = 0) -> list[dict]:
        """Record a complete checkpoint; with ``keep`` > 0, drop every non-final entry
        beyond the ``keep`` newest from the list, except those whose eval run is queued or
        in progress, and return the dropped entries (whose files the caller deletes).
        Nothing is written when the job's record is gone."""
        return self._checkpoints_pass(job_id, json.dumps(meta), keep)

    def prune_checkpoints(self, job_id: str, keep: int) -> list[dict]:
        """The pruning of ``add_checkpoint`` alone (an eval run that kept a checkpoint
        ended); the dropped entries."""
        return self._checkpoints_pass(job_id, "", keep)

    def _checkpoints_pass(self, job_id: str, meta_json: str, keep: int) -> list[dict]:
        job = self.k_job(job_id)
        pruned = self._add_checkpoint(
            keys=[job, f"{job}:checkpoints", f"{job}:evalruns"],
            args=[meta_json, int(keep), f"{self.p}evalrun:"],
        )
        return [json.loads(x) for x in pruned or []]

    def update_checkpoint_metrics(self, job_id: str, step: int, values: dict[str, float]) -> bool:
        """Merge ``values`` into the metrics of the checkpoint at ``step`` (an eval's pass
        rate, ``workers.ckptevals``); False when there is no such checkpoint any more."""
        done = self._checkpoint_metrics(
            keys=[self.k_job(job_id), f"{self.k_job(job_id)}:checkpoints"],
            args=[int(step), json.dumps(values)],
        )
        return bool(done)

    def checkpoints(self, job_id: str) -> list[dict]:
        """Oldest first."""
        return [json.loads(x) for x in self.r.lrange(f"{self.k_job(job_id)}:checkpoints", 0, -1)]


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
