"""The Celery task that grades an eval run: ``posttrain.run_eval(run_id)``.

``grade_run`` does the work and takes its stores as arguments (tests call it directly).
It claims the run (``EvalRunStore.claim``): a lease, renewed every heartbeat while it
grades, and one of its tenant's grading slots (``POSTTRAIN_EVAL_RUNS_PER_TENANT``, or
the tenant's own limit recorded on the run). With every slot taken the run stays
``queued`` and says it waits; the run that frees a slot sends the oldest waiting one's
task again (``workers.evalruns.wake_waiting``), and so does the workers' reaper
(``workers.recovery``): a lost message or a killed worker never strands one. A claimed
run goes ``in_progress``, its rows are read (inline, or the uploaded file), and for
every row not stored yet the model is sampled (a ``completions`` run: the rendered
``input_messages`` sent to a live inference worker) or the row's ``sample`` taken (a
``jsonl`` run), graded with every criterion (how: below) and stored with its counts in
one atomic write (``workers.evalruns``). Between rows it reads the run's status and
claim: a cancel (or a delete) stops it, and so does a newer claim (this one's lease ran
out). A worker killed mid-run stops renewing; once the lease has run out the reaper
queues the run again, and the next claim grades only the rows not stored yet (a
``resumed`` event says how many were kept). The run's events say all of this
(``created``, ``waiting``, ``started`` / ``resumed`` and by which worker, ``progress``
every 5% of the rows or 5 s, ``requeued``, ``canceled``, ``completed`` / ``failed`` with
the reason). The task itself grades in a child process (``run_eval``).

How a criterion is graded is the run spec's ``grading`` (decided by the API, which
resolved its models for the tenant):

* graders that load no model: a row's are graded together in one bounded child
  (``run_isolated_many``: time and memory capped; one process start per row, not per
  criterion), so a pathological sample costs one errored row, never the worker;
* ``local``: a reward model (``score_model``) or an encoder (cosine ``text_similarity``),
  loaded once in this run's own process, which has no memory cap (torch needs more than
  a bounded child may have);
* ``judge``: a ``label_model``, or a ``score_model`` whose model is a chat model: its
  rendered ``input`` is sent as a chat completion to a live inference worker, as a
  completions run's rows are (``trainers.contract.graders.judging`` reads the answer).
  The result's ``sample`` holds the judge's input, answer and usage (and a label_model's
  result its ``label``); the judge's calls count into the run's ``per_model_usage``
  under the judge model's name.

Pass rule: a criterion passes when its score >= its ``pass_threshold`` where it has one
(text_similarity, and a score_model given one), when its score >= 1.0 for a
string_check, and when its score > 0.5 for the other graders (regex, math_verify, multi,
length_penalty, a score_model without pass_threshold, and a label_model, whose score is
1 exactly when the judge's label is one of its passing_labels). An item passes when
every criterion passes. An item is ``errored`` (and its output item's status ``fail``)
when its sample could not be had (the inference worker refused or stayed unreachable, a
template read a field the row lacks) or a criterion could not grade it (a template
variable missing, a grader that failed or ran out of time, a judge that could not be
asked: ``model_grader_server_error``); a sample the grader could not parse
(``sample.output_json`` of a non-JSON answer) or a judge's answer that names no label or
holds no number (``model_grader_parse_error``, quoting it) is a fail, not an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import redis

from trainers.contract.graders.judging import (
    judge_messages,
    judge_params,
    label_score,
    parse_label,
    parse_score,
)
from trainers.contract.graders.scoring import (
    GradeReport,
    grade_report,
    run_isolated_many,
)
from trainers.contract.graders.spec import (
    LabelModelGrader,
    needs_model,
    parse_criterion,
    parse_grader,
)
from trainers.contract.graders.templates import GraderError, render, resolve_path
from workers.celery_app import app, enqueue_eval_run
from workers.ckptevals import release_checkpoint, report_to_job
from workers.evalruns import (
    FINISHED,
    NO_ERROR,
    Claim,
    EvalRunStore,
    RowError,
    output_item_id,
    read_rows,
    usage_field,
    wake_waiting,
)
from workers.evalstore import EvalStore
from workers.filestore import FileStore
from workers.inference.registry import live_workers, pick
from workers.redis_client import make_redis
from workers.settings import WorkerSettings
from workers.store import JobStore

log = logging.getLogger(__name__)

MODEL_HEADER = "X-Posttrain-Model"
# Grader flags that mean the criterion could not grade the item (an error), as opposed
# to a sample the grader scored 0 (sample_parse_error, formula_parse_error, ...).
HARD_FLAGS = (
    "invalid_variable_error",
    "other_error",
    "unresponsive_reward_error",
    "model_grader_server_error",
)
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # between tries of an unreachable inference worker
RETRY_STATUSES = (429, 502, 503, 504)

PROGRESS_PARTS = 20  # a progress event every 5% of the rows ...
PROGRESS_SECONDS = 5.0  # ... or every 5 s, whichever comes first

Sampler = Callable[[list[dict[str, str]]], dict[str, Any]]
Enqueue = Callable[[str, str], None]  # (run id, queue): send the run's task
# (model header, messages, request parameters) -> an answer, as a Sampler's
Judge = Callable[[dict[str, Any], list[dict[str, str]], dict[str, Any]], dict[str, Any]]


class RunFailed(Exception):
    """The whole run cannot go on (its file or model is gone)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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
            sampler = sampler or _http_sampler(runs, settings, spec)
            _check_model(spec["model"], run["metadata"])
        graders = _graders(spec)
    except RunFailed as exc:
        error = {"code": exc.code, "message": exc.message}
        if runs.transition(run_id, "failed", ("in_progress",), error=error) is None:
            return "canceled"  # canceled or deleted meanwhile
        return "failed"
    if judge is None and any(c.how == "judge" for c in graders):
        judge = _http_chat(runs, settings)
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
        item, counter, increments = _output_item(run, spec, graders, index, row, sampler, judge)
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


