"""A job's trackers through the shared runner: what W&B (offline), TensorBoard and MLflow
hold after real runs, read back with each tracker's own library.

A GRPO run's metrics are in all three, value for value, and its samples are in each
tracker's table; a resumed SFT run continues the same runs (one W&B id, TensorBoard showing
each step once, one MLflow run); a tracking server that cannot be reached costs the job its
MLflow run and a warning event, never the run; only rank 0 builds trackers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.trackerfiles import (
    mlflow_client,
    mlflow_history,
    tensorboard_scalars,
    tensorboard_texts,
    wandb_history,
    wandb_runs,
)
from trainers import registry
from trainers.contract import messages as m
from trainers.contract.integrations import TrackerPolicy, tracker_dir
from trainers.contract.plan import RunPlan
from trainers.contract.spec import JobSpec
from trainers.reporting import Reporter
from trainers.runner import run_method
from trainers.tiny_model import build_tiny_model
from trainers.trackers import build_trackers

JOB = "ftjob-trackers"
WANDB = {"type": "wandb", "wandb": {"project": "posttrain-tests", "tags": ["tiny", "ci"]}}
TENSORBOARD = {"type": "tensorboard"}
MLFLOW = {"type": "mlflow", "mlflow": {"experiment_name": "tests", "tags": {"team": "a"}}}
GRADER = {
    "type": "string_check",
    "name": "says_answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}
GRPO = {
    "type": "grpo",
    "grpo": {
        "graders": [GRADER],
        "hyperparameters": {
            "num_generations": 4,
            "batch_size": 8,
            "max_completion_length": 6,
            "learning_rate": 5e-3,
            "max_steps": 2,
        },
    },
}
PROMPTS = [{"prompt": f"Who is {i} | <b>?", "answer": "Heidi"} for i in range(4)]
CHATS = [
    {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
    for i in range(8)
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(autouse=True)
def _one_thread_and_no_open_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    import mlflow

    while mlflow.active_run() is not None:  # a failed test must not leave its run open
        mlflow.end_run()


def make_plan(root: Path, model_dir: Path, method: dict, rows: list, **spec) -> RunPlan:
    policy = spec.pop("trackers", TrackerPolicy())
    job = JobSpec.model_validate(
        {"model": str(model_dir), "training_file": "file-x", "method": method, **spec}
    )
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RunPlan(
        job_id=JOB,
        spec=job,
        training_path=train,
        output_dir=root / "output",
        data_dir=root,
        checkpoint_every_steps=spec.get("checkpoint_every_steps") or 100,
        trackers=policy,
    )


def sent(reporter: Reporter, kind: type) -> list:
    return [msg for msg in reporter.sent if isinstance(msg, kind)]


def step_metrics(reporter: Reporter) -> dict[int, dict[str, float]]:
    """The job's metrics, as its record gets them: {step: {key: value}}."""
    return {log.step: dict(log.metrics) for log in sent(reporter, m.Log)}


def test_a_grpo_run_fills_every_tracker_with_its_metrics_and_samples(model_dir, tmp_path):
    plan = make_plan(tmp_path, model_dir, GRPO, PROMPTS, integrations=[WANDB, TENSORBOARD, MLFLOW])
    reporter = Reporter()
    result = run_method(registry.resolve("grpo"), plan, reporter)
    assert result.step == 2
    events = [e.message for e in sent(reporter, m.Event)]
    assert "Reporting to W&B (offline), TensorBoard, MLflow" in events
    assert not [e for e in sent(reporter, m.Event) if e.level == "warn"]
    metrics = step_metrics(reporter)
    assert sorted(metrics) == [1, 2] and all(
        "loss" in v and "reward" in v for v in metrics.values()
    )
    samples = {s.step: s.rows for s in sent(reporter, m.Samples)}
    assert sorted(samples) == [1, 2] and all(len(rows) == 4 for rows in samples.values())

    # W&B: one offline run, id = the job id, every step metric at its global step
    (run_dir,) = wandb_runs(tracker_dir(plan.output_dir, "wandb"))
    run, history = wandb_history(run_dir)
    assert run == {
        "id": JOB,
        "project": "posttrain-tests",
        "entity": "",
        "name": JOB,
        "tags": ["tiny", "ci"],
    }
    by_step = {}
    for row in history:
        if "train/global_step" in row and "train/loss" in row:
            by_step[row["train/global_step"]] = row
    for step, values in metrics.items():
        for key, value in values.items():
            assert by_step[step][f"train/{key}"] == pytest.approx(value, rel=1e-6), key
    tables = [row for row in history if row.get("samples/_type") == "table-file"]
    assert [t["train/global_step"] for t in tables] == [1, 2]
    table = json.loads((run_dir / "files" / tables[0]["samples/path"]).read_text())
    assert table["columns"][:4] == ["step", "group", "prompt", "completion"]
    assert "reward/says_answer" in table["columns"]
    assert [row[3] for row in table["data"]] == [r.completion for r in samples[1]]

    # TensorBoard: the same values (float32), and the samples as a text table
    logdir = tracker_dir(plan.output_dir, "tensorboard")
    scalars = tensorboard_scalars(logdir)
    for step, values in metrics.items():
        for key, value in values.items():
            assert dict(scalars[f"train/{key}"])[step] == pytest.approx(value, rel=1e-5), key
    texts = tensorboard_texts(logdir, "samples")
    assert sorted(texts) == [1, 2]
    assert "| step | group | prompt | completion |" in texts[1]
    assert "&#124; &lt;b&gt;?" in texts[1] and "<b>" not in texts[1]  # escaped, table intact

    # MLflow: one run in the job's file store, its metrics and one table per sampled step
    client = mlflow_client(tracker_dir(plan.output_dir, "mlflow") / "mlruns")
    run_id = json.loads((tracker_dir(plan.output_dir, "mlflow") / "run.json").read_text())
    mlrun = client.get_run(run_id["run_id"])
    assert mlrun.info.run_name == JOB and mlrun.data.tags["team"] == "a"
    assert mlrun.data.tags["posttrain.job_id"] == JOB
    assert client.get_experiment(mlrun.info.experiment_id).name == "tests"
    logged = mlflow_history(client, mlrun.info.run_id)
    for step, values in metrics.items():
        for key, value in values.items():
            assert logged[key][step] == pytest.approx(value, rel=1e-6), key
    artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id, "samples")]
    assert artifacts == ["samples/step-00000001.json", "samples/step-00000002.json"]
    path = client.download_artifacts(mlrun.info.run_id, artifacts[1], str(tmp_path / "dl"))
    logged_table = json.loads(Path(path).read_text())
    completion = logged_table["columns"].index("completion")
    assert [row[completion] for row in logged_table["data"]] == [r.completion for r in samples[2]]


