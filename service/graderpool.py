"""Grading work off the request threads, with a per-tenant share.

``/graders/run``, ``/graders/validate`` and the regex checks of job creation run user
input in child processes (``trainers.contract.isolation``); waiting for those children
would hold a thread of the pool that serves every other request, so 50 slow grader
calls from one tenant used to stall everyone's ``GET /v1/files``. Here:

* the waiting happens on this pool's own threads (``POSTTRAIN_GRADER_WORKERS``), never
  on the threads that serve other routes;
* a tenant may have ``POSTTRAIN_GRADER_RUNS_PER_TENANT`` of these in flight; one more
  is a 429 (``rate_limit_exceeded``, with ``Retry-After``) at once, not a queue.

Limits are per API process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from service.auth import Tenant
from service.errors import APIError

T = TypeVar("T")


class GraderPool:
    def __init__(self, workers: int, per_tenant: int):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grader")
        self.per_tenant = per_tenant
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}

    @contextmanager
    def _slot(self, tenant: Tenant) -> Iterator[None]:
        with self._lock:
            busy = self._busy.get(tenant.name, 0)
            if busy >= self.per_tenant:
                raise APIError(
                    429,
                    f"tenant '{tenant.name}' already has {busy} grader runs or pattern checks "
                    f"in flight, its limit; retry when one has answered",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "1"},
                )
            self._busy[tenant.name] = busy + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._busy[tenant.name] - 1
                if left:
                    self._busy[tenant.name] = left
                else:
                    del self._busy[tenant.name]

    async def run(self, tenant: Tenant, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the pool, from an async route."""
        with self._slot(tenant):
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def call(self, tenant: Tenant, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the pool, from a sync route (its thread waits, counted in the
        tenant's share)."""
        with self._slot(tenant):
            return self.executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
