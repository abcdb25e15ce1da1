"""The Celery task that grades an eval run: ``posttrain.run_eval(run_id)``.

``grade_run`` does the work and takes its stores as arguments (tests call it directly).
It claims the run (``EvalRunStore.claim``): a lease, renewed every heartbeat while it
grades, and one of its tenant's grading slots (``POSTTRAIN_EVAL_RUNS_PER_TENANT``, or
the tenant's own limit recorded on the run). With every slot taken the run stays
``queued`` and says it waits; the run that frees a slot sends the oldest waiting one's
task again (``workers.evalruns.wake_waiting``), and so does the workers' reaper
(``workers.recovery``): a lost message or a killed worker never strands one. A claimed
run goes ``in_progress``, its rows are read (inline, or the uploaded file), and every
row not stored yet is sampled and graded with every criterion (``workers.evalgrading``,
which says how a criterion is graded and the pass rule) and stored with its counts in
one atomic write (``workers.evalruns``). Between rows it reads the run's status and
claim: a cancel (or a delete) stops it, and so does a newer claim (this one's lease ran
out). A worker killed mid-run stops renewing; once the lease has run out the reaper
queues the run again, and the next claim grades only the rows not stored yet (a
``resumed`` event says how many were kept). The run's events say all of this
(``created``, ``waiting``, ``started`` / ``resumed`` and by which worker, ``progress``
every 5% of the rows or 5 s, ``requeued``, ``canceled``, ``completed`` / ``failed`` with
the reason). The task itself grades in a child process (``run_eval``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis

from workers.celery_app import app, enqueue_eval_run
from workers.ckptevals import release_checkpoint, report_to_job
from workers.evalgrading import (
    Judge,
    RunFailed,
    Sampler,
    criteria_of,
    http_chat,
    http_sampler,
    output_item,
)
from workers.evalrows import RowError, read_rows
from workers.evalruns import FINISHED, Claim, EvalRunStore, wake_waiting
from workers.evalstore import EvalStore
from workers.filestore import FileStore
from workers.redis_client import make_redis
from workers.settings import WorkerSettings
from workers.store import JobStore

log = logging.getLogger(__name__)

PROGRESS_PARTS = 20  # a progress event every 5% of the rows ...
PROGRESS_SECONDS = 5.0  # ... or every 5 s, whichever comes first

Enqueue = Callable[[str, str], None]  # (run id, queue): send the run's task


@lru_cache(maxsize=1)
def _context() -> tuple[WorkerSettings, EvalRunStore, FileStore]:
    s = WorkerSettings()
    client = make_redis(s)
    return s, EvalRunStore(client, s.key_prefix), FileStore(client, s.data_dir, s.key_prefix)


@app.task(
    name="posttrain.run_eval",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_eval(self, run_id: str) -> str:
    """Grade the run in a child process (``main``, with the run id and this worker's name).

    A Celery prefork pool process is daemonic and may not start the bounded grading
    children every grade runs in (``run_isolated``); a plain child process may. It dies
    with this worker (``PR_SET_PDEATHSIG``); the run's lease then runs out and the reaper
    queues it again (``workers.recovery.recover_eval_runs``). The child is started with
    ``-c``, not ``-m workers.evaltasks``: a fork-server child re-imports a ``-m`` main
    module by name before it runs, and this one's imports (Celery, the inference client)
    made every grade cost ~200 ms instead of ~10."""
    worker = f"{self.request.hostname or socket.gethostname()}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, run_id, worker],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_die_with_parent,
    )
    outcome = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        log.error("grading run %s exited %s: %s", run_id, proc.returncode, proc.stderr[-2000:])
        return "crashed"
    return outcome


_CHILD = "import sys; from workers.evaltasks import main; sys.exit(main())"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.evaltasks RUN_ID [WORKER]`` (``run_eval`` starts it as
    ``python -c``): grade one run here; print what became of it. Runs it frees a slot for
    are sent to the workers."""
    args = argv if argv is not None else sys.argv[1:]
    run_id, worker = args[0], (args[1] if len(args) > 1 else None)
    logging.basicConfig(level=logging.INFO)
    settings, runs, files = _context()

    def enqueue(other: str, queue: str) -> None:
        enqueue_eval_run(app, other, queue)

    print(grade_run(run_id, runs, files, settings, worker=worker, enqueue=enqueue), flush=True)
    return 0


def grade_run(
    run_id: str,
    runs: EvalRunStore,
    files: FileStore,
    settings: WorkerSettings,
    *,
    sampler: Sampler | None = None,
    judge: Judge | None = None,
    stop_after: int | None = None,
    worker: str | None = None,
    enqueue: Enqueue | None = None,
) -> str:
    """Claim the run and grade its rows not stored yet; what became of it: ``completed``,
    ``canceled``, ``failed``, ``missing``, ``waiting`` (its tenant's slots are taken; it
    stays queued), ``skipped`` (another worker grades it), ``superseded`` (it was claimed
    again after this claim's lease ran out), or ``stopped`` after ``stop_after`` new rows
    (a test's stand-in for a killed worker: the lease is ended as if it had run out).
    ``enqueue(run_id, queue)`` sends the runs a finished run frees a slot for (None: the
    reaper wakes them). ``sampler`` and ``judge`` stand in for the inference workers
    in tests."""
    try:
        run = runs.get(run_id)
    except KeyError:
        return "missing"
    if run["status"] in FINISHED:
        _report(run_id, runs, settings)  # a redelivered task: the job may not know yet
        return run["status"]
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    slots = _slots(run, settings)
    claim = runs.claim(run_id, worker, settings.lease_seconds, slots, settings.max_attempts)
    if claim.outcome == "waiting":
        if claim.first:
            runs.add_event(
                run_id,
                f"Waiting for a grading slot: {claim.used} of this tenant's runs are being "
                f"graded (at most {slots} at once); the run starts when one finishes",
                type="waiting",
                data={"grading": claim.used, "slots": slots},
            )
        return "waiting"
    if claim.outcome in ("missing", "busy"):
        return {"missing": "missing", "busy": "skipped"}[claim.outcome]
    if claim.outcome == "finished":
        _report(run_id, runs, settings)
        return claim.previous
    if claim.outcome == "exhausted":
        lost = claim.attempt - 1
        error = {
            "code": "worker_lost",
            "message": f"grading the run stopped unexpectedly {lost} times (its worker was "
            "lost or its grading process died); giving up",
        }
        _end(run, runs, settings, "failed", enqueue, error, ("queued", "in_progress"))
        return "failed"
    _say_started(run, runs, worker, claim)
    with _Lease(runs, run_id, claim.attempt, settings):
        outcome = _grade_rows(run, runs, files, settings, claim.attempt, sampler, judge, stop_after)
    if outcome == "stopped":
        runs.expire_lease(run_id)
    elif outcome == "canceled":
        _report(run_id, runs, settings)  # its checkpoint may be pruned now
    elif outcome in ("completed", "failed"):
        _end(run, runs, settings, outcome, enqueue, runs.get(run_id).get("error") or None)
    return outcome


def _grade_rows(run, runs, files, settings, attempt, sampler, judge, stop_after) -> str:
    run_id, spec = run["id"], run["spec"]
    try:
        rows = _rows(run, files)
        if spec.get("kind") == "completions":
            sampler = sampler or http_sampler(runs, settings, spec)
            _check_model(spec["model"], run["metadata"])
        graders = criteria_of(spec)
    except RunFailed as exc:
        error = {"code": exc.code, "message": exc.message}
        if runs.transition(run_id, "failed", ("in_progress",), error=error) is None:
            return "canceled"  # canceled or deleted meanwhile
        return "failed"
    if judge is None and any(c.how == "judge" for c in graders):
        judge = http_chat(runs, settings)
    sandbox = settings.sandbox_policy()  # python criteria's (the server's settings)
    done, new = runs.stored(run_id), 0
    progress = _Progress(runs, run_id, len(rows))
    for index, row in enumerate(rows):
        if index in done:
            continue
        status, holder = runs.r.hmget(runs.k_run(run_id), "status", "attempt")
        if status != "in_progress":
            return "canceled"  # canceled or deleted meanwhile
        if holder != str(attempt):
            return "superseded"  # this claim's lease ran out and another took the run
        item, counter, increments = output_item(
            run, spec, graders, index, row, sampler, judge, sandbox=sandbox
        )
        if runs.store_item(run_id, index, item, counter, increments) < 0:
            return "canceled"  # deleted meanwhile
        new += 1
        progress.stored()
        if stop_after is not None and new >= stop_after:
            return "stopped"
    if runs.transition(run_id, "completed", ("in_progress",)) is None:
        return "canceled"
    return "completed"


def _slots(run: dict[str, Any], settings: WorkerSettings) -> int:
    """The run's tenant's grading slots: as recorded at creation, else this worker's."""
    return settings.eval_runs_per_tenant if run["limit"] is None else run["limit"]


def _say_started(run: dict[str, Any], runs: EvalRunStore, worker: str, claim: Claim) -> None:
    data = {"worker": worker, "attempt": claim.attempt}
    if claim.attempt == 1 and not claim.stored:
        runs.add_event(run["id"], f"Grading started on {worker}", type="started", data=data)
        return
    runs.add_event(
        run["id"],
        f"Grading resumed on {worker} (attempt {claim.attempt}): {claim.stored} of "
        f"{run['total']} rows were graded before and are kept",
        type="resumed",
        data={**data, "stored": claim.stored, "total": run["total"]},
    )


def _end(
    run: dict[str, Any],
    runs: EvalRunStore,
    settings: WorkerSettings,
    status: str,
    enqueue: Enqueue | None,
    error: dict[str, str] | None = None,
    allowed: tuple[str, ...] = ("in_progress",),
) -> None:
    """The run ended ``status`` (already written unless ``allowed`` says from what): its
    last event, a slot freed for a waiting run, its result onto its job."""
    run_id = run["id"]
    if allowed != ("in_progress",) and runs.transition(run_id, status, allowed, error) is None:
        return
    try:
        rec = runs.get(run_id)
    except KeyError:
        return
    counts = {k: rec[k] for k in ("progress", "total", "passed", "failed", "errored")}
    if status == "completed":
        runs.add_event(
            run_id,
            f"Run completed: {rec['total']} rows graded, {rec['passed']} passed, "
            f"{rec['failed']} failed, {rec['errored']} errored",
            type="completed",
            data={**counts, "regraded": rec["regraded"]},
        )
    else:
        error = rec["error"] or error or {}
        runs.add_event(
            run_id,
            f"Run failed: {error.get('message') or 'unknown error'}",
            type="failed",
            level="error",
            data={**counts, "error": error},
        )
    if enqueue is not None:
        wake_waiting(runs, rec, _slots(rec, settings), settings, enqueue)
    _report(run_id, runs, settings)


class _Progress:
    """A ``progress`` event every ``1/PROGRESS_PARTS`` of the rows or every
    ``PROGRESS_SECONDS``, whichever comes first (counted as rows are stored)."""

    def __init__(self, runs: EvalRunStore, run_id: str, total: int):
        self.runs, self.run_id, self.total = runs, run_id, total
        self.every = max(1, -(-total // PROGRESS_PARTS))
        self.since, self.last = 0, time.monotonic()

    def stored(self) -> None:
        self.since += 1
        if self.since < self.every and time.monotonic() - self.last < PROGRESS_SECONDS:
            return
        self.since, self.last = 0, time.monotonic()
        fields = ("progress", "passed", "failed", "errored")
        done, passed, failed, errored = (
            int(v or 0) for v in self.runs.r.hmget(self.runs.k_run(self.run_id), fields)
        )
        self.runs.add_event(
            self.run_id,
            f"{done}/{self.total} rows graded: {passed} passed, {failed} failed, {errored} errored",
            type="progress",
            data={
                "done": done,
                "total": self.total,
                "passed": passed,
                "failed": failed,
                "errored": errored,
            },
        )


class _Lease(threading.Thread):
    """Renews the claim's lease every ``heartbeat_seconds`` while the rows are graded; a
    renewal refused (the run is no longer this claim's) ends it, and the grading loop sees
    why between rows."""

    def __init__(self, runs: EvalRunStore, run_id: str, attempt: int, settings: WorkerSettings):
        super().__init__(name=f"lease-{run_id}", daemon=True)
        self.runs, self.run_id, self.attempt = runs, run_id, attempt
        self.lease, self.every = settings.lease_seconds, settings.heartbeat_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                if not self.runs.renew(self.run_id, self.attempt, self.lease):
                    return
            except redis.RedisError as exc:  # the next beat tries again
                log.warning("run %s: lease not renewed: %s", self.run_id, exc)

    def __enter__(self) -> _Lease:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.join()


def _report(run_id: str, runs: EvalRunStore, settings: WorkerSettings) -> None:
    """A run of a job's checkpoint: its result onto the job, and the checkpoint it kept
    from pruning released (``workers.ckptevals``)."""
    jobs = JobStore(runs.r, settings.key_prefix)
    report_to_job(run_id, runs, jobs, EvalStore(runs.r, settings.key_prefix))
    release_checkpoint(run_id, runs, jobs, Path(settings.data_dir))


def _rows(run: dict[str, Any], files: FileStore) -> list[dict[str, Any]]:
    source = run["data_source"]["source"]
    if source["type"] == "file_content":
        return source["content"]
    path = files.path(source["id"])
    try:
        with open(path, "rb") as fh:
            return read_rows(fh, f"file {source['id']}")
    except FileNotFoundError:
        raise RunFailed("file_not_found", f"the file {source['id']} was deleted") from None
    except RowError as exc:
        raise RunFailed("invalid_file", str(exc)) from None


def _check_model(header: dict[str, Any], metadata: dict[str, str]) -> None:
    path = header.get("path") or ""
    if path.startswith("/") and not Path(path).exists():
        if metadata.get("fine_tuning_job_id"):
            raise RunFailed(
                "model_not_found",
                f"the checkpoint {header.get('name')} (step {metadata.get('step')} of job "
                f"{metadata['fine_tuning_job_id']}) was deleted before its eval run sampled it "
                "(its job or model was deleted; keep_checkpoints does not prune a checkpoint "
                "whose eval run is queued or in progress)",
            )
        raise RunFailed(
            "model_not_found", f"the model '{header.get('name')}' is gone (it was deleted)"
        )


if __name__ == "__main__":
    sys.exit(main())