def test_a_resumed_run_continues_the_same_tracker_runs(model_dir, tmp_path):
    spec = {"integrations": [WANDB, TENSORBOARD, MLFLOW], "checkpoint_every_steps": 2}
    hp = {"batch_size": 4, "learning_rate": 5e-3, "max_steps": 3}
    sft = {"type": "supervised", "supervised": {"hyperparameters": hp}}
    first = run_method(
        registry.resolve("supervised"),
        make_plan(tmp_path, model_dir, sft, CHATS, **spec),
        Reporter(),
    )
    assert first.step == 3
    # the attempt died after logging step 3 and before its checkpoint was complete
    shutil.rmtree(tmp_path / "output" / "checkpoint-3")
    hp["max_steps"] = 4
    plan = make_plan(tmp_path, model_dir, sft, CHATS, **spec)
    reporter = Reporter()
    assert run_method(registry.resolve("supervised"), plan, reporter).step == 4
    assert "Resumed from checkpoint at step 2" in [e.message for e in sent(reporter, m.Event)]
    assert not [e for e in sent(reporter, m.Event) if e.level == "warn"]

    runs = wandb_runs(tracker_dir(plan.output_dir, "wandb"))
    assert len(runs) == 2 and {wandb_history(r)[0]["id"] for r in runs} == {JOB}
    resumed_steps = [
        row["train/global_step"] for row in wandb_history(runs[1])[1] if "train/loss" in row
    ]
    assert resumed_steps == [3, 4]

    loss = tensorboard_scalars(tracker_dir(plan.output_dir, "tensorboard"))["train/loss"]
    assert [step for step, _ in loss] == [1, 2, 3, 4]  # the first attempt's step 3 is purged
    assert dict(loss)[4] == pytest.approx(step_metrics(reporter)[4]["loss"], rel=1e-5)

    client = mlflow_client(tracker_dir(plan.output_dir, "mlflow") / "mlruns")
    experiment = client.get_experiment_by_name("tests")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    steps = [h.step for h in client.get_metric_history(mlrun.info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]


def test_an_unreachable_tracking_server_costs_the_tracker_not_the_job(
    model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    mlflow = {"type": "mlflow", "mlflow": {"tracking_uri": server}}
    sft = {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 2}}}
    plan = make_plan(
        tmp_path,
        model_dir,
        sft,
        CHATS,
        integrations=[mlflow, TENSORBOARD],
        trackers=TrackerPolicy(mlflow_tracking_uris=(server,)),
    )
    reporter = Reporter()
    result = run_method(registry.resolve("supervised"), plan, reporter)
    assert result.step == 2 and not result.paused
    (warning,) = [e for e in sent(reporter, m.Event) if e.level == "warn"]
    assert warning.message.startswith("MLflow tracker stopped: on_train_begin at step 0 failed")
    assert warning.data == {"integration": "mlflow"}
    loss = tensorboard_scalars(tracker_dir(plan.output_dir, "tensorboard"))["train/loss"]
    assert [step for step, _ in loss] == [1, 2]  # the other tracker went on


def test_a_uri_the_worker_does_not_allow_falls_back_to_the_jobs_store(model_dir, tmp_path):
    mlflow = {"type": "mlflow", "mlflow": {"tracking_uri": "http://mlflow.example:5000"}}
    plan = make_plan(tmp_path, model_dir, GRPO, PROMPTS, integrations=[mlflow])
    reporter = Reporter()
    (tracker,) = build_trackers(plan, reporter)
    assert tracker.inner.uri == (tracker_dir(plan.output_dir, "mlflow") / "mlruns").as_uri()
    (warning,) = sent(reporter, m.Event)[:1]
    assert warning.level == "warn" and "not allowed on this worker" in warning.message


def test_only_the_reporting_rank_builds_trackers(model_dir, tmp_path, monkeypatch):
    plan = make_plan(tmp_path, model_dir, GRPO, PROMPTS, integrations=[WANDB, TENSORBOARD])
    assert [t.kind for t in build_trackers(plan, Reporter())] == ["wandb", "tensorboard"]
    monkeypatch.setenv("RANK", "1")
    assert build_trackers(plan, Reporter()) == []
    disabled = make_plan(
        tmp_path,
        model_dir,
        GRPO,
        PROMPTS,
        integrations=[WANDB],
        trackers=TrackerPolicy(wandb_mode="disabled"),
    )
    monkeypatch.setenv("RANK", "0")
    reporter = Reporter()
    assert build_trackers(disabled, reporter) == []
    assert sent(reporter, m.Event)[0].message == "W&B is disabled on this worker; no W&B run"
