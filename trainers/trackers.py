"""A job's trackers in the training process: its W&B, TensorBoard and MLflow runs.

Each of the job's integrations (``trainers.contract.integrations``) becomes transformers'
own reporting callback for that tracker (``WandbCallback``, ``TensorBoardCallback``,
``MLflowCallback``), configured from the job and the worker's ``TrackerPolicy`` rather
than from environment variables, writing under the job's ``output/trackers/{type}/``, and
wrapped in a guard (``Tracker``):

- Only the reporting process (rank 0 of a launched run) builds trackers.
- A tracker that fails (its library missing on the worker, an MLflow server that cannot be
  reached, a full disk) costs the job that tracker, never its run: the first failure is a
  warning event on the job, and the tracker is off for the rest of the attempt.
- A resumed attempt continues the same runs: the W&B run id is the job id, opened with
  ``resume="allow"`` (offline, each attempt writes a run directory of that id, which
  ``wandb sync`` joins); TensorBoard's new writer hides the events an earlier attempt
  logged past the checkpoint it resumes from (``purge_step``); the MLflow run id is kept
  in the tracker's directory and that run is reopened, without logging its parameters
  again (MLflow refuses a parameter whose value changed).
- An RL job's samples (``trainers.samples``) go to each tracker's table: a ``wandb.Table``
  logged as ``samples``, a TensorBoard text summary ``samples`` (a markdown table), an
  MLflow table artifact ``samples/step-{step}.json``.

The runner adds these callbacks itself and leaves ``report_to`` at "none": with a tracker
named there, the Trainer would build the unguarded callbacks on every rank, and TRL's
profiler would log its timings straight to W&B and MLflow, where a failing server would
stop the training step.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from functools import partialmethod
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from trainers.contract.integrations import (
    DEFAULT_MLFLOW_EXPERIMENT,
    MlflowSettings,
    WandbSettings,
    tracker_dir,
)
from trainers.contract.plan import RunPlan
from trainers.reporting import Reporter, main_process

LABELS = {"wandb": "W&B", "tensorboard": "TensorBoard", "mlflow": "MLflow"}
_EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)
_MAX_ERROR_CHARS = 500


class Tracker(TrainerCallback):
    """One tracker's callback behind a guard: it never changes the trainer's control, and
    its first exception turns it off with a warning event instead of ending the run."""

    def __init__(self, kind: str, inner: Any, reporter: Reporter):
        self.kind, self.inner, self.reporter = kind, inner, reporter
        self.failed = False

    def _fail(self, what: str, exc: Exception) -> None:
        self.failed = True
        error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        self.reporter.event(
            f"{LABELS[self.kind]} tracker stopped: {what} failed ({error}); the job goes on "
            "without it",
            level="warn",
            integration=self.kind,
        )

    def _call(self, event: str, args, state, control, **kwargs):
        if not self.failed:
            try:
                getattr(self.inner, event)(args, state, control, **kwargs)
            except Exception as exc:
                self._fail(f"{event} at step {state.global_step}", exc)
        return None

    def samples(self, step: int, rows: list) -> None:
        """Add one step's sampled completions (``SampleRow``s) to the tracker's table."""
        if not self.failed:
            try:
                self.inner.log_samples(step, rows)
            except Exception as exc:
                self._fail(f"logging samples of step {step}", exc)


for _event in _EVENTS:
    setattr(Tracker, _event, partialmethod(Tracker._call, _event))


def sample_table(step: int, rows: list) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of one step's samples: the fixed fields, then each grader's reward."""
    graders = sorted({name for row in rows for name in row.rewards})
    columns = ["step", "group", "prompt", "completion", "reward", "advantage"]
    columns += ["completion_tokens", "truncated", *(f"reward/{g}" for g in graders)]
    data = [
        [
            *(step, r.group, r.prompt, r.completion, r.reward, r.advantage),
            *(r.completion_tokens, r.truncated, *(r.rewards.get(g) for g in graders)),
        ]
        for r in rows
    ]
    return columns, data


def markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    """A markdown table TensorBoard's text plugin draws; cells escaped so chat markers such
    as ``<|user|>`` show as text, and a ``|`` or a newline cannot break the table."""

    def cell(value: Any) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return html.escape(text).replace("|", "&#124;").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


class WandbRun(WandbCallback):
    """transformers' W&B callback on a run the job describes: id = job id, the server's
    mode, the run directory in the job's output."""

    def __init__(self, plan: RunPlan, settings: WandbSettings, mode: str):
        super().__init__()
        self.plan, self.settings, self.mode = plan, settings, mode
        self.dir = tracker_dir(plan.output_dir, "wandb")

    def setup(self, args, state, model, **kwargs):
        if state.is_world_process_zero and self._wandb.run is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            s = self.settings
            self._wandb.init(
                project=s.project,
                entity=s.entity,
                name=s.name or self.plan.job_id,
                tags=s.tags,
                id=self.plan.job_id,
                resume="allow",
                dir=str(self.dir),
                mode=self.mode,
                settings=self._wandb.Settings(
                    silent=True,
                    console="off",  # the job's train.log has the output
                    disable_git=True,  # the worker's directory is not the user's code
                    save_code=False,
                    disable_job_creation=True,
                ),
            )
        super().setup(args, state, model, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self._wandb.run is not None:
            self._wandb.finish()

    def log_samples(self, step: int, rows: list) -> None:
        if self._wandb.run is not None:
            columns, data = sample_table(step, rows)
            table = self._wandb.Table(columns=columns, data=data)
            self._wandb.log({"samples": table, "train/global_step": step})


class TensorBoardRun(TensorBoardCallback):
    """transformers' TensorBoard callback writing to the job's ``trackers/tensorboard``."""

    def __init__(self, plan: RunPlan):
        super().__init__()
        self.logging_dir = str(tracker_dir(plan.output_dir, "tensorboard"))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tb_writer is None:
            # resumed: events an earlier attempt logged after the checkpoint are hidden
            purge = state.global_step + 1 if state.global_step else None
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=purge)
        super().on_train_begin(args, state, control, **kwargs)

    def log_samples(self, step: int, rows: list) -> None:
        if self.tb_writer is not None:
            self.tb_writer.add_text("samples", markdown_table(*sample_table(step, rows)), step)
            self.tb_writer.flush()


