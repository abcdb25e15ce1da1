"""Which inference workers are alive, one Redis hash per inference queue.

An inference worker keeps its entry in ``{prefix}inference:{queue}`` (field = its
name; value = JSON with the URL of its front, its engine, devices, the models it has
loaded and an expiry in Redis server time), rewritten every heartbeat and removed at
shutdown, like training workers' entries (``workers.fleet``). The API reads the hash to
pick a worker for a request: one that has the model loaded, else any live one.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


def registry_key(prefix: str, queue: str) -> str:
    return f"{prefix}inference:{queue}"


def _now(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec + usec / 1e6


def advertise(client: redis.Redis, prefix: str, queue: str, info: dict, ttl: float) -> None:
    entry = {**info, "queue": queue, "expires_at": _now(client) + ttl}
    client.hset(registry_key(prefix, queue), info["name"], json.dumps(entry))


def withdraw(client: redis.Redis, prefix: str, queue: str, name: str) -> None:
    client.hdel(registry_key(prefix, queue), name)


def live_workers(client: redis.Redis, prefix: str, queue: str) -> list[dict]:
    """Entries of ``queue`` that have not expired (expired ones are pruned)."""
    key = registry_key(prefix, queue)
    now = _now(client)
    live: list[dict] = []
    dead: list[str] = []
    for name, raw in client.hgetall(key).items():
        try:
            info = json.loads(raw)
        except ValueError:
            info = {}
        if info.get("expires_at", 0) > now:
            live.append(info)
        else:
            dead.append(name)
    if dead:
        client.hdel(key, *dead)
    return live


def pick(workers: list[dict], model_key: str) -> dict | None:
    """A worker that has ``model_key`` loaded (or is loading it), else a random live one:
    requests for one model gather where its weights already are."""
    if not workers:
        return None
    warm = [w for w in workers if model_key in w.get("models", [])]
    return random.choice(warm or workers)


class Advertiser(threading.Thread):
    """Rewrites this worker's entry every ``interval`` s from ``info()``; withdraws on stop."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        queue: str,
        info: Callable[[], dict],
        interval: float,
        ttl: float,
    ):
        super().__init__(name="posttrain-inference-advertiser", daemon=True)
        self.client, self.prefix, self.queue, self.info = client, prefix, queue, info
        self.interval, self.ttl = interval, ttl
        self.stopped = threading.Event()
        self.name_ = info()["name"]

    def beat(self) -> None:
        advertise(self.client, self.prefix, self.queue, self.info(), self.ttl)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("could not advertise inference worker %s: %s", self.name_, exc)
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        try:
            withdraw(self.client, self.prefix, self.queue, self.name_)
        except redis.RedisError:
            pass
