"""Which workers are alive, on which queue, with which devices: one Redis hash per queue.

Every worker's main process keeps its entry in ``{prefix}workers:{queue}`` (field
= its Celery node name, value = JSON with its devices, the strategies it can run
and an expiry), rewritten every heartbeat and removed at shutdown. Expiry is
stamped and checked in Redis server time (``TIME``), so hosts' clocks never
matter; a worker that died without removing its entry simply stops counting
once its expiry passes, and later readers prune it. Listing a queue reads one
hash, however many jobs the database holds. The API reads these at job creation
to tell a job that no live worker of its queue fits from one that merely waits
for a worker to join. Nothing schedules from them: Celery's queues do the routing.
"""

from __future__ import annotations

import json
import logging
import threading

import redis

from trainers.contract.spec import stored_spec_view

log = logging.getLogger(__name__)


def job_queue(store, job_id: str, default: str) -> str:
    """The queue a job runs on: the one its record names (written at creation), else its
    ``resources.queue`` (older records), else ``default`` (the deployment's
    POSTTRAIN_QUEUE). Retries, resumes and the reaper re-enqueue a job on this queue."""
    try:
        rec = store.get(job_id)
        if rec.get("queue"):
            return rec["queue"]
        resources = stored_spec_view(rec["spec"]).get("resources") or {}
    except Exception:  # a vanished or unreadable record: the caller's default
        return default
    return resources.get("queue") or default


def fleet_key(prefix: str, queue: str) -> str:
    return f"{prefix}workers:{queue}"


def _now(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec + usec / 1e6


def advertise(
    client: redis.Redis,
    prefix: str,
    queue: str,
    name: str,
    devices: list[str],
    strategies: list[str],
    ttl: float,
    engines: list[str] | None = None,
) -> None:
    info = {
        "name": name,
        "queue": queue,
        "gpus": devices,
        "strategies": strategies,
        "expires_at": _now(client) + ttl,
    }
    if engines is not None:  # absent: a worker of an earlier release (not checked)
        info["engines"] = engines
    client.hset(fleet_key(prefix, queue), name, json.dumps(info))


def withdraw(client: redis.Redis, prefix: str, queue: str, name: str) -> None:
    client.hdel(fleet_key(prefix, queue), name)


def live_workers(client: redis.Redis, prefix: str, queue: str) -> list[dict]:
    """The workers of ``queue`` whose entry has not expired (expired ones are pruned)."""
    key = fleet_key(prefix, queue)
    entries = client.hgetall(key)
    now = _now(client)
    live, dead = [], []
    for _name, raw in sorted(entries.items()):
        info = json.loads(raw)
        (live if info.get("expires_at", 0) > now else dead).append(info)
    if dead:
        client.hdel(key, *[d["name"] for d in dead])
    return live


def fleet_queues(client: redis.Redis, prefix: str) -> set[str]:
    """The queues with a worker entry, live or not yet pruned."""
    start = len(fleet_key(prefix, ""))
    return {key[start:] for key in client.scan_iter(match=fleet_key(prefix, "*"), count=100)}


def live_queues(client: redis.Redis, prefix: str) -> set[str]:
    """The queues at least one live worker serves."""
    return {q for q in fleet_queues(client, prefix) if live_workers(client, prefix, q)}


class Advertiser(threading.Thread):
    """Rewrites this worker's key every ``interval`` s (TTL ``ttl``); deletes it on stop."""

    def __init__(
        self, client, prefix, queue, name, devices, strategies, interval, ttl, engines=None
    ):
        super().__init__(name="posttrain-advertiser", daemon=True)
        self.client, self.prefix, self.queue, self.name = client, prefix, queue, name
        self.devices, self.strategies, self.engines = devices, strategies, engines
        self.interval, self.ttl = interval, ttl
        self.stopped = threading.Event()

    def beat(self) -> None:
        advertise(
            self.client,
            self.prefix,
            self.queue,
            self.name,
            self.devices,
            self.strategies,
            self.ttl,
            self.engines,
        )

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("could not advertise worker %s: %s", self.name, exc)
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        try:
            withdraw(self.client, self.prefix, self.queue, self.name)
        except redis.RedisError:
            pass