@dataclass
class Criterion:
    """One testing criterion as the worker grades it (``grading``: module docstring)."""

    name: str
    kind: str
    grader: Any  # a local plan's grader has its models' directories
    threshold: float | None
    how: str = "bounded"  # or "local", "judge"
    model: dict[str, Any] | None = None  # a judge's inference header


def _graders(spec: dict[str, Any]) -> list[Criterion]:
    """The run's criteria with their grading plans; RunFailed when a criterion's model
    has no plan (an eval stored before judges existed) or its directory is gone."""
    criteria = spec["criteria"]
    plans = spec.get("grading") or [None] * len(criteria)
    out = []
    for i, (criterion, plan) in enumerate(zip(criteria, plans, strict=True)):
        raw = dict(criterion)
        threshold = raw.get("pass_threshold")
        if raw.get("type") == "score_model":
            raw.pop("pass_threshold", None)
        c = Criterion(raw.get("name", ""), raw.get("type", ""), parse_criterion(raw), threshold)
        shown = f"testing_criteria[{i}] ({c.name})"
        if plan is None:
            if isinstance(c.grader, LabelModelGrader) or needs_model(c.grader):
                raise RunFailed(
                    "invalid_eval",
                    f"{shown} names a model that the eval's record does not resolve (the "
                    "eval was stored before eval runs graded with models): create it again",
                )
        elif plan["how"] == "local":
            c.how, c.grader = "local", parse_grader(plan["grader"])
        else:
            c.how, c.model = "judge", plan["model"]
            path = c.model.get("path") or ""
            if path.startswith("/") and not Path(path).exists():
                raise RunFailed(
                    "model_not_found",
                    f"{shown}: the judge model '{c.model.get('name')}' is gone (it was deleted)",
                )
        out.append(c)
    return out


def _grade_bounded(criteria: list[Criterion], item: Any, text: str) -> list[GradeReport]:
    """The criteria that load no model, on one row, in one bounded child (time and memory
    capped): a pathological sample errs the row's criteria, never the worker."""
    return run_isolated_many([c.grader for c in criteria], item, text)


def _grade(c: Criterion, item: Any, text: str, judge: Judge | None, increments: dict):
    """One criterion that loads a model (a judge, or ``local``) on one row: its report and
    what the result adds (a judge's sample). The bounded ones: ``_grade_bounded``."""
    if c.how == "judge":
        return _judged(c, item, text, judge, increments)
    try:
        return grade_report(c.grader, item, text), {}
    except Exception as exc:  # a model that will not load, ...: this row's error
        detail = f"{type(exc).__name__}: {exc}"[:500]
        return GradeReport(reward=0.0, errors={"other_error": detail}), {}


