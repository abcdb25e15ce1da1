"""Prometheus metrics for operators: ``GET /metrics`` in the text exposition format.

Two sources, one registry per app (``prometheus_client``):

* this process's HTTP traffic, counted by ``HttpMetrics`` (an ASGI middleware): requests
  by method, route template and status, and a latency histogram by method and route.
  Routes are the templates (``/v1/fine_tuning/jobs/{job_id}``), never raw paths, so ids
  cannot blow up the series count; a path that matched no route is ``unmatched``.
* the cluster's state, read from Redis at scrape time by ``ClusterCollector``: jobs by
  status, tenant and queue; the broker's queue depths; live training workers per queue
  and their devices; live inference workers; each running job's step, tokens and rates;
  and the graders this API ran. Workers publish their state to
  Redis already (records, fleet entries), so their metrics come through the API without
  an endpoint per worker or prometheus_client's multiprocess mode.

A scrape reads every job record's status once (one pipelined HMGET each): its cost
grows with the number of jobs kept, which ``DELETE`` of finished jobs bounds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.fleet import fleet_queues, live_workers
from workers.inference.registry import live_workers as live_inference
from workers.inference.registry import registry_key
from workers.jobstate import JobStatus
from workers.store import DEFAULT_TENANT, JobStore

# Latency buckets (seconds): API calls are milliseconds; uploads and streams run longer.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# kombu's Redis transport keeps a queue's priority levels in lists named after it:
# the queue itself, then ``<queue>\x06\x16<level>`` for the levels it uses.
PRIORITY_SEP = "\x06\x16"
PRIORITY_LEVELS = ("", "3", "6", "9")


class Metrics:
    """The app's registry and the metrics this process counts itself."""

    def __init__(self, jobs: JobStore, settings: Any):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "posttrain_http_requests",
            "HTTP requests answered by the API, by method, route template and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "posttrain_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (streams included).",
            ("method", "route"),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.grader_runs = Counter(
            "posttrain_grader_runs",
            "Graders this API ran (/v1/fine_tuning/alpha/graders/run), by grader type "
            "and outcome (ok, error).",
            ("type", "outcome"),
            registry=self.registry,
        )
        self.registry.register(ClusterCollector(jobs, settings))


class HttpMetrics:
    """ASGI middleware: counts every HTTP request and times it to the end of its body."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


class ClusterCollector(Collector):
    """What Redis knows, read at each scrape (see the module docstring)."""

    def __init__(self, jobs: JobStore, settings: Any):
        self.jobs, self.settings = jobs, settings
        # each running job's (time, step, tokens) at the previous scrape, for the rates
        self._last: dict[str, tuple[float, float, float]] = {}

    def describe(self) -> list:
        return []  # read at scrape time only: registering must not touch Redis

    def collect(self) -> Iterator[GaugeMetricFamily]:
        r, prefix = self.jobs.r, self.jobs.p
        up = GaugeMetricFamily("posttrain_redis_up", "1 if the API read Redis for this scrape.")
        try:
            families = [
                *self._jobs(r),
                *self._queues(r, served := fleet_queues(r, prefix)),
                *self._workers(r, prefix, served),
            ]
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    # ---- jobs
    def _jobs(self, r: redis.Redis) -> list[GaugeMetricFamily]:
        by_status = GaugeMetricFamily(
            "posttrain_jobs",
            "Fine-tuning jobs by status, tenant and queue.",
            labels=("status", "tenant", "queue"),
        )
        step = GaugeMetricFamily(
            "posttrain_job_step",
            "The training step a running job reported last.",
            labels=("job", "tenant"),
        )
        total = GaugeMetricFamily(
            "posttrain_job_total_steps", "A running job's total steps.", labels=("job", "tenant")
        )
        tokens = GaugeMetricFamily(
            "posttrain_job_trained_tokens",
            "Tokens a running job has trained on (rate() of it is tokens/s).",
            labels=("job", "tenant"),
        )
        steps_rate = GaugeMetricFamily(
            "posttrain_job_steps_per_second",
            "A running job's training steps per second since the previous scrape.",
            labels=("job", "tenant"),
        )
        tokens_rate = GaugeMetricFamily(
            "posttrain_job_tokens_per_second",
            "A running job's trained tokens per second since the previous scrape.",
            labels=("job", "tenant"),
        )
        ids = r.zrange(self.jobs.k_jobs(), 0, -1)
        fields = ("status", "tenant", "queue", "step", "total_steps", "trained_tokens")
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.jobs.k_job(job_id), *fields)
        counts: dict[tuple[str, str, str], int] = {}
        seen: dict[str, tuple[float, float, float]] = {}
        now = time.monotonic()
        for job_id, row in zip(ids, pipe.execute(), strict=True):
            status, tenant, queue, s, t, tok = row
            if status is None:
                continue  # deleted between the two reads
            tenant = tenant or DEFAULT_TENANT
            key = (status, tenant, queue or self.settings.queue)
            counts[key] = counts.get(key, 0) + 1
            if status != JobStatus.running or s is None:
                continue
            labels = [job_id, tenant]
            step.add_metric(labels, float(s))
            if t:
                total.add_metric(labels, float(t))
            if tok:
                tokens.add_metric(labels, float(tok))
            seen[job_id] = (now, float(s), float(tok or 0))
            before = self._last.get(job_id)
            if before is not None and now > before[0] and float(s) >= before[1]:
                dt = now - before[0]
                steps_rate.add_metric(labels, (float(s) - before[1]) / dt)
                tokens_rate.add_metric(labels, max(0.0, float(tok or 0) - before[2]) / dt)
        self._last = seen  # running jobs only: finished ones drop out
        for (status, tenant, queue), n in sorted(counts.items()):
            by_status.add_metric([status, tenant, queue], n)
        return [by_status, step, total, tokens, steps_rate, tokens_rate]

    # ---- broker queues
    def _queues(self, r: redis.Redis, served: set[str]) -> list[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "posttrain_queue_messages",
            "Tasks waiting in the broker per queue (jobs and eval runs not yet taken).",
            labels=("queue",),
        )
        queues = set(self.settings.queue_names()) | served
        base = self.settings.broker_key_prefix
        for queue in sorted(queues):
            pipe = r.pipeline(transaction=False)
            for level in PRIORITY_LEVELS:
                pipe.llen(f"{base}{queue}{PRIORITY_SEP + level if level else ''}")
            depth.add_metric([queue], sum(pipe.execute()))
        return [depth]

    # ---- workers
    def _workers(self, r: redis.Redis, prefix: str, served: set[str]) -> list[GaugeMetricFamily]:
        count = GaugeMetricFamily(
            "posttrain_workers", "Live training workers per queue.", labels=("queue",)
        )
        devices = GaugeMetricFamily(
            "posttrain_worker_devices",
            "Devices of each live training worker (0 for a CPU-only worker).",
            labels=("queue", "worker", "gpus"),
        )
        for queue in sorted(served):
            live = live_workers(r, prefix, queue)
            count.add_metric([queue], len(live))
            for w in live:
                gpus = w.get("gpus") or []
                devices.add_metric([queue, w.get("name", ""), ",".join(map(str, gpus))], len(gpus))
        infer = GaugeMetricFamily(
            "posttrain_inference_workers",
            "Live inference workers per inference queue.",
            labels=("queue",),
        )
        start = len(registry_key(prefix, ""))
        for key in sorted(r.scan_iter(match=registry_key(prefix, "*"), count=100)):
            queue = key[start:]
            infer.add_metric([queue], len(live_inference(r, prefix, queue)))
        return [count, devices, infer]
