"""Webhook delivery from the API process: fan events out, send due deliveries, sign them.

Each API process runs ``deliver_forever`` beside its other upkeep. Several API processes
share the work through Redis (``workers.webhooks``: a consumer group for events, claims
with a lease for deliveries), and a process that dies mid-delivery leaves the delivery
to be retried when its lease runs out. A delivery is a POST of the event's JSON with the
Standard Webhooks headers (``webhook-id``: the event id, the same on every try, for the
receiver to drop duplicates; ``webhook-timestamp``; ``webhook-signature``: HMAC-SHA256
with the endpoint's secret, computed by the ``standardwebhooks`` library). A 2xx answer
delivers it; anything else (an error status, a timeout, a refused connection, a target
the address policy refuses) is retried after ``retry_seconds * 2**(attempt-1)`` (capped
at an hour) until ``max_age_seconds`` after the event, then marked failed. Redirects are
not followed.

Address policy (``trainers.contract.outbound``, shared with RL jobs' tools): an endpoint's
host must resolve only to public addresses (not loopback, private, link-local, multicast,
reserved or unspecified), unless an address lies in ``webhook_allowed_networks``. It is
checked when an endpoint is registered and again before every try (a name can change what
it resolves to), and the try connects to an address that check approved
(``async_pinned_client``), never to what a second lookup would answer.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid

import httpx
import redis
from standardwebhooks.webhooks import Webhook

from trainers.contract.outbound import (
    AddressRefused,
    allowed_networks,
    async_pinned_client,
    check_addresses,
    check_url,
)
from workers.webhooks import WebhookStore

__all__ = ["AddressRefused", "Deliverer", "allowed_networks", "check_addresses", "check_url"]

log = logging.getLogger("posttrain.webhooks")
MAX_BACKOFF = 3600.0


def backoff(attempt: int, base: float) -> float:
    return min(base * 2 ** (attempt - 1), MAX_BACKOFF)


class Deliverer:
    def __init__(self, store: WebhookStore, settings) -> None:
        self.store, self.s = store, settings
        self.allowed = allowed_networks(settings.webhook_allowed_networks)
        self.name = f"api-{uuid.uuid4().hex[:12]}"
        self.client = async_pinned_client(self.check, timeout=settings.webhook_timeout_seconds)

    def check(self, url: str) -> list[str]:
        """The approved addresses of an endpoint's host (the client runs it per request)."""
        host, port = check_url(url)
        return check_addresses(host, port, self.allowed)

    async def close(self) -> None:
        await self.client.aclose()

    async def once(self) -> int:
        """One pass: fan out new events, then try every due delivery; how many were tried."""
        await asyncio.to_thread(self.store.fan_out, self.name)
        lease = self.s.webhook_timeout_seconds * 3 + 5
        due = await asyncio.to_thread(self.store.claim, lease)
        if due:
            await asyncio.gather(*(self._try(d) for d in due))
        return len(due)

    async def _try(self, delivery: dict) -> None:
        endpoint = delivery["endpoint"]
        status_code, error = None, None
        try:
            check_url(endpoint["url"])  # the client checks it all again, and pins
            now = datetime.datetime.now(tz=datetime.UTC)
            body = delivery["payload"]
            signature = Webhook(endpoint["secret"]).sign(delivery["event"], now, body)
            headers = {
                "content-type": "application/json",
                "user-agent": "posttrain-webhooks",
                "webhook-id": delivery["event"],
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature,
            }
            resp = await self.client.post(endpoint["url"], content=body, headers=headers)
            status_code = resp.status_code
            if not 200 <= status_code < 300:
                error = f"the endpoint answered {status_code}"
        except AddressRefused as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        attempt = int(delivery.get("attempts") or 0) + 1
        age = datetime.datetime.now().timestamp() - float(delivery.get("first_at") or 0)
        wait = backoff(attempt, self.s.webhook_retry_seconds)
        retry_in = wait if age + wait <= self.s.webhook_max_age_seconds else None
        outcome = await asyncio.to_thread(
            self.store.record, delivery, status_code=status_code, error=error, retry_in=retry_in
        )
        if outcome != "delivered":
            log.info("webhook %s to %s: %s (%s)", delivery["id"], endpoint["url"], outcome, error)


async def deliver_forever(deliverer: Deliverer, poll: float) -> None:
    while True:
        try:
            tried = await deliverer.once()
        except redis.RedisError as exc:
            log.warning("webhook delivery pass skipped: %s", exc)
            tried = 0
        except Exception:  # a bug must not end delivery for the process's lifetime
            log.exception("webhook delivery pass failed")
            tried = 0
        if not tried:
            await asyncio.sleep(poll)
