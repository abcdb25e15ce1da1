"""Eval runs and their output items in Redis, and the rows a run grades (torch-free).

  evalrun:{id}              hash: id, eval_id, tenant, name, status, model, created_at,
                            metadata, data_source (JSON, as the caller gave it), spec (JSON:
                            what the worker needs: criteria, model header, sampling
                            parameters), error (JSON or empty), total (rows), and the counts
                            the worker adds as it stores items: progress, passed, failed,
                            errored, c{i}:passed / c{i}:failed (criterion i), the usage
                            sums invocation_count, prompt_tokens, completion_tokens,
                            total_tokens, cached_tokens of the run's model, and the same
                            sums of each judge model as usage:{model}:{sum}
  evalrun:{id}:items        hash: row index -> the output item (JSON)
  evalrun:{id}:all          sorted set of the stored row indexes (score: the index)
  evalrun:{id}:pass / :fail the same, by the output item's status
  evalruns:eval:{eval_id}   sorted set of the eval's run ids by creation time

An output item and every count it changes are written by one script (``_STORE``) that
does nothing when the row is already stored or the run is gone: a redelivered task
(its worker was killed) skips rows already stored and never counts one twice. A run's
status changes only through ``transition`` (a compare-and-set), so a cancel is never
overwritten by a worker finishing the run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from workers.store import DEFAULT_TENANT

__all__ = [
    "FINISHED",
    "MAX_ITEMS",
    "NO_ERROR",
    "USAGE",
    "EvalRunNotFound",
    "EvalRunStore",
    "RowError",
    "check_item",
    "check_row",
    "new_run_id",
    "output_item_id",
    "read_rows",
    "usage_field",
]

MAX_ITEMS = 10_000  # rows of one run
MAX_ROW_BYTES = 1 << 20  # one row of a run's data, as JSON
FINISHED = ("completed", "failed", "canceled")
STATUSES = ("queued", "in_progress", *FINISHED)
NO_ERROR = {"code": "", "message": ""}  # OpenAI's schema: error is an object, never null
USAGE = ("invocation_count", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")

# KEYS: run hash, items hash, all index, status index. ARGV: row index, item JSON, status
# ("pass"/"fail"), counter (passed/failed/errored), then field/increment pairs.
# 1 stored; 0 already stored; -1 no such run (deleted).
_STORE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'progress', 1)
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: run hash. ARGV: new status, error JSON ('' = unchanged), then allowed old statuses.
# The old status if it changed, else false.
_TRANSITION = """
local old = redis.call('HGET', KEYS[1], 'status')
if not old then return false end
for i = 3, #ARGV do
  if old == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[2]) end
    return old
  end
end
return false
"""


class EvalRunNotFound(KeyError):
    pass


class RowError(ValueError):
    """A row of a run's data that cannot be graded; ``where`` names it (the field path)."""

    def __init__(self, where: str, message: str, line: int | None = None):
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.line = where, message, line


def usage_field(model: str, key: str) -> str:
    """The run hash's field summing usage ``key`` of judge ``model``'s calls."""
    return f"usage:{model}:{key}"


def new_run_id() -> str:
    return f"evalrun_{uuid.uuid4().hex}"


def output_item_id(run_id: str, index: int) -> str:
    """An output item's id: its run's hex and its row index (retrieval reads both)."""
    return f"outputitem_{run_id.removeprefix('evalrun_')}_{index}"


