"""How a training run ended, and the end state the job record gets for it.

``decide`` reads a finished run's verdict from its exit code and the reports it sent;
``write_end_state`` turns a verdict into the job's status (succeeded, failed, paused,
or re-queued for another attempt after a crash) under the claim's owner and fence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trainers.contract.spec import JobSpec
from workers.ingest import ReportIngest, model_label
from workers.store import InvalidTransition, JobStatus, JobStore

log = logging.getLogger(__name__)
S = JobStatus


@dataclass
class Verdict:
    """How a run ended, as the supervisor saw it."""

    kind: str  # succeeded | failed | cancelled | paused | crashed | lease_lost
    detail: str = ""


def decide(returncode: int, reporter: ReportIngest, late_exit: bool = False) -> Verdict:
    """``late_exit``: the supervisor stopped the child after its final report (its
    result and final checkpoint were complete by then)."""
    out = reporter.outcome
    if out.invalid:
        return Verdict("failed", "invalid report")
    if (returncode == 0 or late_exit) and out.result is not None:
        return Verdict("succeeded")
    if (returncode == 0 or late_exit) and out.paused is not None:
        return Verdict("paused", f"step {out.paused.step}")
    if out.error is not None:
        return Verdict("failed")
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    return Verdict("crashed", f"training process ended unexpectedly ({how})")


def write_end_state(
    store: JobStore,
    job_id: str,
    spec: JobSpec,
    verdict: Verdict,
    reporter: ReportIngest,
    attempt: int,
    *,
    owner: str,
    fence: int | None,
    max_attempts: int,
) -> str:
    """Write the job's end state; return what happened (for logs and tests)."""
    out = reporter.outcome
    try:
        if verdict.kind == "succeeded":
            name = f"ft:{model_label(spec.model)}:{spec.suffix or 'posttrain'}:{job_id}"
            store.transition(
                job_id,
                S.succeeded,
                owner=owner,
                fence=fence,
                fine_tuned_model=name,
                trained_tokens=out.result.trained_tokens,
            )
            store.add_event(job_id, "The job has successfully completed")
        elif verdict.kind == "failed":
            store.transition(job_id, S.failed, owner=owner, fence=fence, error=out.error)
            store.add_event(job_id, f"Job failed: {out.error['message']}", level="error")
        elif verdict.kind == "paused":
            store.transition(
                job_id,
                S.paused,
                owner=owner,
                fence=fence,
                lease_owner="",
                lease_expires_at=0,
                attempt=0,
            )
            store.add_event(job_id, f"Job paused at {verdict.detail} with a resumable checkpoint")
        elif verdict.kind == "crashed":
            return _crashed(store, job_id, verdict, attempt, owner, fence, max_attempts)
        elif verdict.kind == "cancelled":
            store.add_event(job_id, "Training process stopped after cancellation")
    except InvalidTransition as exc:  # cancelled (or taken over) while we were ending
        log.info("job %s: end state not written: %s", job_id, exc)
        return f"superseded:{exc.current}"
    return verdict.kind


def _crashed(
    store: JobStore,
    job_id: str,
    verdict: Verdict,
    attempt: int,
    owner: str,
    fence: int | None,
    max_attempts: int,
) -> str:
    """A crash parks a pausing job paused, re-queues one with attempts left, fails the rest."""
    if store.status(job_id) == S.pausing:  # keep the user's pause
        store.transition(
            job_id,
            S.paused,
            expect={S.pausing},
            owner=owner,
            fence=fence,
            lease_owner="",
            lease_expires_at=0,
            attempt=0,
        )
        store.add_event(
            job_id,
            f"{verdict.detail}; the job was pausing, so it is paused at its last checkpoint",
            level="warn",
        )
        return "paused"
    if attempt < max_attempts:
        store.transition(
            job_id, S.queued, owner=owner, fence=fence, lease_owner="", lease_expires_at=0
        )
        store.add_event(
            job_id,
            f"{verdict.detail}; retrying (attempt {attempt + 1} of "
            f"{max_attempts}) from the last checkpoint",
            level="warn",
        )
        return "requeued"
    error = {
        "code": "training_crashed",
        "param": None,
        "message": f"{verdict.detail}; gave up after {attempt} attempts",
    }
    store.transition(job_id, S.failed, owner=owner, fence=fence, error=error)
    store.add_event(job_id, f"Job failed: {error['message']}", level="error")
    return "failed"