class MlflowRun(MLflowCallback):
    """transformers' MLflow callback on one run per job, in the job's own file store unless
    the server allowed the job's tracking URI."""

    def __init__(self, plan: RunPlan, settings: MlflowSettings, uri: str | None):
        super().__init__()
        self.plan, self.settings = plan, settings
        self.dir = tracker_dir(plan.output_dir, "mlflow")
        self.uri = uri or (self.dir / "mlruns").resolve().as_uri()
        self.run_file = self.dir / "run.json"

    def setup(self, args, state, model):
        resumed = False
        if state.is_world_process_zero and not self._initialized:
            self.dir.mkdir(parents=True, exist_ok=True)
            mlflow = self._ml_flow
            mlflow.set_tracking_uri(self.uri)
            if self.run_file.exists():
                mlflow.start_run(run_id=json.loads(self.run_file.read_text())["run_id"])
                resumed = True
            else:
                s = self.settings
                mlflow.set_experiment(s.experiment_name or DEFAULT_MLFLOW_EXPERIMENT)
                tags = {**(s.tags or {}), "posttrain.job_id": self.plan.job_id}
                run = mlflow.start_run(run_name=s.run_name or self.plan.job_id, tags=tags)
                self.run_file.write_text(json.dumps({"run_id": run.info.run_id}))
        with _no_params() if resumed else contextlib.nullcontext():
            super().setup(args, state, model)
        self._auto_end_run = True  # the run this callback opened ends with training

    def log_samples(self, step: int, rows: list) -> None:
        active = self._ml_flow.active_run()
        if active is not None:
            columns, data = sample_table(step, rows)
            table = {c: [row[i] for row in data] for i, c in enumerate(columns)}
            artifact = f"samples/step-{step:08d}.json"
            self._ml_flow.log_table(table, artifact_file=artifact, run_id=active.info.run_id)


@contextlib.contextmanager
def _no_params():
    """transformers' MLflow setup logging no parameters (a reopened run has them)."""
    saved = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
    os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_MAX_LOG_PARAMS", None)
        else:
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = saved


def _mlflow_environment(local: bool) -> None:
    """This training process's MLflow: no usage reports to MLflow's servers (a worker may
    have no network), a few quick retries so an unreachable server fails in seconds rather
    than minutes (the worker's own values win), and the job's file store allowed."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if local:  # MLflow 3 keeps its file store behind this switch
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


def _callback(item, plan: RunPlan, reporter: Reporter):
    """The inner callback of one integration, or None when the worker does not run it."""
    policy = plan.trackers
    if item.type == "wandb":
        if policy.wandb_mode == "disabled":
            reporter.event("W&B is disabled on this worker; no W&B run", level="warn")
            return None
        return WandbRun(plan, item.wandb, policy.wandb_mode)
    if item.type == "tensorboard":
        return TensorBoardRun(plan)
    uri = item.mlflow.tracking_uri
    if uri is not None and not policy.mlflow_allowed(uri):
        reporter.event(
            f"MLflow tracking URI '{uri}' is not allowed on this worker; the run goes to "
            "the job's own MLflow store",
            level="warn",
        )
        uri = None
    _mlflow_environment(local=uri is None)
    return MlflowRun(plan, item.mlflow, uri)


def build_trackers(plan: RunPlan, reporter: Reporter) -> list[Tracker]:
    """The guarded tracker callbacks of the job's integrations (none off rank 0)."""
    if not plan.spec.integrations or not main_process():
        return []
    trackers = []
    for item in plan.spec.integrations:
        try:
            inner = _callback(item, plan, reporter)
        except Exception as exc:  # e.g. the library is not installed on this worker
            reporter.event(
                f"{LABELS[item.type]} integration skipped: {type(exc).__name__}: {exc} "
                "(the worker needs posttrain's 'trackers' extra)"[:_MAX_ERROR_CHARS],
                level="warn",
            )
            continue
        if inner is not None:
            trackers.append(Tracker(item.type, inner, reporter))
    if trackers:
        names = [
            LABELS[t.kind] + (f" ({plan.trackers.wandb_mode})" if t.kind == "wandb" else "")
            for t in trackers
        ]
        kinds = ",".join(t.kind for t in trackers)
        reporter.event(f"Reporting to {', '.join(names)}", integrations=kinds)
    return trackers
