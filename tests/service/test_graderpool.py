"""The grader pool's per-tenant share, in-process and deterministic (issue 19, item 5)."""

from __future__ import annotations

import threading

import pytest

from service.auth import Tenant
from service.errors import APIError
from service.graderpool import GraderPool


def test_a_tenant_past_its_share_is_refused_at_once_and_others_still_run():
    pool = GraderPool(workers=4, per_tenant=2)
    a, b = Tenant("a"), Tenant("b")
    release = threading.Event()
    where: list[str] = []

    def hold() -> str:
        where.append(threading.current_thread().name)
        release.wait(60)
        return "held"

    results: list[str] = []
    callers = [threading.Thread(target=lambda: results.append(pool.call(a, hold))) for _ in (1, 2)]
    for t in callers:
        t.start()
    while pool._busy.get("a") != 2 or len(where) < 2:  # both of a's calls are running
        threading.Event().wait(0.01)
    with pytest.raises(APIError) as refused:
        pool.call(a, hold)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers == {"Retry-After": "1"}
    assert pool.call(b, lambda: "b ran") == "b ran"  # another tenant is not held up
    release.set()
    for t in callers:
        t.join()
    assert results == ["held", "held"] and all(n.startswith("grader") for n in where)
    assert pool._busy == {}  # shares are given back, errors or not
    with pytest.raises(ZeroDivisionError):
        pool.call(a, lambda: 1 / 0)
    assert pool._busy == {}
    pool.shutdown()
