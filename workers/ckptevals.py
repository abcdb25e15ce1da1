"""Evals during fine-tuning: an eval run on each checkpoint of a job whose spec names one.

A job's ``eval`` (``trainers.contract.spec.CheckpointEval``: an eval id and a completions
data source without ``model``) was checked by the API when the job was created. Two
moments here:

* ``create_checkpoint_run``: ``workers.ingest`` applied a checkpoint report (the final
  one too). A run of the eval is created in its run list, named ``"<job id> step <N>"``,
  with the checkpoint's id as its ``model``, metadata ``fine_tuning_job_id``,
  ``checkpoint_id``, ``step``, and queued (``posttrain.run_eval``) like any run. The
  run id is bound first to the job and step in ``job:{id}:evalruns`` (HSETNX, field
  ``{step}:{eval_id}``), so a report applied twice (a redelivery, a resumed attempt's
  checkpoint at the same step) never makes a second run; a binding whose run was never
  written (a crash between the two) is written on the next try with the same id.
* ``report_to_job``: ``workers.evaltasks`` finished such a run. Its pass rate
  (passed / total; errored rows do not pass) goes into the checkpoint's ``metrics`` as
  ``eval_pass_rate`` (found by step: idempotent), and one event says
  ``"Eval <name>: 7/10 passed at step N"`` (a failed run: why, as a warning), guarded by
  a ``reported:{run_id}`` field of the same hash, so a redelivered task does not say it
  twice (at most once: a crash between the two loses the event, never the metric).

The run samples the checkpoint's directory through an inference worker while the job
trains, or later (it waits for a worker, or for one of its tenant's grading slots).
``keep_checkpoints`` does not prune a checkpoint whose run is still queued or in
progress (``JobStore.add_checkpoint`` reads the runs bound here); the job's ``keep`` is
written here too, and ``release_checkpoint`` prunes once the run has ended. A
checkpoint deleted anyway (its job or model deleted) fails its run with
``model_not_found`` naming the checkpoint (``workers.evaltasks``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers.contract.checkpoints import remove_checkpoints
from workers.evalrows import RowError, read_rows
from workers.evalruns import EvalRunNotFound, EvalRunStore, new_run_id
from workers.evalstore import EvalNotFound, EvalStore
from workers.filestore import FileStore
from workers.store import JobNotFound, JobStore

log = logging.getLogger(__name__)

PASS_RATE = "eval_pass_rate"


def k_bindings(jobs: JobStore, job_id: str) -> str:
    """The job's checkpoint-run bindings (deleted with the job: ``JOB_KEY_SUFFIXES``)."""
    return f"{jobs.k_job(job_id)}:evalruns"


def run_spec(
    spec_eval: dict[str, Any], criteria: list, header: dict, grading: list | None = None
) -> dict[str, Any]:
    """The worker's spec of a completions run (what the API builds for a run it creates);
    ``grading``: the eval's, as the API resolved its criteria's models at its creation."""
    ds = spec_eval["data_source"]
    messages = ds["input_messages"]
    if messages.get("type") == "template":
        spec_messages = {"type": "template", "template": messages["template"]}
    else:
        spec_messages = {"type": "item_reference", "item_reference": messages["item_reference"]}
    sampling = {k: v for k, v in (ds.get("sampling_params") or {}).items() if v is not None}
    return {
        "kind": "completions",
        "criteria": criteria,
        "grading": grading or [None] * len(criteria),
        "model": header,
        "input_messages": spec_messages,
        "sampling": sampling,
    }


def model_header(jobs: JobStore, job_id: str, data_dir: Path, ckpt: dict) -> dict[str, Any]:
    """The inference worker's header for a checkpoint (an adapter's base: the job's model)."""
    path = (Path(data_dir) / str(ckpt["path"])).resolve()
    base = None
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        rec = jobs.get(job_id)
        hub = rec.get("model") if rec.get("model_source") == "hub" else None
        base = rec.get("model_path") or hub
    return {"name": ckpt["id"], "path": str(path), "base": base}


def _total(source: dict[str, Any], files: FileStore | None) -> int:
    if source.get("type") == "file_content":
        return len(source.get("content") or [])
    if files is None:
        return 0
    try:
        with open(files.path(source["id"]), "rb") as fh:
            return len(read_rows(fh, f"file {source['id']}"))
    except (OSError, KeyError, RowError):
        return 0  # the run fails naming the file when it reads it


