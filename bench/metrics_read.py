"""Benchmark: reading a page of a long job's metrics, before and after step-id cursors.

    python -m bench.metrics_read                      # 100k steps, ~45 s on 2 cores
    python -m bench.metrics_read --steps 20000 --repeats 50

A throwaway ``redis-server`` on a free port (never the machine's Redis) gets two
metrics streams of ``--steps`` entries with the same per-step values (the keys a
supervised run reports: loss, grad_norm, learning_rate, mean_token_accuracy, ...):

* ``before``: the stream as the first release wrote it (auto ids, one ``XADD`` per
  step) and read as it read it: ``XRANGE key - +`` of the whole stream, then a scan
  for the first ``limit`` steps after ``after`` (reproduced here, since the store no
  longer has that code path for new streams).
* ``after``: the stream as ``JobStore.add_metrics`` writes it now (entry id
  ``{step}-1``), read with ``JobStore.metrics``: one ``XRANGE`` of ``limit + 1``
  entries from ``{after + 1}-0``.

Each read is ``GET .../metrics?after=<steps - 10>&limit=5`` (the last page a
dashboard polls); the median of ``--repeats`` reads is printed for both, with the
ratio before / after. Both sides check they returned the same five steps.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import redis

from service import stack
from workers.store import JobStore

VALUES = {
    "loss": 1.2345678,
    "grad_norm": 0.87654321,
    "learning_rate": 1.9e-05,
    "mean_token_accuracy": 0.61234,
    "entropy": 1.7654321,
    "epoch": 3.25,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_before(r: redis.Redis, key: str, after: int, limit: int) -> list[dict]:
    """The first release's ``JobStore.metrics``: the whole stream, then a scan."""
    out: list[dict] = []
    for _, f in r.xrange(key, "-", "+"):
        step = int(f["step"])
        if step > after:
            out.append({"step": step, **json.loads(f["values"])})
        if len(out) > limit:
            break
    return out[:limit]


def fill(r: redis.Redis, store: JobStore, steps: int) -> tuple[str, str]:
    job_old, job_new = "ftjob-bench-before", "ftjob-bench-after"
    for job in (job_old, job_new):
        store.create(job, "{}")
    old_key = f"{store.k_job(job_old)}:metrics"
    values = json.dumps(VALUES)
    pipe = r.pipeline(transaction=False)
    for step in range(1, steps + 1):
        pipe.xadd(old_key, {"step": step, "values": values})
        if step % 5000 == 0:
            pipe.execute()
    pipe.execute()
    for step in range(1, steps + 1):  # the store's own write path (one Lua call a step)
        store.add_metrics(job_new, step, VALUES)
    return job_old, job_new


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.metrics_read", description=__doc__)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-metrics-"))
    url = f"redis://127.0.0.1:{_free_port()}/0"
    proc = stack.start_redis(url, work / "redis.log")
    if proc is None:
        raise SystemExit(f"something already answers at {url}; refusing to use it")
    try:
        r = redis.Redis.from_url(url, decode_responses=True)
        store = JobStore(r, "bench:", metrics_maxlen=max(a.steps * 2, 100_000))
        t0 = time.perf_counter()
        job_old, job_new = fill(r, store, a.steps)
        print(f"filled two streams of {a.steps} steps in {time.perf_counter() - t0:.1f} s")
        after = a.steps - 10
        old_key = f"{store.k_job(job_old)}:metrics"
        t_before, rows_before = timed(lambda: read_before(r, old_key, after, a.limit), a.repeats)
        t_after, (rows_after, _) = timed(
            lambda: store.metrics(job_new, after, a.limit), a.repeats * 10
        )
        assert [x["step"] for x in rows_before] == [x["step"] for x in rows_after], (
            rows_before,
            rows_after,
        )
        print(f"GET .../metrics?after={after}&limit={a.limit} on a {a.steps}-step job")
        print(f"  before (XRANGE - + and scan): {t_before * 1e3:9.2f} ms  (median of {a.repeats})")
        print(
            f"  after  (step-id cursor):      {t_after * 1e3:9.2f} ms  (median of {a.repeats * 10})"
        )
        print(f"  ratio before/after: {t_before / t_after:.0f}x")
    finally:
        stack.stop(proc)


if __name__ == "__main__":
    main()
