"""Runs one claimed job in a training child process and owns its lifecycle.

The child (``python -m trainers.run``) is started in its own process group with
PR_SET_PDEATHSIG, so it dies with the worker and its exit frees the GPU. It
never touches Redis: it writes JSON report lines to a pipe, and this supervisor
applies them to the record while renewing the job's lease, watching for a
cancel request, and deciding the job's end state from the child's exit.

This module prepares and drives one attempt: the checks before it starts, the run's
vLLM server, the run plan and fence, the report journals' replay (``workers.journal``),
and launching the child (``workers.launch``). The watch loop is ``workers.watch``; the
verdict and the end state it gives the record are ``workers.verdict``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from trainers.contract import fencing
from trainers.contract.graders.judgeendpoints import SETTING as JUDGES_SETTING
from trainers.contract.jobdir import JobDir
from trainers.contract.outbound import TenantOutbound
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec, StoredSpecError, read_stored_spec
from trainers.contract.tools import SECRETS_ENV
from workers import launch
from workers.ckptevals import create_checkpoint_run
from workers.evalruns import EvalRunStore
from workers.evalstore import EvalStore
from workers.filestore import FileNotFound, FileStore, RemovalFailed
from workers.ingest import ReportIngest
from workers.journal import replay_journals
from workers.placement import (
    Placement,
    PlacementError,
    available_strategies,
    place,
    worker_devices,
)
from workers.processes import die_with_parent
from workers.settings import WorkerSettings
from workers.store import JobStatus, JobStore
from workers.verdict import Verdict, write_end_state
from workers.vllm_server import VLLMServer, lora_serving, wants_server
from workers.watch import RunWatch

log = logging.getLogger(__name__)
S = JobStatus


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no extra disk), or a copy where the volume cannot link."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(source, target)


@dataclass
class Run:
    """One started run: its process (the trainer or accelerate's launcher), the report
    channel it writes to, where it was placed, and its pause flag file."""

    proc: subprocess.Popen
    channel: launch.ReportChannel
    placement: Placement
    pause_path: Path | None


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
    def dir(self, job_id: str) -> JobDir:
        return JobDir(self.s.data_dir, job_id)

    def write_plan(
        self, job_id: str, spec: JobSpec, attempt: int, vllm_server_url: str | None = None
    ) -> RunPlan:
        jd = self.dir(job_id)
        jd.root.mkdir(parents=True, exist_ok=True)
        processes = self.placement_of(spec).processes  # threads are per process
        plan = RunPlan(
            job_id=job_id,
            spec=self._run_spec(job_id, spec),
            model_name=spec.model,
            attempt=attempt,
            training_path=jd.input(spec.training_file),
            validation_path=jd.input(spec.validation_file) if spec.validation_file else None,
            output_dir=jd.output,
            data_dir=self.s.data_dir,
            checkpoint_every_steps=spec.checkpoint_every_steps or self.s.checkpoint_every_steps,
            threads=spec.resources.cpu_threads or max(1, self.s.threads_per_job() // processes),
            vllm_server_url=vllm_server_url,
            processes=processes,
            pause_path=jd.pause_flag(attempt),
            fence=self.fence,
            fence_file=jd.fence if self.fence is not None else None,
            report_journal=jd.journal(self.fence, attempt),
            trackers=self.s.tracker_policy(),
            tools=self.s.tool_policy().for_tenant(self._tenant_outbound(job_id)),
            python_graders=self.s.sandbox_policy(),
            judges=self.s.judges(),
        )
        jd.plan(attempt).write_text(plan.model_dump_json(indent=2))
        return plan

    def _tenant_outbound(self, job_id: str) -> TenantOutbound | None:
        """The job's tenant's own outbound rules, recorded by the API at creation."""
        rules = self.store.outbound_rules(job_id)
        return TenantOutbound.model_validate(rules) if rules else None

    def _pin_files(self, job_id: str, spec: JobSpec) -> str | None:
        """Link the job's files into its directory when it first starts (a copy if the
        volume cannot hard-link), so that deleting or expiring a file afterwards cannot
        take it from the job's retries and resumes. Returns a problem, or None."""
        for fid in filter(None, [spec.training_file, spec.validation_file]):
            pinned = self.dir(job_id).input(fid)
            if pinned.exists():
                continue
            try:
                self.files.get(fid)
            except FileNotFound:
                return f"file {fid} was deleted before the job started"
            source = self.files.path(fid)
            pinned.parent.mkdir(parents=True, exist_ok=True)
            partial = pinned.with_name(f".{pinned.name}.partial")
            partial.unlink(missing_ok=True)
            try:
                _link_or_copy(source, partial)
            except FileNotFoundError:
                return f"file {fid} is missing from the data volume"
            os.replace(partial, pinned)
        return None

    # ---- running
    def spawn(self, job_id: str, plan: RunPlan) -> Run:
        """Start the run (``workers.launch``: the trainer, or accelerate launching its
        ranks), pinned to this worker's devices."""
        placement = self.placement_of(plan.spec)
        jd = self.dir(job_id)
        config = None
        if placement.launched:
            config = launch.write_accelerate_config(placement, jd.launcher_config(plan.attempt))
        channel = launch.ReportChannel(placement.launched)
        if plan.pause_path is not None:  # a flag left by an earlier run of this attempt number
            plan.pause_path.unlink(missing_ok=True)
        env = launch.training_env(dict(os.environ), placement, plan.threads)
        secrets = self.store.tool_secrets(job_id)
        if secrets:  # tools' and endpoint graders' headers: in the env, never in the plan file
            env[SECRETS_ENV] = json.dumps(secrets)
        logf = open(jd.train_log, "ab")
        try:
            proc = subprocess.Popen(
                launch.training_command(placement, jd.plan(plan.attempt), channel.args, config),
                pass_fds=channel.pass_fds,
                start_new_session=True,
                preexec_fn=die_with_parent,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            channel.started()
            logf.close()
        return Run(proc, channel, placement, plan.pause_path)

    def placement_of(self, spec: JobSpec) -> Placement:
        """Where ``spec`` runs on this worker (``PlacementError`` if it cannot)."""
        return place(spec.resources, worker_devices(self.s.worker_gpus), available_strategies())

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; a launched run's
        ranks (in process groups of their own) with it."""
        launch.stop_run(proc, self.s.cancel_grace_seconds)

    def watch(
        self,
        job_id: str,
        proc: subprocess.Popen,
        read_fd: int,
        reporter: ReportIngest,
        placement: Placement | None = None,
        pause_path: Path | None = None,
    ) -> Verdict:
        """Pump reports, renew the lease and poll for cancel until the child exits
        (``workers.watch``). The run is stopped by ``kill``, and paused as it was placed
        (``launch.request_pause``; no placement: a lone trainer)."""
        return RunWatch(
            self.s,
            self.store,
            self.owner,
            self.fence,
            job_id,
            proc,
            reporter,
            stop=lambda: self.kill(proc),
            pause=lambda: launch.request_pause(proc, placement, pause_path),
        ).run(read_fd)

    # ---- ending
    def finish(
        self, job_id: str, spec: JobSpec, verdict: Verdict, reporter: ReportIngest, attempt: int
    ) -> str:
        """Write the job's end state (``workers.verdict``); return what happened (for logs
        and tests)."""
        return write_end_state(
            self.store,
            job_id,
            spec,
            verdict,
            reporter,
            attempt,
            owner=self.owner,
            fence=self.fence,
            max_attempts=self.s.max_attempts,
        )

    # ---- one attempt
    def run(self, job_id: str, attempt: int) -> str:
        try:
            spec = read_stored_spec(self.store.get(job_id)["spec"])
        except StoredSpecError as exc:
            spec, problem, code = None, str(exc), "invalid_spec"
        else:
            problem, code = self._pin_files(job_id, spec), "invalid_training_file"
            if not problem:
                problem, code = self._hub_problem(job_id), "model_not_found"
            if not problem:
                problem, code = self._judge_problem(job_id), "judge_endpoint_unavailable"
            if not problem:
                problem, code = self._placement_problem(spec), "resources_unavailable"
        if problem:
            return self._fail_before_start(job_id, code, problem)
        server = None
        if wants_server(spec):
            try:
                model = self._run_spec(job_id, spec).model
                server = VLLMServer.start(
                    self.s, model, self.dir(job_id).vllm_log, lora_serving(spec)
                )
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

    def _judge_problem(self, job_id: str) -> str | None:
        """A grader model the API kept as a remote judge must be served by this worker's
        judge endpoints too; otherwise the run would take the name for a local model and
        fail to load it with a far less useful message."""
        names = json.loads(self.store.get(job_id).get("judge_models") or "[]")
        missing = [name for name in names if self.s.judges().endpoint_for(name) is None]
        if missing:
            return (
                f"the graders' judge model(s) {', '.join(map(repr, missing))} were accepted "
                f"by the API as served by its {JUDGES_SETTING}, but this worker's "
                f"{JUDGES_SETTING} serves no such model (queue {self.s.queue}); the API and "
                "the workers must list the same judge endpoints"
            )
        return None

    def _placement_problem(self, spec: JobSpec) -> str | None:
        try:
            self.placement_of(spec)
        except PlacementError as exc:
            return f"queue {self.s.queue}: {exc}"
        return None

    def _fail_before_start(self, job_id: str, code: str, problem: str) -> str:
        param = "training_file" if code == "invalid_training_file" else None
        error = {"code": code, "message": problem, "param": param}
        self.store.transition(job_id, S.failed, owner=self.owner, fence=self.fence, error=error)
        self.store.add_event(job_id, f"Job failed: {problem}", level="error")
        return "failed"

    def _checkpoint_eval(self, job_id: str, spec: JobSpec):
        """The eval run per checkpoint a job's spec asks for (``workers.ckptevals``)."""
        if spec.eval is None:
            return None
        runs = EvalRunStore(self.store.r, self.s.key_prefix)
        evals = EvalStore(self.store.r, self.s.key_prefix)
        queue = self.s.queue
        return functools.partial(
            create_checkpoint_run,
            self.store,
            runs,
            evals,
            self.files,
            Path(self.s.data_dir),
            job_id,
            spec.eval.model_dump(mode="json"),
            enqueue_run=functools.partial(_enqueue_eval_run, queue=queue),
            queue=queue,
            keep=self._keep_checkpoints(spec),
        )

    def _keep_checkpoints(self, spec: JobSpec) -> int:
        return self.s.keep_checkpoints if spec.keep_checkpoints is None else spec.keep_checkpoints

    def _run_trainer(self, job_id: str, spec: JobSpec, attempt: int, server) -> str:
        plan = self.write_plan(job_id, spec, attempt, server.url if server else None)
        if self.fence is not None:
            try:  # waits for a superseded run's checkpoint marking to finish
                fencing.write_fence(self.dir(job_id).fence, self.fence)
            except fencing.StaleFence as exc:
                log.warning("job %s: not started: %s", job_id, exc)
                return "superseded:fence"
            replay_journals(self.store, job_id, self.dir(job_id))
        self.store.add_event(job_id, f"Fine-tuning job started (attempt {attempt})")
        reporter = ReportIngest(
            self.store,
            job_id,
            spec.model,
            data_dir=Path(self.s.data_dir),
            keep_checkpoints=self._keep_checkpoints(spec),
            on_checkpoint=self._checkpoint_eval(job_id, spec),
        )
        run = self.spawn(job_id, plan)
        self.store.set_fields(
            job_id, pid=run.proc.pid, placement=json.dumps(run.placement.as_record())
        )
        if run.placement.launched:
            self.store.add_event(job_id, f"Launched {run.placement.describe()}")
        try:
            verdict = self.watch(
                job_id, run.proc, run.channel.read_fd, reporter, run.placement, run.pause_path
            )
        except BaseException:  # never leave a trainer running unsupervised
            self.kill(run.proc)
            raise
        finally:
            run.channel.close()
        log.info("job %s: attempt %d ended: %s %s", job_id, attempt, verdict.kind, verdict.detail)
        deadline, delay = time.monotonic() + self.s.report_flush_seconds, 0.25
        while True:  # the end state survives a Redis outage too
            try:
                outcome = self.finish(job_id, spec, verdict, reporter, attempt)
                if not self.store.exists(job_id):  # deleted (cancelled) while it stopped
                    with contextlib.suppress(RemovalFailed):  # logged; nothing to answer
                        self.files.delete_job_dir(job_id)
                return outcome
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("job %s: end state not written yet: %s", job_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _enqueue_eval_run(run_id: str, queue: str) -> None:
    from workers.celery_app import app, enqueue_eval_run  # the app imports this module

    enqueue_eval_run(app, run_id, queue)
