"""The checks ``make deploy-test`` makes against a running Compose stack.

Everything a user would do goes through the published API port with the official
``openai`` SDK (upload, fine-tune, checkpoints, chat, deletes); what only an operator
sees (uids on the data volume, files gone from it) is read with ``docker compose exec``.
Each check raises ``Failed`` saying what it expected and what it saw.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx
from openai import APIStatusError, OpenAI

from deploy.docker import Failed, run

DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"
# Long enough (700 steps) that the worker can be restarted after its first checkpoint.
HYPERPARAMETERS = {"n_epochs": 50, "batch_size": 4, "learning_rate": 5e-3}
CHECKPOINT_EVERY = 50
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    """A Compose project under test and how to reach its API."""

    compose: list[str]  # the Compose CLI with -f and -p
    env: dict[str, str]
    base_url: str
    key: str
    uid: int
    notes: list[str] = field(default_factory=list)

    def sdk(self) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key=self.key, max_retries=4)

    def dc(self, *args: str, quiet: bool = False, check: bool = True) -> str:
        return run([*self.compose, *args], env=self.env, quiet=quiet, check=check)

    def sh(self, service: str, script: str) -> str:
        """Run ``script`` with sh in ``service``'s container; its stdout."""
        return self.dc("exec", "-T", service, "sh", "-c", script, quiet=True)

    def note(self, text: str) -> None:
        print(f"  ok: {text}", flush=True)
        self.notes.append(text)


def wait_for(what: str, probe, timeout: float, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def api_ready(st: Stack) -> bool:
    try:
        return httpx.get(f"{st.base_url}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def unhealthy(st: Stack, services: list[str]) -> dict:
    """The services whose container is not running with a passing health check."""
    rows = [json.loads(ln) for ln in st.dc("ps", "--format", "json", quiet=True).splitlines()]
    health = {r["Service"]: (r["State"], r.get("Health", "")) for r in rows}
    return {s: health.get(s) for s in services if health.get(s) != ("running", "healthy")}


def all_healthy(st: Stack, services: list[str]) -> None:
    bad = unhealthy(st, services)
    if bad:
        raise Failed(f"services not running and healthy: {bad}")
    st.note("running and healthy: " + ", ".join(services))


def same_uid(st: Stack, services: list[str]) -> None:
    """Every service runs as the one posttrain uid, and that uid owns the data volume."""
    seen = {s: int(st.sh(s, "id -u").strip()) for s in services}
    if set(seen.values()) != {st.uid}:
        raise Failed(f"services run as different uids: {seen} (expected {st.uid} everywhere)")
    written = st.sh("worker", "find /data | wc -l").strip()
    others = st.sh("worker", f"find /data ! -user {st.uid} | head -5").split()
    if others:
        raise Failed(f"on the data volume, not owned by uid {st.uid}: {others}")
    st.note(f"every service runs as uid {st.uid}, which owns all {written} paths on /data")


def api_without_torch(st: Stack) -> None:
    """The API's image carries no torch; the worker's has the pinned CPU build."""
    probe = "import importlib.util as u; print(u.find_spec('torch') is not None)"
    if st.dc("exec", "-T", "api", "python3", "-c", probe, quiet=True).strip() != "False":
        raise Failed("torch is importable in the API's image")
    version = st.dc(
        "exec", "-T", "worker", "python3", "-c", "import torch; print(torch.__version__)",
        quiet=True,
    ).strip()  # fmt: skip
    st.note(f"the API image has no torch; the worker has torch {version}")


def train_through_a_worker_restart(st: Stack, client: OpenAI) -> dict:
    """Upload, start an SFT job, restart the worker container after the first checkpoint,
    and see the job resume and succeed."""
    with DEMO.open("rb") as fh:
        upload = client.files.create(file=("demo_sft.jsonl", fh.read()), purpose="fine-tune")
    st.note(f"uploaded {upload.filename} as {upload.id} ({upload.bytes} bytes)")
    job = client.fine_tuning.jobs.create(
        model="/models/tiny-model",
        training_file=upload.id,
        suffix="deploy",
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        extra_body={"checkpoint_every_steps": CHECKPOINT_EVERY},
    )
    st.note(f"created job {job.id} on queue {getattr(job, 'queue', None) or 'posttrain.cpu'}")
    first = wait_for(
        "the job's first checkpoint",
        lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data,
        600,
        poll=0.5,
    )
    step = first[-1].step_number
    status = client.fine_tuning.jobs.retrieve(job.id).status
    if status != "running":
        raise Failed(f"job {job.id} is {status} at its first checkpoint; it must still run")
    # -t 0: killed at once, as a crashed host or an OOM kill would. With Docker's default
    # 10 s grace the job can finish before the kill on a fast machine, and nothing resumes.
    st.dc("restart", "-t", "0", "worker")
    st.note(
        f"killed and restarted the worker container while job {job.id} ran "
        f"(checkpoint at step {step})"
    )
    done = wait_for(
        f"job {job.id} to end",
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
        1200,
        poll=2,
    )
    if done.status != "succeeded":
        raise Failed(f"job {job.id} ended {done.status}: {done.error}")
    # iterating the page follows every page: the per-step events come first (newest first)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    resumed = [m for m in events if m.startswith(("Worker lost", "Resumed from checkpoint"))]
    if not any(m.startswith("Resumed from checkpoint") for m in resumed):
        raise Failed(f"job {job.id} succeeded but never resumed from a checkpoint: {resumed}")
    attempt = (done.model_extra or {}).get("attempt")
    st.note(f"job {job.id} succeeded on attempt {attempt}: " + "; ".join(reversed(resumed)))
    return {"job": done, "file": upload.id}


def download_and_load(st: Stack, client: OpenAI, job_id: str, base: Path, dest: Path) -> str:
    """The newest checkpoint through the API, unpacked and loaded with transformers; its
    weights must differ from the base model's (it trained)."""
    ckpt = client.fine_tuning.jobs.checkpoints.list(job_id, limit=1).data[0]
    path = f"/fine_tuning/jobs/{job_id}/checkpoints/{ckpt.id}/content"
    blob = client.get(path, cast_to=httpx.Response).content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(dest, filter="data")
    # transformers in a child: this process stays free of torch
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tuned, base = sys.argv[1], sys.argv[2]\n"
        "tok = AutoTokenizer.from_pretrained(tuned)\n"
        "m = AutoModelForCausalLM.from_pretrained(tuned)\n"
        "b = AutoModelForCausalLM.from_pretrained(base)\n"
        "diff = sum((p - q).abs().sum().item() for p, q in zip(m.parameters(), b.parameters()))\n"
        "msgs = [{'role': 'user', 'content': 'What color is the sky?'}]\n"
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt',"
        " return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=12, do_sample=False)\n"
        "text = tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=True)\n"
        "print(repr(text), diff)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(dest / top), str(base)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise Failed(f"the downloaded checkpoint does not load: {out.stderr[-1500:]}")
    text, diff = out.stdout.strip().rsplit(" ", 1)
    if float(diff) == 0:
        raise Failed("the downloaded checkpoint has the base model's weights: nothing trained")
    st.note(
        f"downloaded {ckpt.id} (step {ckpt.step_number}, {len(blob) / 1e6:.1f} MB), loaded it "
        f"with transformers (|tuned - base| = {float(diff):.2f}); it says {text}"
    )
    return text


def chat(st: Stack, client: OpenAI, model: str) -> str:
    """A chat completion from the fine-tuned model, through the inference worker."""

    def ask():
        try:
            return client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "What color is the sky?"}],
                temperature=0,
                max_tokens=12,
            )
        except APIStatusError as exc:  # the model is loading, or no worker registered yet
            if exc.status_code != 503:
                raise
            print(f"  waiting: {exc.status_code} {exc.message}", flush=True)
            return None

    reply = wait_for("a chat completion", ask, 300, poll=3)
    text = reply.choices[0].message.content
    st.note(f"chat completion from {model}: {text!r} ({reply.usage.total_tokens} tokens)")
    return text