def create_checkpoint_run(
    jobs: JobStore,
    runs: EvalRunStore,
    evals: EvalStore,
    files: FileStore | None,
    data_dir: Path,
    job_id: str,
    spec_eval: dict[str, Any],
    ckpt: dict[str, Any],
    enqueue_run: Callable[[str], None],
    *,
    queue: str = "",
    keep: int = 0,
) -> str | None:
    """Create and queue the eval run of checkpoint ``ckpt`` (its record's metadata), once;
    the run id (the first one's when it exists), or None when the eval is gone. ``queue``:
    where ``enqueue_run`` sends it (the reaper sends it there again); ``keep``: the job's
    ``keep_checkpoints``, for the pruning its end makes (``release_checkpoint``)."""
    eval_id, step = spec_eval["eval_id"], int(ckpt["step"])
    field = f"{step}:{eval_id}"
    key = k_bindings(jobs, job_id)
    runs.r.hset(key, "keep", int(keep))
    candidate = new_run_id()
    if runs.r.hsetnx(key, field, candidate):
        run_id = candidate
    else:
        run_id = runs.r.hget(key, field) or candidate
        try:
            rec = runs.get(run_id)
        except EvalRunNotFound:
            rec = None
        if rec is not None:
            if rec["status"] == "queued":  # its message may have been lost with a crash
                enqueue_run(run_id)
            return run_id
    try:
        ev = evals.get(eval_id)
    except EvalNotFound:
        jobs.add_event(
            job_id,
            f"Eval {eval_id} was deleted; no eval run for the checkpoint at step {step}",
            level="warn",
            data={"eval_id": eval_id, "step": step},
        )
        return None
    ds = {**spec_eval["data_source"], "model": ckpt["id"]}
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        return None
    tenant = job.get("tenant") or ev["tenant"]
    limit = job.get("eval_runs_limit")  # the tenant's grading slots, written by the API
    runs.create(
        run_id=run_id,
        eval_id=eval_id,
        name=f"{job_id} step {step}",
        model=ckpt["id"],
        data_source=ds,
        spec=run_spec(
            spec_eval,
            ev["testing_criteria"],
            model_header(jobs, job_id, data_dir, ckpt),
            ev.get("grading"),
        ),
        total=_total(ds["source"], files),
        metadata={
            "fine_tuning_job_id": job_id,
            "checkpoint_id": ckpt["id"],
            "step": str(step),
            "final": "true" if ckpt.get("final") else "false",
        },
        tenant=tenant,
        queue=queue,
        limit=int(limit) if limit else None,
    )
    enqueue_run(run_id)
    jobs.add_event(
        job_id,
        f"Eval {ev['name']} queued for the checkpoint at step {step} (run {run_id})",
        data={"eval_id": eval_id, "run_id": run_id, "step": step, "checkpoint": ckpt["id"]},
    )
    return run_id


def report_to_job(run_id: str, runs: EvalRunStore, jobs: JobStore, evals: EvalStore) -> bool:
    """Put a finished checkpoint run's result on its job (module docstring); True if this
    call wrote the event."""
    try:
        rec = runs.get(run_id)
    except EvalRunNotFound:
        return False
    meta = rec["metadata"]
    job_id = meta.get("fine_tuning_job_id")
    if not job_id or rec["status"] not in ("completed", "failed"):
        return False
    step = int(meta.get("step") or 0)
    try:
        name = evals.get(rec["eval_id"])["name"]
    except EvalNotFound:
        name = rec["eval_id"]
    data: dict[str, Any] = {
        "eval_id": rec["eval_id"],
        "run_id": run_id,
        "step": step,
        "checkpoint": meta.get("checkpoint_id"),
    }
    if rec["status"] == "completed":
        total = rec["total"]
        rate = rec["passed"] / total if total else 0.0
        criteria = rec["spec"].get("criteria") or []
        per = {
            c.get("name", str(i)): (p / (p + f) if p + f else 0.0)
            for i, (c, (p, f)) in enumerate(zip(criteria, rec["criteria_counts"], strict=True))
        }
        jobs.update_checkpoint_metrics(job_id, step, {PASS_RATE: rate})
        message = f"Eval {name}: {rec['passed']}/{total} passed at step {step}"
        data.update(
            passed=rec["passed"],
            failed=rec["failed"],
            errored=rec["errored"],
            total=total,
            pass_rate=rate,
            per_testing_criteria_pass_rate=per,
        )
        level = "info"
    else:
        error = rec["error"] or {}
        message = f"Eval {name} failed at step {step}: {error.get('message') or 'unknown error'}"
        data["error"] = error
        level = "warn"
    if not jobs.r.hsetnx(k_bindings(jobs, job_id), f"reported:{run_id}", "1"):
        return False
    jobs.add_event(job_id, message, level=level, data=json.loads(json.dumps(data)))
    return True


def release_checkpoint(
    run_id: str, runs: EvalRunStore, jobs: JobStore, data_dir: Path
) -> list[int]:
    """A checkpoint run that ended no longer keeps its checkpoint from pruning: prune its
    job's checkpoints (``prune_job_checkpoints``); the steps whose directories went."""
    try:
        rec = runs.get(run_id)
    except EvalRunNotFound:
        return []
    job_id = rec["metadata"].get("fine_tuning_job_id")
    if not job_id or rec["status"] not in ("completed", "failed", "canceled"):
        return []
    return prune_job_checkpoints(job_id, jobs, data_dir)


def prune_job_checkpoints(job_id: str, jobs: JobStore, data_dir: Path) -> list[int]:
    """Prune the job's checkpoints to its ``keep`` again, skipping those whose eval run is
    still pending (the record first, then the directories, as ``workers.ingest`` does);
    the steps whose directories went."""
    keep = int(jobs.r.hget(k_bindings(jobs, job_id), "keep") or 0)
    if keep <= 0:
        return []
    pruned = jobs.prune_checkpoints(job_id, keep)
    if not pruned:
        return []
    output_dir = (Path(data_dir) / str(pruned[0]["path"])).parent
    kept = {int(c["step"]) for c in jobs.checkpoints(job_id)}
    removed = remove_checkpoints(output_dir, kept)
    log.info("job %s: pruned checkpoints at steps %s once their eval runs ended", job_id, removed)
    return removed
