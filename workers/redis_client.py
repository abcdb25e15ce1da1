"""The one way posttrain builds a Redis client (API, worker, supervisor, Celery transport).

Every client gets socket and connect timeouts (a call never hangs on a dead or
partitioned server), retries with exponential backoff on connection errors and
timeouts (redis-py's ``Retry``), and a health check of idle pooled connections.
A call that still fails after its retries raises ``redis.RedisError``; callers
that must survive an outage (the supervisor) hold their work and try again.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from workers.settings import WorkerSettings


def client_options(s: WorkerSettings) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` built from the settings."""
    return {
        "socket_timeout": s.redis_socket_timeout,
        "socket_connect_timeout": s.redis_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": s.redis_health_check_interval,
        "retry": Retry(
            ExponentialBackoff(cap=s.redis_retry_cap, base=0.05),
            retries=s.redis_retries,
            supported_errors=(redis.ConnectionError, redis.TimeoutError),
        ),
    }


def make_redis(s: WorkerSettings, url: str | None = None) -> redis.Redis:
    """A client of ``url`` (default: the job-record Redis) with posttrain's timeouts."""
    return redis.Redis.from_url(url or s.redis_url, decode_responses=True, **client_options(s))


def broker_transport_options(s: WorkerSettings) -> dict[str, Any]:
    """The same timeouts and health checks for kombu's Redis transport (Celery's broker),
    and its keys under their own prefix."""
    return {
        "global_keyprefix": s.broker_key_prefix,
        "socket_timeout": s.redis_socket_timeout,
        "socket_connect_timeout": s.redis_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": s.redis_health_check_interval,
        "retry_on_timeout": True,
    }