def metrics(st: Stack) -> None:
    """/metrics on the published port answers the admin key, and counts the CPU worker."""
    resp = httpx.get(
        f"{st.base_url}/metrics", headers={"Authorization": f"Bearer {st.key}"}, timeout=10
    )
    if resp.status_code != 200:
        raise Failed(f"/metrics answered {resp.status_code}: {resp.text[:300]}")
    lines = [ln for ln in resp.text.splitlines() if ln.startswith("posttrain_workers{")]
    if not any('queue="posttrain.cpu"' in ln and not ln.endswith(" 0.0") for ln in lines):
        raise Failed(f"/metrics does not count the CPU worker: {lines}")
    st.note(f"/metrics scraped with the admin key: {'; '.join(lines)}")


def _records(client: OpenAI, job_id: str) -> dict:
    return {
        "files": sorted((f.id, f.bytes) for f in client.files.list().data),
        "jobs": sorted((j.id, j.status) for j in client.fine_tuning.jobs.list().data),
        "events": [e.id for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data],
        "checkpoints": [c.id for c in client.fine_tuning.jobs.checkpoints.list(job_id).data],
        "models": sorted(m.id for m in client.models.list().data),
    }


def restart_redis(st: Stack, client: OpenAI, job_id: str) -> None:
    """A record written just before Redis restarts, and every older one, is still there."""
    fresh = client.files.create(
        file=("fresh.jsonl", DEMO.read_text().splitlines()[0].encode() + b"\n"),
        purpose="fine-tune",
    )
    before = _records(client, job_id)
    st.dc("restart", "redis")
    wait_for("the API to be ready again", lambda: api_ready(st), 120)
    after = wait_for("the records to be readable", lambda: _safe(_records, client, job_id), 60)
    if after != before:
        lost = {k: sorted(set(map(str, before[k])) - set(map(str, after[k]))) for k in before}
        raise Failed(f"records changed across the Redis restart: {lost}")
    # and every service is healthy again on its own (the worker reconnected)
    wait_for("every service healthy", lambda: not unhealthy(st, ["redis", "api", "worker"]), 90)
    counts = ", ".join(f"{len(v)} {k}" for k, v in before.items())
    st.note(f"Redis restarted; no record lost ({counts}; {fresh.id} written just before)")


def _safe(fn, *args):
    try:
        return fn(*args)
    except APIStatusError:
        return None


def deletions(st: Stack, client: OpenAI, job_id: str, model: str, file_id: str) -> None:
    """The API deletes what the worker wrote: the model's weights and an upload leave the
    volume, and only then is the answer ``deleted: true``."""
    output = f"/data/jobs/{job_id}/output"
    if st.sh("api", f"ls {output}").strip() == "":
        raise Failed(f"{output} is empty before the delete")
    answer = client.models.delete(model)
    if not answer.deleted or st.sh("api", f"test -e {output} && echo present || true").strip():
        raise Failed(f"model {model} answered deleted={answer.deleted}; {output} still exists")
    answer = client.files.delete(file_id)
    if not answer.deleted or st.sh("api", f"ls /data/files | grep {file_id} || true").strip():
        raise Failed(f"file {file_id} answered deleted={answer.deleted}; its bytes remain")
    st.note(f"deleted {model} and {file_id}; their files are gone from the data volume")
