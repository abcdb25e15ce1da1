"""A run that diverges fails at its first non-finite step, keeps only finite checkpoints
(pruned to the job's ``keep_checkpoints`` by the real worker), and a finished job can be
deleted with everything it wrote: the real API, worker and trainer, driven by the SDK.

The data trick: one OREO trajectory's reward is 3e38, inside float32's range (so the
upload takes it) but its square is not, so the step that trains on it has an infinite
loss and a NaN gradient norm while every earlier step is finite.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from importlib import resources

import httpx
import pytest
from openai import OpenAI

from tests.e2e.test_dpo_job import wait_done

pytestmark = pytest.mark.e2e
ROWS = resources.files("trainers") / "assets" / "demo_oreo.jsonl"


@pytest.fixture(scope="module")
def sdk(stack):
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def _weights_finite(blob: bytes) -> tuple[int, bool]:
    """(safetensors files in a checkpoint tar, whether every tensor in them is finite)."""
    import torch
    from safetensors.torch import load

    files, finite = 0, True
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".safetensors"):
                files += 1
                tensors = load(tar.extractfile(member).read())
                finite &= all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())
    return files, finite


def test_a_diverging_job_fails_naming_the_step_and_keeps_only_finite_checkpoints(stack, sdk):
    rows = [json.loads(x) for x in ROWS.read_text().splitlines()][:24]
    rows[13]["reward"] = 3e38
    body = "\n".join(json.dumps(r) for r in rows).encode()
    f = sdk.files.create(file=("poisoned.jsonl", io.BytesIO(body)), purpose="fine-tune")
    hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 3e-3}
    job = sdk.fine_tuning.jobs.create(
        model=str(stack.model_dir),
        training_file=f.id,
        seed=1,
        method={"type": "oreo", "oreo": {"hyperparameters": hp}},
        extra_body={"checkpoint_every_steps": 1, "keep_checkpoints": 2},
    )
    job = wait_done(sdk, job.id, 300)
    assert job.status == "failed", job
    assert job.error.code == "training_diverged"
    bad_step = int(re.search(r"stopped at step (\d+): non-finite", job.error.message).group(1))
    assert "loss=inf" in job.error.message
    assert bad_step > 3  # the poisoned row is not in the first batches (seed 1)

    c = httpx.Client(base_url=f"{stack.base_url}/v1", timeout=60)
    metrics = c.get(f"/fine_tuning/jobs/{job.id}/metrics", params={"limit": 1000}).json()["data"]
    finite = [m["step"] for m in metrics if "loss" in m]
    assert finite == list(range(1, bad_step))  # the diverged step's loss is not a number

    # every step before the bad one saved a checkpoint; retention kept the newest two, and
    # nothing was saved at or after the bad step
    ckpts = list(sdk.fine_tuning.jobs.checkpoints.list(job.id))
    assert [ck.step_number for ck in ckpts] == [bad_step - 1, bad_step - 2]
    out = stack.data_dir / "jobs" / job.id / "output"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"checkpoint-{s}" for s in (bad_step - 1, bad_step - 2)
    )
    for ck in ckpts:
        blob = c.get(f"/fine_tuning/jobs/{job.id}/checkpoints/{ck.id}/content").content
        files, all_finite = _weights_finite(blob)
        assert files >= 2 and all_finite  # the policy and OREO's value model

    # a finished job can be deleted with everything it wrote
    resp = c.delete(f"/fine_tuning/jobs/{job.id}")
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    assert not (stack.data_dir / "jobs" / job.id).exists()
    assert stack.redis.keys(f"*job:{job.id}*") == []
    assert c.get(f"/fine_tuning/jobs/{job.id}").status_code == 404
