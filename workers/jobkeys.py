"""The Redis key layout of job records, and the base the parts of ``JobStore`` share.

Keys (all under the settings' ``key_prefix``):
  job:{id}              hash: spec JSON, status, timestamps, attempt, error, lease
  jobs                  sorted set of job ids by creation time (pagination)
  job:{id}:events       stream (bounded, MAXLEN ~) of fine_tuning.job.event payloads
  job:{id}:metrics      stream (bounded, MAXLEN ~) of per-step metric dicts; entry id
                        ``{step}-1``, so a step cursor is a stream-id cursor
  job:{id}:samples      stream (bounded, MAXLEN ~) of sampled rollout rows of an RL job
                        (prompt, completion, rewards, advantage); entry id ``{step}-{n}``
  job:{id}:checkpoints  list of checkpoint metadata JSON, oldest first (pruned to the
                        job's retention: the newest N plus the final one)
  leased                sorted set of jobs holding a lease, by expiry (the reaper's index)
  queued                sorted set of queued jobs, by when a broker message was last sent
                        or seen for them (the reconciler's index)
  fence                 counter: the last fencing token handed to a claim
  idem:{tenant}:{key}   Idempotency-Key -> "job_id|request hash" (24 h), per tenant
  tenant:{name}:active  set of the tenant's job ids not yet seen terminal (quota count)
  fleet:unserved        hash: queue -> since when (API clock) queued jobs have waited on it
                        with no live worker (``workers.recovery.fail_unserved``)
  webhooks:events       stream of events for webhooks; a job's end is appended by the
                        status compare-and-set (``workers.webhooks`` lists its other keys)

``JobKeys`` holds the client and the prefix; ``workers.jobstate`` (status changes and
leases) and ``workers.jobstreams`` (events, metrics, samples, checkpoints) build on it, and
``workers.store.JobStore`` combines them.
"""

from __future__ import annotations

import json
from typing import Any

import redis


def webhook_events_key(prefix: str) -> str:
    """The stream job and eval-run ends are appended to (``workers.webhooks``)."""
    return f"{prefix}webhooks:events"


def encode(value: Any) -> str:
    """A hash field's value: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


class JobKeys:
    """The client, the key prefix and the key names. Subclasses register their Lua
    scripts in ``__init__`` and pass the keyword arguments they do not take along
    (cooperative ``super().__init__``), so ``JobStore`` can combine them."""

    def __init__(self, client: redis.Redis, prefix: str = "posttrain:"):
        self.r = client
        self.p = prefix

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

    def k_active(self, tenant: str) -> str:
        return f"{self.p}tenant:{tenant}:active"

    def k_unserved(self) -> str:
        return f"{self.p}fleet:unserved"

    def k_webhook_events(self) -> str:
        return webhook_events_key(self.p)

    def server_time(self) -> float:
        """Redis server time in seconds: the one clock leases are measured by."""
        sec, usec = self.r.time()
        return sec + usec / 1_000_000
