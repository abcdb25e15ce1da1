"""Runs one claimed job in a training child process and owns its lifecycle.

The child (``python -m trainers.run``) is started in its own process group with
PR_SET_PDEATHSIG, so it dies with the worker and its exit frees the GPU. It
never touches Redis: it writes JSON report lines to a pipe, and this supervisor
applies them to the record while renewing the job's lease, watching for a
cancel request, and deciding the job's end state from the child's exit.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from trainers.plan import RunPlan
from trainers.spec import JobSpec, StoredSpecError, read_stored_spec
from workers.filestore import FileNotFound, FileStore
from workers.processes import die_with_parent, stop_group
from workers.reporter import RecordReporter, model_label
from workers.settings import WorkerSettings
from workers.store import InvalidTransition, JobStatus, JobStore
from workers.vllm_server import VLLMServer, wants_server

log = logging.getLogger(__name__)
S = JobStatus


@dataclass
class _WatchState:
    renewed: float
    next_beat: float = 0.0
    next_poll: float = 0.0
    pause_sent: bool = False


@dataclass
class Verdict:
    """How a run ended, as the supervisor saw it."""

    kind: str  # succeeded | failed | cancelled | paused | crashed | lease_lost
    detail: str = ""


class Supervisor:
    def __init__(self, settings: WorkerSettings, store: JobStore, files: FileStore, owner: str):
        self.s, self.store, self.files, self.owner = settings, store, files, owner

    # ---- preparing the run
    def job_dir(self, job_id: str) -> Path:
        return Path(self.s.data_dir) / "jobs" / job_id

    def write_plan(
        self, job_id: str, spec: JobSpec, attempt: int, vllm_server_url: str | None = None
    ) -> RunPlan:
        workdir = self.job_dir(job_id)
        workdir.mkdir(parents=True, exist_ok=True)
        plan = RunPlan(
            job_id=job_id,
            spec=spec,
            attempt=attempt,
            training_path=self.files.path(spec.training_file),
            validation_path=self.files.path(spec.validation_file) if spec.validation_file else None,
            output_dir=workdir / "output",
            data_dir=self.s.data_dir,
            checkpoint_every_steps=spec.checkpoint_every_steps or self.s.checkpoint_every_steps,
            threads=spec.resources.cpu_threads or self.s.threads_per_job(),
            vllm_server_url=vllm_server_url,
        )
        (workdir / f"plan-{attempt}.json").write_text(plan.model_dump_json(indent=2))
        return plan

    def _check_files(self, spec: JobSpec) -> str | None:
        for fid in filter(None, [spec.training_file, spec.validation_file]):
            try:
                self.files.get(fid)
            except FileNotFound:
                return f"file {fid} was deleted before the job started"
            if not self.files.path(fid).exists():
                return f"file {fid} is missing from the data volume"
        return None

    # ---- running
    def spawn(self, job_id: str, plan: RunPlan) -> tuple[subprocess.Popen, int]:
        threads, plan_path = plan.threads, self.job_dir(job_id) / f"plan-{plan.attempt}.json"
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        logf = open(self.job_dir(job_id) / "train.log", "ab")
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trainers.run",
                    "--plan",
                    str(plan_path),
                    "--report-fd",
                    str(write_fd),
                ],
                pass_fds=[write_fd],
                start_new_session=True,
                preexec_fn=die_with_parent,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            os.close(write_fd)
            logf.close()
        return proc, read_fd

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period."""
        stop_group(proc, self.s.cancel_grace_seconds)

    def watch(
        self, job_id: str, proc: subprocess.Popen, read_fd: int, reporter: RecordReporter
    ) -> Verdict:
        """Pump reports, renew the lease and poll for cancel until the child exits."""
        buf = b""
        pending: list[str] = []
        state = _WatchState(renewed=time.monotonic())
        verdict: Verdict | None = None
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], 0.25)
                chunk = pipe.read(65536) if ready else b""
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    pending += [line.decode("utf-8", "replace") for line in lines]
                pending = self._apply(reporter, pending)
                if ready and not chunk:  # EOF: the child closed its end (exited)
                    proc.wait()
                    break
                if verdict is None and reporter.outcome.invalid:
                    verdict = Verdict("failed", "invalid report")
                    self.kill(proc)
                if verdict is None:
                    verdict = self._control(job_id, state, proc, reporter)
                    if verdict is not None:
                        self.kill(proc)
                if proc.poll() is not None and not ready:
                    break
        self._apply(reporter, pending)
        return verdict or self._judge(proc.returncode, reporter)

    @staticmethod
    def _apply(reporter: RecordReporter, pending: list[str]) -> list[str]:
        """Write report lines to Redis in order; keep the rest for later if Redis is down."""
        while pending:
            try:
                reporter.handle_line(pending[0])
            except redis.RedisError as exc:
                log.warning(
                    "job %s: Redis unavailable, holding %d report lines: %s",
                    reporter.job_id,
                    len(pending),
                    exc,
                )
                return pending
            pending.pop(0)
        return pending

    def _control(
        self, job_id: str, st: _WatchState, proc: subprocess.Popen, reporter: RecordReporter
    ) -> Verdict | None:
        """Renew the lease, act on cancel and pause; survive Redis blips shorter than the lease."""
        now = time.monotonic()
        try:
            if now >= st.next_beat:
                st.next_beat = now + self.s.heartbeat_seconds
                if not self.store.renew(job_id, self.owner, self.s.lease_seconds):
                    return self._lost_or_cancelled(job_id)
                st.renewed = now
            if now >= st.next_poll:
                st.next_poll = now + 1.0
                status = self.store.status(job_id)
                if status == S.cancelled:
                    return Verdict("cancelled")
                # The trainer installs its SIGUSR1 handler before it reports anything, so
                # a pause is only signalled once a report line has arrived.
                if status == S.pausing and not st.pause_sent and reporter.outcome.lines:
                    os.kill(proc.pid, signal.SIGUSR1)
                    st.pause_sent = True
        except redis.RedisError as exc:
            log.warning("job %s: Redis unavailable: %s", job_id, exc)
            if now - st.renewed > self.s.lease_seconds:  # another worker may take the job now
                return Verdict("lease_lost", f"Redis unreachable for the lease period: {exc}")
        return None

    def _lost_or_cancelled(self, job_id: str) -> Verdict:
        status = self.store.status(job_id)
        if status == S.cancelled:
            return Verdict("cancelled")
        return Verdict("lease_lost", f"status is {status}")

    @staticmethod
    def _judge(returncode: int, reporter: RecordReporter) -> Verdict:
        out = reporter.outcome
        if out.invalid:
            return Verdict("failed", "invalid report")
        if returncode == 0 and out.result is not None:
            return Verdict("succeeded")
        if returncode == 0 and out.paused is not None:
            return Verdict("paused", f"step {out.paused.step}")
        if out.error is not None:
            return Verdict("failed")
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        return Verdict("crashed", f"training process ended unexpectedly ({how})")

    # ---- ending
    def finish(
        self, job_id: str, spec: JobSpec, verdict: Verdict, reporter: RecordReporter, attempt: int
    ) -> str:
        """Write the job's end state; return what happened (for logs and tests)."""
        out = reporter.outcome
        try:
            if verdict.kind == "succeeded":
                name = f"ft:{model_label(spec.model)}:{spec.suffix or 'posttrain'}:{job_id}"
                self.store.transition(
                    job_id,
                    S.succeeded,
                    owner=self.owner,
                    fine_tuned_model=name,
                    trained_tokens=out.result.trained_tokens,
                )
                self.store.add_event(job_id, "The job has successfully completed")
            elif verdict.kind == "failed":
                self.store.transition(job_id, S.failed, owner=self.owner, error=out.error)
                self.store.add_event(job_id, f"Job failed: {out.error['message']}", level="error")
            elif verdict.kind == "paused":
                self.store.transition(
                    job_id,
                    S.paused,
                    owner=self.owner,
                    lease_owner="",
                    lease_expires_at=0,
                    attempt=0,
                )
                self.store.add_event(
                    job_id, f"Job paused at {verdict.detail} with a resumable checkpoint"
                )
            elif verdict.kind == "crashed":
                return self._crashed(job_id, verdict, attempt)
            elif verdict.kind == "cancelled":
                self.store.add_event(job_id, "Training process stopped after cancellation")
        except InvalidTransition as exc:  # cancelled (or taken over) while we were ending
            log.info("job %s: end state not written: %s", job_id, exc)
            return f"superseded:{exc.current}"
        return verdict.kind

    def _crashed(self, job_id: str, verdict: Verdict, attempt: int) -> str:
        if attempt < self.s.max_attempts:
            self.store.transition(
                job_id, S.queued, owner=self.owner, lease_owner="", lease_expires_at=0
            )
            self.store.add_event(
                job_id,
                f"{verdict.detail}; retrying (attempt {attempt + 1} of "
                f"{self.s.max_attempts}) from the last checkpoint",
                level="warn",
            )
            return "requeued"
        error = {
            "code": "training_crashed",
            "param": None,
            "message": f"{verdict.detail}; gave up after {attempt} attempts",
        }
        self.store.transition(job_id, S.failed, owner=self.owner, error=error)
        self.store.add_event(job_id, f"Job failed: {error['message']}", level="error")
        return "failed"

    def run(self, job_id: str, attempt: int) -> str:
        try:
            spec = read_stored_spec(self.store.get(job_id)["spec"])
        except StoredSpecError as exc:
            spec, problem, code = None, str(exc), "invalid_spec"
        else:
            problem, code = self._check_files(spec), "invalid_training_file"
        if problem:
            return self._fail_before_start(job_id, code, problem)
        server = None
        if wants_server(spec):
            try:
                server = VLLMServer.start(self.s, spec.model, self.job_dir(job_id) / "vllm.log")
            except RuntimeError as exc:
                return self._fail_before_start(job_id, "rollout_server_failed", str(exc))
            self.store.add_event(job_id, f"Started a vLLM server for rollouts at {server.url}")
        try:
            return self._run_trainer(job_id, spec, attempt, server)
        finally:
            if server is not None:
                server.stop()
                self.store.add_event(job_id, "Stopped the run's vLLM server")

    def _fail_before_start(self, job_id: str, code: str, problem: str) -> str:
        param = "training_file" if code == "invalid_training_file" else None
        error = {"code": code, "message": problem, "param": param}
        self.store.transition(job_id, S.failed, owner=self.owner, error=error)
        self.store.add_event(job_id, f"Job failed: {problem}", level="error")
        return "failed"

    def _run_trainer(self, job_id: str, spec: JobSpec, attempt: int, server) -> str:
        plan = self.write_plan(job_id, spec, attempt, server.url if server else None)
        self.store.add_event(job_id, f"Fine-tuning job started (attempt {attempt})")
        reporter = RecordReporter(self.store, job_id, spec.model)
        proc, read_fd = self.spawn(job_id, plan)
        self.store.set_fields(job_id, pid=proc.pid)
        try:
            verdict = self.watch(job_id, proc, read_fd, reporter)
        except BaseException:  # never leave a trainer running unsupervised
            self.kill(proc)
            raise
        log.info("job %s: attempt %d ended: %s %s", job_id, attempt, verdict.kind, verdict.detail)
        return self.finish(job_id, spec, verdict, reporter, attempt)
