"""Webhooks: per-tenant endpoints, the events they are sent, and their deliveries in Redis.

Events are written where the state changes, atomically with it: the job state machine's
compare-and-set (``workers.jobstate``) appends ``fine_tuning.job.succeeded|failed|
cancelled`` to one stream when a job ends, so no end is missed by a process that dies
right after it. A deliverer (``service.webhooks``, in each API process) fans each event
out to its tenant's endpoints as deliveries, and sends due deliveries, retrying with
exponential backoff until one is accepted or ``max_age`` has passed since the event.

Keys (under the settings' ``key_prefix``):
  webhook:{id}               hash: id, tenant, url, events (JSON list), secret,
                             description, created_at
  webhooks:tenant:{tenant}   set of the tenant's endpoint ids
  webhooks:events            stream (bounded, MAXLEN ~) of events: type, object, tenant, at
  webhook:delivery:{id}      hash: endpoint, event id, type, payload (the JSON body sent on
                             every try), attempts, first_at, status (pending, delivered,
                             failed); expires ``RETAIN_SECONDS`` after its last change
  webhooks:outbox            sorted set of pending delivery ids by when they are due
                             (a claimed delivery is pushed ``lease`` seconds ahead)
  webhook:{id}:log           list of the endpoint's delivery attempts, newest first (capped)

A delivery's id is ``{event id}.{endpoint id}``: fanning an event out twice (a deliverer
died before acknowledging it) makes no second delivery.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from typing import Any

import redis

from workers.jobkeys import webhook_events_key
from workers.store import DEFAULT_TENANT

EVENTS_MAXLEN = 100_000  # the job state machine's Lua trims to the same
LOG_LENGTH = 100
RETAIN_SECONDS = 3 * 86400
GROUP = "deliverers"
JOB_EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
EVAL_RUN_EVENTS = ("eval.run.succeeded", "eval.run.failed", "eval.run.canceled")
EVENT_TYPES = JOB_EVENTS + EVAL_RUN_EVENTS

# KEYS: delivery hash, outbox. ARGV: delivery id, endpoint, event id, type, payload, now,
# retain seconds. 1 created, 0 it existed.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'endpoint', ARGV[2], 'event', ARGV[3],
           'type', ARGV[4], 'payload', ARGV[5], 'attempts', 0, 'first_at', ARGV[6],
           'status', 'pending')
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return 1
"""

