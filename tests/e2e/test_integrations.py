"""A job's trackers through the real API and worker, as a user downloads them.

One SFT job with all three integrations (W&B offline, TensorBoard, MLflow in the job's
own store), created with the official SDK; each tracker's run directory is downloaded as a
tar from the job, unpacked, and read back with that tracker's own library: its loss,
learning rate and gradient norm are the job's metrics, step for step.
"""

from __future__ import annotations

import io
import tarfile
from importlib import resources
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.e2e.test_sft_job import wait_done
from tests.trackerfiles import (
    mlflow_client,
    mlflow_history,
    tensorboard_scalars,
    wandb_history,
    wandb_runs,
)

pytestmark = pytest.mark.e2e
DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"
WANDB = {"type": "wandb", "wandb": {"project": "e2e", "name": "tiny-sft", "tags": ["e2e"]}}
MLFLOW = {"type": "mlflow", "mlflow": {"experiment_name": "e2e"}}
COMPARED = ("loss", "learning_rate", "grad_norm")


def download(stack, job_id: str, kind: str, into: Path) -> Path:
    """The tracker's run directory as the API serves it, unpacked under ``into``."""
    url = f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/integrations/{kind}/content"
    resp = httpx.get(url, timeout=60)
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        tar.extractall(into, filter="data")
    return into / f"{job_id}-{kind}"


def test_an_sft_jobs_trackers_hold_its_metrics_and_download_from_the_job(stack, tmp_path):
    sdk = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    with DEMO.open("rb") as fh:
        training_file = sdk.files.create(file=("demo_sft.jsonl", fh), purpose="fine-tune")
    hp = {"batch_size": 8, "learning_rate": 5e-3, "max_steps": 3}
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=training_file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        integrations=[WANDB],
        extra_body={"integrations": [WANDB, {"type": "tensorboard"}, MLFLOW]},
    )
    job = wait_done(sdk, job.id)
    assert job.status == "succeeded", job.error
    assert [i.type for i in job.integrations] == ["wandb", "tensorboard", "mlflow"]
    messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Reporting to W&B (offline), TensorBoard, MLflow" in messages
    metrics = httpx.get(f"{stack.base_url}/v1/fine_tuning/jobs/{job.id}/metrics").json()["data"]
    steps = {row["step"]: row for row in metrics}
    assert sorted(steps) == [1, 2, 3]

    wandb_dir = download(stack, job.id, "wandb", tmp_path)
    (run_dir,) = wandb_runs(wandb_dir)
    run, history = wandb_history(run_dir)
    assert (run["id"], run["project"], run["name"], run["tags"]) == (
        job.id,
        "e2e",
        "tiny-sft",
        ["e2e"],
    )
    logged = {row["train/global_step"]: row for row in history if "train/loss" in row}
    assert sorted(logged) == [1, 2, 3]
    for step, row in steps.items():
        for key in COMPARED:
            assert logged[step][f"train/{key}"] == pytest.approx(row[key], rel=1e-6), key

    scalars = tensorboard_scalars(download(stack, job.id, "tensorboard", tmp_path))
    for key in COMPARED:
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2, 3]
        for step, value in scalars[f"train/{key}"]:
            assert value == pytest.approx(steps[step][key], rel=1e-5), key

    store = download(stack, job.id, "mlflow", tmp_path)
    client = mlflow_client(store / "mlruns")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert mlrun.info.run_name == job.id and mlrun.data.tags["posttrain.job_id"] == job.id
    history = mlflow_history(client, mlrun.info.run_id)
    for step, row in steps.items():
        for key in COMPARED:
            assert history[key][step] == pytest.approx(row[key], rel=1e-6), key