def _judged(c: Criterion, item: Any, text: str, judge: Judge | None, increments: dict):
    """Ask the criterion's judge about one row and read its answer (module docstring)."""
    start = time.perf_counter()
    report = GradeReport(reward=0.0)
    extra: dict[str, Any] = {"sample": None}
    if isinstance(c.grader, LabelModelGrader):
        extra["label"] = None
    try:
        messages = judge_messages(c.grader, item, text)
    except GraderError as exc:
        report.errors[exc.flag] = str(exc)
        return report, extra
    params = judge_params(c.grader)
    sample = _judge_sample(c.grader.model, messages, params)
    extra["sample"] = sample
    answer = judge(c.model, messages, params)  # type: ignore[misc]
    if "error" in answer:
        sample["error"] = answer["error"]
        report.errors["model_grader_server_error"] = (
            f"the judge {c.grader.model} could not be asked: {answer['error'].get('message')}"
        )
        report.execution_time = time.perf_counter() - start
        return report, extra
    content = answer.get("content") or ""
    sample["output"] = [{"role": "assistant", "content": content}]
    sample["finish_reason"] = answer.get("finish_reason") or ""
    sample["usage"] = counts = _usage(answer)
    for key, value in {**counts, "invocation_count": 1}.items():
        field = usage_field(c.grader.model, key)
        increments[field] = increments.get(field, 0) + value
    try:
        if isinstance(c.grader, LabelModelGrader):
            extra["label"] = parse_label(content, c.grader.labels)
            report.reward = label_score(c.grader, extra["label"])
        else:
            report.reward = parse_score(content, c.grader.range)
    except GraderError as exc:
        report.errors[exc.flag] = str(exc)
    report.execution_time = time.perf_counter() - start
    return report, extra


def _judge_sample(model: str, messages: list, params: dict[str, Any]) -> dict[str, Any]:
    """A judge's call in the shape of an output item's sample (what it was sent and,
    once answered, its answer and usage)."""
    return {
        "input": messages,
        "output": [],
        "usage": dict.fromkeys(_USAGE_KEYS, 0),
        "error": NO_ERROR,
        "finish_reason": "",
        "model": model,
        "seed": params.get("seed", 0),
        "temperature": float(params.get("temperature", 0.0)),
        "top_p": float(params.get("top_p", 1.0)),
        "max_completion_tokens": int(params.get("max_completion_tokens", 0)),
    }


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")


def _usage(answer: dict[str, Any]) -> dict[str, int]:
    usage = answer.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0),
        "cached_tokens": int(cached),
    }


def passes(kind: str, score: float, threshold: float | None) -> bool:
    """The pass rule (module docstring)."""
    if threshold is not None:
        return score >= threshold
    if kind == "string_check":
        return score >= 1.0
    return score > 0.5


def _output_item(run, spec, graders, index, row, sampler, judge=None):
    item = row["item"]
    sampling = spec.get("sampling") or {}
    sample = {
        "input": [],
        "output": [],
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cached_tokens": 0,
        },
        "error": NO_ERROR,
        "finish_reason": "",
        "model": run["model"],
        "seed": sampling.get("seed", 0),
        "temperature": float(sampling.get("temperature", 1.0)),
        "top_p": float(sampling.get("top_p", 1.0)),
        "max_completion_tokens": int(sampling.get("max_completion_tokens", 0)),
    }
    increments: dict[str, int] = {}
    text: str | None
    if spec.get("kind") == "completions":
        text = _sampled(spec, item, sample, sampler, increments)
    else:
        text = _given(row.get("sample") or {}, sample)
    results: list[dict[str, Any]] = []
    errored = text is None
    if not errored:
        # the criteria that load no model: graded together in one bounded child
        bounded = [c for c in graders if c.how == "bounded"]
        reports = dict(zip(map(id, bounded), _grade_bounded(bounded, item, text), strict=True))
        for i, c in enumerate(graders):
            if c.how == "bounded":
                report, extra = reports[id(c)], {}
            else:
                report, extra = _grade(c, item, text, judge, increments)
            hard = {f: d for f, d in report.errors.items() if f in HARD_FLAGS}
            ok = not hard and passes(c.kind, report.reward, c.threshold)
            errored = errored or bool(hard)
            results.append({**_result(c.name, c.kind, report, ok), **extra})
            increments[f"c{i}:{'passed' if ok else 'failed'}"] = 1
    passed = not errored and all(r["passed"] for r in results)
    counter = "errored" if errored else "passed" if passed else "failed"
    out = {
        "object": "eval.run.output_item",
        "id": output_item_id(run["id"], index),
        "created_at": int(time.time()),
        "eval_id": run["eval_id"],
        "run_id": run["id"],
        "datasource_item_id": index,
        "datasource_item": item,
        "status": "pass" if passed else "fail",
        "results": results,
        "sample": sample,
    }
    return out, counter, increments


def _result(name: str, kind: str, report: GradeReport, ok: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "type": kind,
        "score": float(report.reward),
        "passed": ok,
        "sample": None,
    }
    if report.sub_rewards:
        out["sub_rewards"] = report.sub_rewards
    if report.errors:
        out["errors"] = report.errors
    return out