# KEYS: outbox. ARGV: now, lease seconds, max count. The due delivery ids, each pushed
# ``lease`` ahead so no other deliverer takes it while this one tries.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return due
"""


class EndpointNotFound(KeyError):
    pass


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def job_event_type(status: str) -> str:
    return f"fine_tuning.job.{status}"


class WebhookStore:
    def __init__(self, client: redis.Redis, prefix: str = "posttrain:"):
        self.r, self.p = client, prefix
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)

    # ---- keys
    def k_endpoint(self, endpoint_id: str) -> str:
        return f"{self.p}webhook:{endpoint_id}"

    def k_tenant(self, tenant: str) -> str:
        return f"{self.p}webhooks:tenant:{tenant}"

    def k_events(self) -> str:
        return webhook_events_key(self.p)

    def k_delivery(self, delivery_id: str) -> str:
        return f"{self.p}webhook:delivery:{delivery_id}"

    def k_outbox(self) -> str:
        return f"{self.p}webhooks:outbox"

    def k_log(self, endpoint_id: str) -> str:
        return f"{self.p}webhook:{endpoint_id}:log"

    # ---- endpoints
    def create(self, tenant: str, url: str, events: list[str], description: str) -> dict:
        rec = {
            "id": f"wh_{uuid.uuid4().hex[:24]}",
            "tenant": tenant,
            "url": url,
            "events": json.dumps(events),
            "secret": new_secret(),
            "description": description,
            "created_at": str(int(time.time())),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_endpoint(rec["id"]), mapping=rec)
        pipe.sadd(self.k_tenant(tenant), rec["id"])
        pipe.execute()
        return _decode(rec)

    def owner(self, endpoint_id: str) -> str | None:
        return self.r.hget(self.k_endpoint(endpoint_id), "tenant")

    def get(self, endpoint_id: str) -> dict:
        rec = self.r.hgetall(self.k_endpoint(endpoint_id))
        if not rec:
            raise EndpointNotFound(endpoint_id)
        return _decode(rec)

    def of_tenant(self, tenant: str) -> list[dict]:
        """The tenant's endpoints, newest first."""
        ids = sorted(self.r.smembers(self.k_tenant(tenant)))
        pipe = self.r.pipeline(transaction=False)
        for endpoint_id in ids:
            pipe.hgetall(self.k_endpoint(endpoint_id))
        recs = [_decode(rec) for rec in pipe.execute() if rec]
        return sorted(recs, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete(self, endpoint_id: str) -> None:
        rec = self.get(endpoint_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_endpoint(endpoint_id), self.k_log(endpoint_id))
        pipe.srem(self.k_tenant(rec["tenant"]), endpoint_id)
        pipe.execute()

    def log(self, endpoint_id: str, limit: int) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.k_log(endpoint_id), 0, limit - 1)]

    # ---- events
    def emit(self, event_type: str, object_id: str, tenant: str) -> str:
        """Append an event (what the job state machine's Lua does for job ends)."""
        fields = {"type": event_type, "object": object_id, "tenant": tenant, "at": time.time()}
        return self.r.xadd(self.k_events(), fields, maxlen=EVENTS_MAXLEN, approximate=True)

    def fan_out(self, consumer: str, count: int = 100, stale_ms: int = 60_000) -> int:
        """Turn new events (and ones a dead deliverer left unacknowledged for ``stale_ms``)
        into deliveries to the endpoints subscribed; the number of deliveries made."""
        key = self.k_events()
        try:
            _, stale, _ = self.r.xautoclaim(key, GROUP, consumer, stale_ms, count=count)
        except redis.ResponseError as exc:  # no stream or group yet (or Redis lost them)
            if "NOGROUP" not in str(exc):
                raise
            self._create_group(key)
            _, stale, _ = self.r.xautoclaim(key, GROUP, consumer, stale_ms, count=count)
        fresh = self.r.xreadgroup(GROUP, consumer, {key: ">"}, count=count)
        entries = list(stale) + [e for _, batch in fresh for e in batch]
        made = 0
        for event_id, fields in entries:
            if fields:  # an entry trimmed away meanwhile comes back empty
                made += self._deliveries(event_id, fields)
            self.r.xack(key, GROUP, event_id)
        return made

    def _create_group(self, key: str) -> None:
        try:
            self.r.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # another deliverer made it first
                raise

    def _deliveries(self, event_id: str, fields: dict[str, str]) -> int:
        made = 0
        at = float(fields.get("at") or time.time())
        public_id = f"evt_{event_id.replace('-', '_')}"
        payload = json.dumps(
            {
                "object": "event",
                "id": public_id,
                "type": fields["type"],
                "created_at": int(at),
                "data": {"id": fields["object"]},
            },
            separators=(",", ":"),
        )
        for endpoint in self.of_tenant(fields.get("tenant") or DEFAULT_TENANT):
            if fields["type"] not in endpoint["events"]:
                continue
            delivery_id = f"{event_id}.{endpoint['id']}"
            made += self._create(
                keys=[self.k_delivery(delivery_id), self.k_outbox()],
                args=[
                    delivery_id,
                    endpoint["id"],
                    public_id,
                    fields["type"],
                    payload,
                    time.time(),
                    RETAIN_SECONDS,
                ],
            )
        return made

    # ---- deliveries
    def claim(self, lease: float, count: int = 50) -> list[dict]:
        """Due deliveries, each held for ``lease`` seconds; ones whose record or endpoint
        is gone are dropped from the outbox."""
        ids = self._claim(keys=[self.k_outbox()], args=[time.time(), lease, count])
        out = []
        for delivery_id in ids:
            rec = self.r.hgetall(self.k_delivery(delivery_id))
            endpoint = self.r.hgetall(self.k_endpoint(rec.get("endpoint", ""))) if rec else {}
            if not rec or not endpoint:
                self.r.zrem(self.k_outbox(), delivery_id)
                continue
            rec["endpoint"] = _decode(endpoint)
            out.append(rec)
        return out

    def record(
        self,
        delivery: dict,
        *,
        status_code: int | None,
        error: str | None,
        retry_in: float | None,
    ) -> str:
        """One attempt's outcome: delivered (a 2xx), retried in ``retry_in`` seconds, or
        failed for good (``retry_in`` None). Logged on the endpoint; the new status."""
        delivered = status_code is not None and 200 <= status_code < 300
        status = "delivered" if delivered else "pending" if retry_in is not None else "failed"
        attempt = int(delivery.get("attempts") or 0) + 1
        endpoint = delivery["endpoint"]["id"]
        now = time.time()
        entry = {
            "delivery_id": delivery["id"],
            "event_id": delivery["event"],
            "type": delivery["type"],
            "attempt": attempt,
            "at": int(now),
            "status_code": status_code,
            "error": error,
            "outcome": status if status != "pending" else "retrying",
        }
        if retry_in is not None and not delivered:
            entry["next_attempt_at"] = int(now + retry_in)
        pipe = self.r.pipeline(transaction=True)
        key = self.k_delivery(delivery["id"])
        pipe.hset(key, mapping={"attempts": attempt, "status": status})
        pipe.expire(key, RETAIN_SECONDS)
        if status == "pending":
            pipe.zadd(self.k_outbox(), {delivery["id"]: now + retry_in})
        else:
            pipe.zrem(self.k_outbox(), delivery["id"])
        pipe.lpush(self.k_log(endpoint), json.dumps(entry))
        pipe.ltrim(self.k_log(endpoint), 0, LOG_LENGTH - 1)
        pipe.execute()
        return status


def _decode(rec: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(rec)
    out["events"] = json.loads(rec.get("events") or "[]")
    out["created_at"] = int(rec.get("created_at") or 0)
    return out
