"""Evals: OpenAI's eval objects (a data source config and testing criteria) in Redis.

  eval:{id}                     hash: id, name, metadata (JSON), data_source_config (JSON),
                                testing_criteria (JSON), grading (JSON: how a worker grades
                                each criterion, its models resolved for the tenant; never
                                answered), created_at (s), updated_at (s, float), tenant
                                (the owner)
  evals                         sorted set of every eval id by creation time (admins list it)
  evals:updated                 the same ids by last update
  evals:tenant:{name}           one tenant's eval ids by creation time
  evals:tenant:{name}:updated   the same by last update

A tenant's list reads its own index only, so listing costs the same whoever else has
evals. An id is ``eval_`` and 32 hex digits, like OpenAI's. The API validates what is
stored (``service/routes/evals.py``); this module stores and reads it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from workers.store import DEFAULT_TENANT

__all__ = ["ORDER_BY", "EvalNotFound", "EvalStore", "new_eval_id"]

ORDER_BY = ("created_at", "updated_at")
_JSON_FIELDS = ("metadata", "data_source_config", "testing_criteria", "grading")

# KEYS: the eval's hash, the all-evals update index, the tenant's update index.
# ARGV: eval id, the update time, then field/value pairs. Changes an eval that exists
# (never recreates one deleted meanwhile); 1 if it did, 0 if there was no such eval.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""


class EvalNotFound(KeyError):
    pass


def new_eval_id() -> str:
    return f"eval_{uuid.uuid4().hex}"


class EvalStore:
    def __init__(self, client: redis.Redis, prefix: str = "posttrain:"):
        self.r = client
        self.p = prefix
        self._update = client.register_script(_UPDATE)

    # ---- keys
    def k_eval(self, eval_id: str) -> str:
        return f"{self.p}eval:{eval_id}"

    def k_index(self, tenant: str | None, order_by: str = "created_at") -> str:
        """The ids by ``order_by``: one tenant's, or (``tenant`` None) everyone's."""
        base = f"{self.p}evals" if tenant is None else f"{self.p}evals:tenant:{tenant}"
        return base if order_by == "created_at" else f"{base}:updated"

    def _indexes(self, tenant: str) -> list[str]:
        return [self.k_index(t, o) for t in (None, tenant) for o in ORDER_BY]

    # ---- records
    def create(
        self,
        *,
        name: str,
        data_source_config: dict[str, Any],
        testing_criteria: list[dict[str, Any]],
        metadata: dict[str, str] | None = None,
        tenant: str = DEFAULT_TENANT,
        grading: list[dict[str, Any] | None] | None = None,
    ) -> dict[str, Any]:
        """``grading``: per criterion, how a worker grades it (``service.routes.evals.
        grading_plan``); a checkpoint's run, which the worker creates, reads it."""
        eval_id = new_eval_id()
        now = time.time()
        record = {
            "id": eval_id,
            "name": name,
            "metadata": json.dumps(metadata or {}),
            "data_source_config": json.dumps(data_source_config),
            "testing_criteria": json.dumps(testing_criteria),
            "grading": json.dumps(grading or []),
            "created_at": str(int(now)),
            "updated_at": repr(now),
            "tenant": tenant,
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_eval(eval_id), mapping=record)
        for key in self._indexes(tenant):
            pipe.zadd(key, {eval_id: now})
        pipe.execute()
        return _decode(record)

    def owner(self, eval_id: str) -> str | None:
        """The eval's tenant, or None when there is no such eval: one read of two short
        fields, whoever owns it."""
        tenant, created = self.r.hmget(self.k_eval(eval_id), "tenant", "created_at")
        return None if created is None else tenant or DEFAULT_TENANT

    def get(self, eval_id: str) -> dict[str, Any]:
        rec = self.r.hgetall(self.k_eval(eval_id))
        if not rec:
            raise EvalNotFound(eval_id)
        return _decode(rec)

    def list(
        self,
        after: str | None,
        limit: int,
        *,
        tenant: str | None,
        order: str = "desc",
        order_by: str = "created_at",
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page, newest first (``order="asc"``: oldest first) by ``order_by``, of one
        tenant's evals (``tenant`` None: everyone's); ``after`` is the last id of the
        previous page in the same order (EvalNotFound if it is not in the list)."""
        key = self.k_index(tenant, order_by)
        desc = order != "asc"
        start = 0
        if after:
            rank = self.r.zrevrank(key, after) if desc else self.r.zrank(key, after)
            if rank is None:
                raise EvalNotFound(after)
            start = rank + 1
        out: list[dict[str, Any]] = []
        more = False
        while len(out) <= limit:
            want = limit + 1 - len(out)
            ids = self.r.zrange(key, start, start + want - 1, desc=desc)
            if not ids:
                break
            start += len(ids)
            pipe = self.r.pipeline(transaction=False)
            for eval_id in ids:
                pipe.hgetall(self.k_eval(eval_id))
            # a hash gone between the two reads was deleted meanwhile: skipped
            out += [_decode(rec) for rec in pipe.execute() if rec]
        if len(out) > limit:
            out, more = out[:limit], True
        return out, more

    def update(
        self, eval_id: str, *, name: str | None = None, metadata: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Rename the eval and/or replace its metadata (None: unchanged); the record as it
        now is. EvalNotFound if there is no such eval (or it was deleted meanwhile)."""
        tenant = self.owner(eval_id)
        if tenant is None:
            raise EvalNotFound(eval_id)
        now = time.time()
        fields: dict[str, str] = {"updated_at": repr(now)}
        if name is not None:
            fields["name"] = name
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        pairs = [x for kv in fields.items() for x in kv]
        keys = [
            self.k_eval(eval_id),
            self.k_index(None, "updated_at"),
            self.k_index(tenant, "updated_at"),
        ]
        if not self._update(keys=keys, args=[eval_id, repr(now), *pairs]):
            raise EvalNotFound(eval_id)
        return self.get(eval_id)

    def delete(self, eval_id: str) -> None:
        """Remove the eval and its index entries; EvalNotFound if there is none."""
        tenant = self.owner(eval_id)
        if tenant is None:
            raise EvalNotFound(eval_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_eval(eval_id))
        for key in self._indexes(tenant):
            pipe.zrem(key, eval_id)
        removed, *_ = pipe.execute()
        if not removed:
            raise EvalNotFound(eval_id)


def _decode(rec: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(rec)
    for field in _JSON_FIELDS:
        out[field] = json.loads(rec[field]) if rec.get(field) else None
    out["metadata"] = out["metadata"] or {}
    out["testing_criteria"] = out["testing_criteria"] or []
    out["grading"] = out["grading"] or []
    out["data_source_config"] = out["data_source_config"] or {}
    out["created_at"] = int(float(rec.get("created_at") or 0))
    out["updated_at"] = float(rec.get("updated_at") or out["created_at"])
    out["name"] = rec.get("name", "")
    out["tenant"] = rec.get("tenant") or DEFAULT_TENANT
    return out