def _given(given: dict[str, Any], sample: dict[str, Any]) -> str:
    """A jsonl row's sample: its text (output_text, else the first choice's content, else
    output_json as JSON) into the output item's sample."""
    text = given.get("output_text")
    choices = given.get("choices") if isinstance(given.get("choices"), list) else []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    if not isinstance(text, str):
        content = (first.get("message") or {}).get("content")
        if isinstance(content, str):
            text = content
        elif "output_json" in given:
            text = json.dumps(given["output_json"], ensure_ascii=False)
        else:
            text = ""
    if isinstance(given.get("model"), str):
        sample["model"] = given["model"]
    if isinstance(first.get("finish_reason"), str):
        sample["finish_reason"] = first["finish_reason"]
    usage = given.get("usage")
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(usage.get(key), int):
                sample["usage"][key] = usage[key]
    sample["output"] = [{"role": "assistant", "content": text}]
    return text


def _sampled(spec, item, sample, sampler, increments) -> str | None:
    """Sample the model for one row; the text, or None (``sample.error`` says why)."""
    try:
        messages = input_messages(spec["input_messages"], item)
    except GraderError as exc:
        sample["error"] = {"code": "invalid_variable_error", "message": str(exc)}
        return None
    sample["input"] = messages
    answer = sampler(messages)
    if "error" in answer:
        sample["error"] = answer["error"]
        return None
    text = answer.get("content") or ""
    counts = _usage(answer)
    sample["usage"] = counts
    sample["finish_reason"] = answer.get("finish_reason") or ""
    sample["output"] = [{"role": "assistant", "content": text}]
    increments.update(counts, invocation_count=1)
    return text


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    return ""


def input_messages(spec: dict[str, Any], item: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages of one row: the template rendered with the row (``{{item.x}}``),
    or the messages the row holds at ``item_reference`` (a string is one user message)."""
    if spec["type"] == "template":
        return [
            {"role": m["role"], "content": render(_text_of(m.get("content")), item, "")}
            for m in spec["template"]
        ]
    path = tuple(spec["item_reference"].split(".")[1:])
    value = resolve_path(item, path, "item")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": str(m["role"]), "content": _text_of(m.get("content"))} for m in value]
    raise GraderError(f"{spec['item_reference']} is not a list of messages or a string")


def _http_sampler(runs: EvalRunStore, settings: WorkerSettings, spec: dict[str, Any]) -> Sampler:
    """The run's model, asked with the run's sampling parameters (``_http_chat``)."""
    ask = _http_chat(runs, settings)
    params = {k: v for k, v in (spec.get("sampling") or {}).items() if v is not None}
    return lambda messages: ask(spec["model"], messages, params)


def _http_chat(runs: EvalRunStore, settings: WorkerSettings) -> Judge:
    """One chat completion per call from a live inference worker (``workers.inference``)
    for the model of a header; an unreachable or busy worker is retried with backoff
    (``RETRY_DELAYS``), then the answer is an error."""
    client = httpx.Client(timeout=settings.inference_timeout_seconds)

    def sample(
        header: dict[str, Any], messages: list[dict[str, str]], params: dict[str, Any]
    ) -> dict[str, Any]:
        headers = {MODEL_HEADER: json.dumps(header)}
        if settings.inference_token:
            headers["Authorization"] = f"Bearer {settings.inference_token}"
        body = {"model": header["name"], "messages": messages, **params}
        last = "no inference worker is serving requests; start one with `posttrain inference`"
        for delay in (*RETRY_DELAYS, None):
            workers = live_workers(runs.r, settings.key_prefix, settings.inference_queue)
            worker = pick(workers, header["path"])
            if worker is not None:
                try:
                    resp = client.post(
                        worker["url"] + "/v1/chat/completions", json=body, headers=headers
                    )
                except httpx.HTTPError as exc:
                    last = f"inference worker {worker.get('name')} unreachable: {exc}"
                else:
                    if resp.status_code == 200:
                        return _answer_of(resp)
                    last = _error_message(resp)
                    if resp.status_code not in RETRY_STATUSES:
                        return {"error": {"code": "inference_error", "message": last}}
            if delay is None:
                break
            time.sleep(delay)
        return {"error": {"code": "inference_unavailable", "message": last}}

    return sample


def _answer_of(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        choice = body["choices"][0]
        return {
            "content": choice["message"].get("content") or "",
            "finish_reason": choice.get("finish_reason") or "",
            "usage": body.get("usage") or {},
        }
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return {
            "error": {
                "code": "inference_error",
                "message": "the worker's answer was no chat completion",
            }
        }


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return f"the inference worker answered {resp.status_code}"


if __name__ == "__main__":
    sys.exit(main())
