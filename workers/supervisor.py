"""Runs one claimed job in a training child process and owns its lifecycle.

The child (``python -m trainers.run``) is started in its own process group with
PR_SET_PDEATHSIG, so it dies with the worker and its exit frees the GPU. It
never touches Redis: it writes JSON report lines to a pipe, and this supervisor
applies them to the record while renewing the job's lease, watching for a
cancel request, and deciding the job's end state from the child's exit.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from trainers import fencing
from trainers.checkpoints import newest_complete_step
from trainers.messages import InvalidReport, parse_report
from trainers.plan import RunPlan
from trainers.spec import JobSpec, StoredSpecError, read_stored_spec
from workers import launch
from workers.filestore import FileNotFound, FileStore
from workers.processes import die_with_parent
from workers.reporter import RecordReporter, model_label
from workers.settings import WorkerSettings
from workers.store import InvalidTransition, JobStatus, JobStore
from workers.vllm_server import VLLMServer, wants_server

log = logging.getLogger(__name__)
S = JobStatus


@dataclass
class _WatchState:
    renewed: float
    last_report: float  # when the child last wrote a report line (the stall watchdog)
    next_beat: float = 0.0
    next_poll: float = 0.0
    pause_sent: bool = False
    final_at: float | None = None  # when its final report (result/paused/error) arrived
    killed_after_final: bool = False


def _is_final(line: bytes) -> bool:
    """A result, paused or error report: the child should exit right after it."""
    try:
        return json.loads(line).get("type") in ("result", "paused", "error")
    except (ValueError, AttributeError):
        return False


def _lost(verdict: Verdict | None) -> bool:
    return verdict is not None and verdict.kind == "lease_lost"


@dataclass
class Verdict:
    """How a run ended, as the supervisor saw it."""

    kind: str  # succeeded | failed | cancelled | paused | crashed | lease_lost
    detail: str = ""


class Supervisor:
    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        files: FileStore,
        owner: str,
        fence: int | None = None,
    ):
        self.s, self.store, self.files, self.owner = settings, store, files, owner
        self.fence = fence  # the claim's fencing token: every renewal and end state names it

    # ---- preparing the run
    def job_dir(self, job_id: str) -> Path:
        return Path(self.s.data_dir) / "jobs" / job_id

    def write_plan(
        self, job_id: str, spec: JobSpec, attempt: int, vllm_server_url: str | None = None
    ) -> RunPlan:
        workdir = self.job_dir(job_id)
        workdir.mkdir(parents=True, exist_ok=True)
        processes = self.placement_of(spec).processes  # threads are per process
        plan = RunPlan(
            job_id=job_id,
            spec=self._run_spec(job_id, spec),
            attempt=attempt,
            training_path=self.files.path(spec.training_file),
            validation_path=self.files.path(spec.validation_file) if spec.validation_file else None,
            output_dir=workdir / "output",
            data_dir=self.s.data_dir,
            checkpoint_every_steps=spec.checkpoint_every_steps or self.s.checkpoint_every_steps,
            threads=spec.resources.cpu_threads or max(1, self.s.threads_per_job() // processes),
            vllm_server_url=vllm_server_url,
            processes=processes,
            pause_path=workdir / f"pause-{attempt}",
            fence=self.fence,
            fence_file=self.fence_file(job_id) if self.fence is not None else None,
            report_journal=self.journal_dir(job_id) / f"{self.fence or 0}-{attempt}.jsonl",
        )
        (workdir / f"plan-{attempt}.json").write_text(plan.model_dump_json(indent=2))
        return plan

    def fence_file(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "fence"

    def journal_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "reports"

    def replay_journals(self, job_id: str) -> int:
        """Before a new attempt starts: put the metrics of steps an earlier attempt trained
        and saved (up to the newest complete checkpoint, which the new attempt resumes
        from) but whose report lines never reached the record, from that attempt's
        journal. Returns how many steps were recovered."""
        resume = newest_complete_step(self.job_dir(job_id) / "output")
        last = self.store.last_metric_step(job_id)
        found: dict[int, dict[str, float]] = {}
        journals = sorted(
            self.journal_dir(job_id).glob("*.jsonl"),
            key=lambda p: tuple(int(x) for x in p.stem.split("-") if x.isdigit()),
        )
        for path in journals:
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    msg = parse_report(raw)
                except InvalidReport:
                    continue  # a line torn by a kill
                if msg.type == "log" and last < msg.step <= resume:
                    found[msg.step] = {k: v for k, v in msg.metrics.items() if v is not None}
        for step in sorted(found):
            self.store.add_metrics(job_id, step, found[step])
        if found:
            self.store.add_event(
                job_id,
                f"Recovered the metrics of {len(found)} steps ({min(found)}-{max(found)}) "
                "from an earlier attempt's report journal",
            )
        return len(found)

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
        """Start the run (``workers.launch``: the trainer, or accelerate launching its
        ranks), pinned to this worker's devices; returns it and the report fd to read."""
        placement = self.placement_of(plan.spec)
        plan_path = self.job_dir(job_id) / f"plan-{plan.attempt}.json"
        config = None
        if placement.launched:
            config = launch.write_accelerate_config(
                placement, self.job_dir(job_id) / f"accelerate-{plan.attempt}.json"
            )
        self._channel = channel = launch.ReportChannel(placement.launched)
        self._placement, self._pause_path = placement, plan.pause_path
        if plan.pause_path is not None:  # a flag left by an earlier run of this attempt number
            plan.pause_path.unlink(missing_ok=True)
        logf = open(self.job_dir(job_id) / "train.log", "ab")
        try:
            proc = subprocess.Popen(
                launch.training_command(placement, plan_path, channel.args, config),
                pass_fds=channel.pass_fds,
                start_new_session=True,
                preexec_fn=die_with_parent,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=launch.training_env(dict(os.environ), placement, plan.threads),
            )
        finally:
            channel.started()
            logf.close()
        return proc, channel.read_fd

    def placement_of(self, spec: JobSpec) -> launch.Placement:
        """Where ``spec`` runs on this worker (``launch.PlacementError`` if it cannot)."""
        return launch.place(
            spec.resources, launch.worker_devices(self.s.worker_gpus), launch.available_strategies()
        )

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; a launched run's
        ranks (in process groups of their own) with it."""
        launch.stop_run(proc, self.s.cancel_grace_seconds)

    def watch(
        self, job_id: str, proc: subprocess.Popen, read_fd: int, reporter: RecordReporter
    ) -> Verdict:
        """Pump reports, renew the lease and poll for cancel until the child exits.

        Report lines are applied only under a lease renewed within its period: a worker
        that stalled renews first, and stops its trainer unread if the job was taken over.
        Lines Redis cannot take are held, also after the child exits, until it is back
        (``_flush``). Watchdogs stop a child that reports nothing for ``stall_seconds`` or
        outlives its final report by ``exit_deadline_seconds``.
        """
        buf = b""
        pending: list[str] = []
        now = time.monotonic()
        state = _WatchState(renewed=now, last_report=now)
        verdict: Verdict | None = None
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], 0.25)
                chunk = pipe.read(65536) if ready else b""
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    pending += [line.decode("utf-8", "replace") for line in lines]
                    state.last_report = time.monotonic()
                    if state.final_at is None and any(map(_is_final, lines)):
                        state.final_at = state.last_report
                if verdict is None:
                    verdict = self._control(job_id, state, proc, reporter)
                    if verdict is not None:
                        self.kill(proc)
                if self._lease_current(state) and not _lost(verdict):
                    pending = self._apply(reporter, pending)
                if ready and not chunk:  # EOF: the child closed its end (exited)
                    proc.wait()
                    break
                if verdict is None and reporter.outcome.invalid:
                    verdict = Verdict("failed", "invalid report")
                    self.kill(proc)
                if verdict is None:
                    verdict = self._watchdogs(job_id, state, proc)
                if proc.poll() is not None and not ready:
                    break
        if not _lost(verdict) and pending:
            pending = self._flush(job_id, reporter, pending)
            if pending:
                verdict = Verdict("lease_lost", f"{len(pending)} report lines undelivered")
        return verdict or self._judge(proc.returncode, reporter, state.killed_after_final)

    def _lease_current(self, st: _WatchState) -> bool:
        return time.monotonic() - st.renewed <= self.s.lease_seconds

    def _watchdogs(self, job_id: str, st: _WatchState, proc: subprocess.Popen) -> Verdict | None:
        """The exit deadline after the final report, and the no-progress watchdog."""
        now = time.monotonic()
        if st.final_at is not None:
            if now - st.final_at > self.s.exit_deadline_seconds and proc.poll() is None:
                self._event(
                    job_id,
                    "The training process did not exit within "
                    f"{self.s.exit_deadline_seconds:g} s of its final report (exit deadline); "
                    "stopped its process group",
                    level="warn",
                )
                st.killed_after_final = True
                self.kill(proc)
            return None
        if now - st.last_report > self.s.stall_seconds:
            detail = (
                f"no progress: the training process reported nothing for "
                f"{self.s.stall_seconds:g} s (stall watchdog)"
            )
            self._event(job_id, f"Stopped the training process: {detail}", level="warn")
            self.kill(proc)
            return Verdict("crashed", detail)
        return None

    def _event(self, job_id: str, message: str, level: str = "info") -> None:
        try:
            self.store.add_event(job_id, message, level=level)
        except redis.RedisError as exc:
            log.warning("job %s: event not recorded (%s): %s", job_id, exc, message)

    def _flush(self, job_id: str, reporter: RecordReporter, pending: list[str]) -> list[str]:
        """The child has exited: hold its undelivered report lines until Redis takes them
        (renewing the lease meanwhile), for up to ``report_flush_seconds``. Returns what
        could not be delivered: empty, unless the job was taken over or the wait ran out."""
        deadline = time.monotonic() + self.s.report_flush_seconds
        delay = 0.25
        while pending:
            try:
                if not self.store.renew(job_id, self.owner, self.s.lease_seconds, self.fence):
                    if self.fence is not None and self.store.get(job_id).get("fence") != str(
                        self.fence
                    ):
                        log.warning(
                            "job %s was taken over; dropping %d report lines",
                            job_id,
                            len(pending),
                        )
                        return pending
                pending = self._apply(reporter, pending)
            except redis.RedisError as exc:
                log.warning("job %s: Redis unavailable after the run ended: %s", job_id, exc)
            if not pending:
                break
            if time.monotonic() > deadline:
                log.error("job %s: gave up delivering %d report lines", job_id, len(pending))
                return pending
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        return []

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
                if not self.store.renew(job_id, self.owner, self.s.lease_seconds, self.fence):
                    return self._lost_or_cancelled(job_id)
                st.renewed = time.monotonic()
            if now >= st.next_poll:
                st.next_poll = now + 1.0
                status = self.store.status(job_id)
                if status == S.cancelled:
                    return Verdict("cancelled")
                # The trainer installs its SIGUSR1 handler before it reports anything, so
                # a pause is only signalled once a report line has arrived.
                if status == S.pausing and not st.pause_sent and reporter.outcome.lines:
                    launch.request_pause(proc, self._placement, self._pause_path)
                    st.pause_sent = True
        except redis.RedisError as exc:
            # The trainer keeps going and its reports are held: with Redis down nobody can
            # take the job over, and if someone did (a partition), the first renewal after
            # it heals is refused and stops the trainer; until then the fence keeps the
            # stale trainer from writing checkpoints.
            log.warning("job %s: Redis unavailable: %s", job_id, exc)
        return None

    def _lost_or_cancelled(self, job_id: str) -> Verdict:
        status = self.store.status(job_id)
        if status == S.cancelled:
            return Verdict("cancelled")
        return Verdict("lease_lost", f"status is {status}")

    @staticmethod
    def _judge(returncode: int, reporter: RecordReporter, late_exit: bool = False) -> Verdict:
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
                    fence=self.fence,
                    fine_tuned_model=name,
                    trained_tokens=out.result.trained_tokens,
                )
                self.store.add_event(job_id, "The job has successfully completed")
            elif verdict.kind == "failed":
                self.store.transition(
                    job_id, S.failed, owner=self.owner, fence=self.fence, error=out.error
                )
                self.store.add_event(job_id, f"Job failed: {out.error['message']}", level="error")
            elif verdict.kind == "paused":
                self.store.transition(
                    job_id,
                    S.paused,
                    owner=self.owner,
                    fence=self.fence,
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
        if self.store.status(job_id) == S.pausing:  # keep the user's pause
            self.store.transition(
                job_id,
                S.paused,
                expect={S.pausing},
                owner=self.owner,
                fence=self.fence,
                lease_owner="",
                lease_expires_at=0,
                attempt=0,
            )
            self.store.add_event(
                job_id,
                f"{verdict.detail}; the job was pausing, so it is paused at its last checkpoint",
                level="warn",
            )
            return "paused"
        if attempt < self.s.max_attempts:
            self.store.transition(
                job_id,
                S.queued,
                owner=self.owner,
                fence=self.fence,
                lease_owner="",
                lease_expires_at=0,
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
        self.store.transition(job_id, S.failed, owner=self.owner, fence=self.fence, error=error)
        self.store.add_event(job_id, f"Job failed: {error['message']}", level="error")
        return "failed"

    def run(self, job_id: str, attempt: int) -> str:
        try:
            spec = read_stored_spec(self.store.get(job_id)["spec"])
        except StoredSpecError as exc:
            spec, problem, code = None, str(exc), "invalid_spec"
        else:
            problem, code = self._check_files(spec), "invalid_training_file"
            if not problem:
                problem, code = self._hub_problem(job_id), "model_not_found"
            if not problem:
                problem, code = self._placement_problem(spec), "resources_unavailable"
        if problem:
            return self._fail_before_start(job_id, code, problem)
        server = None
        if wants_server(spec):
            try:
                model = self._run_spec(job_id, spec).model
                server = VLLMServer.start(self.s, model, self.job_dir(job_id) / "vllm.log")
            except RuntimeError as exc:
                return self._fail_before_start(job_id, "rollout_server_failed", str(exc))
            self.store.add_event(job_id, f"Started a vLLM server for rollouts at {server.url}")
        try:
            return self._run_trainer(job_id, spec, attempt, server)
        finally:
            if server is not None:
                server.stop()
                self.store.add_event(job_id, "Stopped the run's vLLM server")

    def _run_spec(self, job_id: str, spec: JobSpec) -> JobSpec:
        """The spec the training process loads: the job's model at the directory the API
        resolved it to at creation (``model_path``; records of older releases hold none,
        and a hub id has none: the spec's own name)."""
        path = self.store.get(job_id).get("model_path")
        return spec.model_copy(update={"model": path}) if path else spec

    def _hub_problem(self, job_id: str) -> str | None:
        """A hub id the API accepted must not name a directory relative to this worker's
        working directory, which ``from_pretrained`` would load instead."""
        names = json.loads(self.store.get(job_id).get("hub_models") or "[]")
        if any(Path(name).exists() for name in names):
            return "model not found or not allowed"
        return None

    def _placement_problem(self, spec: JobSpec) -> str | None:
        try:
            self.placement_of(spec)
        except launch.PlacementError as exc:
            return f"queue {self.s.queue}: {exc}"
        return None

    def _fail_before_start(self, job_id: str, code: str, problem: str) -> str:
        param = "training_file" if code == "invalid_training_file" else None
        error = {"code": code, "message": problem, "param": param}
        self.store.transition(job_id, S.failed, owner=self.owner, fence=self.fence, error=error)
        self.store.add_event(job_id, f"Job failed: {problem}", level="error")
        return "failed"

    def _run_trainer(self, job_id: str, spec: JobSpec, attempt: int, server) -> str:
        plan = self.write_plan(job_id, spec, attempt, server.url if server else None)
        if self.fence is not None:
            try:  # waits for a superseded run's checkpoint marking to finish
                fencing.write_fence(self.fence_file(job_id), self.fence)
            except fencing.StaleFence as exc:
                log.warning("job %s: not started: %s", job_id, exc)
                return "superseded:fence"
            self.replay_journals(job_id)
        self.store.add_event(job_id, f"Fine-tuning job started (attempt {attempt})")
        reporter = RecordReporter(
            self.store,
            job_id,
            spec.model,
            data_dir=Path(self.s.data_dir),
            keep_checkpoints=(
                self.s.keep_checkpoints if spec.keep_checkpoints is None else spec.keep_checkpoints
            ),
        )
        proc, read_fd = self.spawn(job_id, plan)
        self.store.set_fields(
            job_id, pid=proc.pid, placement=json.dumps(self._placement.as_record())
        )
        if self._placement.launched:
            self.store.add_event(job_id, f"Launched {self._placement.describe()}")
        try:
            verdict = self.watch(job_id, proc, read_fd, reporter)
        except BaseException:  # never leave a trainer running unsupervised
            self.kill(proc)
            raise
        finally:
            self._channel.close()
        log.info("job %s: attempt %d ended: %s %s", job_id, attempt, verdict.kind, verdict.detail)
        deadline, delay = time.monotonic() + self.s.report_flush_seconds, 0.25
        while True:  # the end state survives a Redis outage too
            try:
                outcome = self.finish(job_id, spec, verdict, reporter, attempt)
                if not self.store.exists(job_id):  # deleted (cancelled) while it stopped
                    self.files.delete_job_dir(job_id)
                return outcome
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("job %s: end state not written yet: %s", job_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