class EvalRunStore:
    def __init__(self, client: redis.Redis, prefix: str = "posttrain:"):
        self.r = client
        self.p = prefix
        self._store = client.register_script(_STORE)
        self._transition = client.register_script(_TRANSITION)

    # ---- keys
    def k_run(self, run_id: str) -> str:
        return f"{self.p}evalrun:{run_id}"

    def k_items(self, run_id: str, which: str = "items") -> str:
        """``items`` (the hash), ``all``, ``pass`` or ``fail`` (the indexes)."""
        return f"{self.p}evalrun:{run_id}:{which}"

    def k_index(self, eval_id: str) -> str:
        return f"{self.p}evalruns:eval:{eval_id}"

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
    ) -> dict[str, Any]:
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
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_run(run_id), mapping=record)
        pipe.zadd(self.k_index(eval_id), {run_id: now})
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
        """Set ``status`` if the run is in one of ``allowed``; the old status, else None."""
        args = [status, json.dumps(error) if error else "", *allowed]
        return self._transition(keys=[self.k_run(run_id)], args=args)

    def delete(self, run_id: str) -> None:
        rec = self.get(run_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_run(run_id), *(self.k_items(run_id, w) for w in _ITEM_KEYS))
        pipe.zrem(self.k_index(rec["eval_id"]), run_id)
        pipe.execute()

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


_ITEM_KEYS = ("items", "all", "pass", "fail")
_JSON = ("metadata", "data_source", "spec", "error")
_COUNTS = ("total", "progress", "passed", "failed", "errored", *USAGE)


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


# ---- rows
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _is_type(value: Any, kind: str) -> bool:
    if kind not in _TYPES:
        return True  # a type this checker does not know: not checked
    if isinstance(value, bool) and kind in ("number", "integer"):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def check_item(value: Any, schema: Any, where: str) -> None:
    """Raise RowError naming the first field of ``value`` that ``schema`` refuses.

    A subset of JSON Schema, as deep as the schema goes: ``type`` (one or a list),
    ``required``, ``properties``, ``items``, ``enum``. Other keywords are not checked."""
    if not isinstance(schema, dict):
        return
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if isinstance(kinds, list) and not any(_is_type(value, k) for k in kinds):
        raise RowError(where, f"must be of type {' or '.join(kinds)}, got {_json_type(value)}")
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        raise RowError(where, f"must be one of {json.dumps(enum)[:200]}")
    if isinstance(value, dict):
        for name in schema.get("required") or []:
            if name not in value:
                raise RowError(f"{where}.{name}", "is required by the eval's item_schema")
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                check_item(value[name], sub, f"{where}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, element in enumerate(value):
            check_item(element, schema["items"], f"{where}[{i}]")


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name) and not (name == "number" and isinstance(value, int)):
            return name
    return type(value).__name__


def read_rows(lines: Iterable[bytes | str], where: str) -> list[dict[str, Any]]:
    """The rows of an eval data file: one JSON object ``{"item": {...}, "sample": {...}}``
    per line (``sample`` optional; blank lines skipped). RowError names the line."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            line = line.decode("utf-8-sig" if number == 1 else "utf-8", "replace")
        if not line.strip():
            continue
        at = f"{where} line {number}"
        if len(line) > MAX_ROW_BYTES:
            raise RowError(at, f"a row is at most {MAX_ROW_BYTES} bytes", number)
        try:
            row = json.loads(line)
        except ValueError:
            raise RowError(at, "is not JSON", number) from None
        try:
            check_row(row, at)
        except RowError as exc:
            exc.line = number
            raise
        rows.append(row)
        if len(rows) > MAX_ITEMS:
            raise RowError(where, f"at most {MAX_ITEMS} rows")
    if not rows:
        raise RowError(where, "has no rows")
    return rows


def check_row(row: Any, where: str) -> None:
    """A row's shape: an object with an ``item`` object and an optional ``sample`` object."""
    if not isinstance(row, dict):
        raise RowError(where, 'must be an object {"item": {...}, "sample": {...}}')
    extra = next((k for k in row if k not in ("item", "sample")), None)
    if extra is not None:
        raise RowError(f"{where}.{extra}", "unknown field; a row has 'item' and 'sample'")
    if not isinstance(row.get("item"), dict):
        raise RowError(f"{where}.item", "is required and must be an object")
    if "sample" in row and not isinstance(row["sample"], dict):
        raise RowError(f"{where}.sample", "must be an object")
