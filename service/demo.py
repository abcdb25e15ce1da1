"""``posttrain demo``: one real SFT job end to end on the tiny offline model.

Starts what is missing (Redis if none answers, the API, one worker), builds the
tiny model, uploads the bundled demo data, submits a job, shows a progress bar
until it ends, downloads the final checkpoint, and ends by asking the fine-tuned
model questions through ``client.chat.completions.create`` (an inference worker
running ``transformers serve`` answers), each printed next to the base model's answer.
Everything lives under ``POSTTRAIN_DATA_DIR`` (default ./posttrain-data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx
from tqdm import tqdm

from service import stack
from service.client import JOB_ENDS, Client, Config
from service.settings import ApiSettings

# Tuned for a randomly initialised 0.1M-parameter model: it needs a high learning rate.
DEMO_HYPERPARAMETERS = {"n_epochs": 20, "batch_size": 8, "learning_rate": 5e-3}
SAMPLES = 3  # conversations from the demo data whose replies are shown before and after


def _api_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _start_stack(s: ApiSettings, data: Path, started: list) -> str:
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    proc = stack.start_redis(s.redis_url, logs / "redis.log")
    if proc:
        print(f"started redis-server for {s.redis_url}")
        started.append(proc)
    env = {
        **os.environ,
        "POSTTRAIN_DATA_DIR": str(data),
        "POSTTRAIN_MODEL_ROOTS": ":".join(
            filter(None, [str(data / "models"), os.environ.get("POSTTRAIN_MODEL_ROOTS")])
        ),
        "POSTTRAIN_REDIS_URL": s.redis_url,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    url = f"http://127.0.0.1:{s.port}"
    if _api_up(url):
        print(f"using the API already running at {url}")
    else:
        started.append(stack.start_api(env, s.port, logs / "api.log"))
        print(f"started the API at {url} (log: {logs / 'api.log'})")
    started.append(stack.start_worker(env, logs / "worker.log", name="demo"))
    print(f"started a worker (log: {logs / 'worker.log'})")
    if _inference_up(s):
        print("using the inference worker already registered")
    else:
        port = stack.free_port()
        log = logs / "inference.log"
        started.append(
            stack.start_inference({**env, "POSTTRAIN_INFERENCE_DEVICE": "cpu"}, log, port)
        )
        print(f"started an inference worker on port {port} (log: {log})")
    return url


def _inference_up(s: ApiSettings) -> bool:
    from workers.inference.registry import live_workers
    from workers.redis_client import make_redis

    return bool(live_workers(make_redis(s), s.key_prefix, s.inference_queue))


def _follow(c: Client, job_id: str) -> dict:
    """Poll the job, drawing a progress bar from its step and newest loss, until it ends."""
    bar = tqdm(total=1, desc="queued", unit="step", dynamic_ncols=True, mininterval=0.5)
    last = None
    while True:
        job = c.job(job_id)
        rows = c.metrics_since(job_id, last)
        if rows:
            last = rows[-1]["step"]
            if "loss" in rows[-1]:
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", refresh=False)
        bar.total = job.get("total_steps") or bar.total
        if job.get("step"):
            bar.update(job["step"] - bar.n)
        bar.set_description(job["status"])
        if job["status"] in JOB_ENDS:
            bar.close()
            return job
        time.sleep(0.5)


def _samples(path) -> list[list[dict]]:
    """The first few prompts of the demo data (every turn before the last assistant reply)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()][:SAMPLES]
    return [r["messages"][:-1] for r in rows]


def _build_tiny_model(path: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "trainers.tiny_model", str(path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


def _ask(url: str, models: list[str], prompts: list[list[dict]]) -> list[list[str]]:
    """Each model's greedy answer to each prompt, through the official SDK's chat call."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("OPENAI_API_KEY", "demo"))
    return [
        [
            client.chat.completions.create(
                model=model, messages=prompt, temperature=0, max_tokens=32
            )
            .choices[0]
            .message.content
            for prompt in prompts
        ]
        for model in models
    ]


def run_demo(keep_running: bool = False) -> int:
    s = ApiSettings()
    data = Path(s.data_dir).resolve()
    started: list = []
    try:
        url = _start_stack(s, data, started)
        # under <data_dir>/models, the default model root (POSTTRAIN_MODEL_ROOTS)
        model_dir = _build_tiny_model(data / "models" / "tiny-model")
        print(f"built the tiny model at {model_dir}")
        c = Client(Config(base_url=url, api_key=None))
        demo = Path(str(resources.files("trainers") / "assets" / "demo_sft.jsonl"))
        f = c.upload(demo, "fine-tune")
        print(f"uploaded {f['filename']}: {f['rows']} rows, {f['format']} format -> {f['id']}")
        job = c.request(
            "POST",
            "/fine_tuning/jobs",
            json={
                "model": str(model_dir),
                "training_file": f["id"],
                "suffix": "demo",
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": DEMO_HYPERPARAMETERS},
                },
            },
        )
        print(f"created job {job['id']} (watch it at {url}/dashboard/#/jobs/{job['id']})")
        job = _follow(c, job["id"])
        if job["status"] != "succeeded":
            print(f"job {job['status']}: {json.dumps(job.get('error'))}")
            return 1
        print(f"job succeeded: {job['fine_tuned_model']} ({job['trained_tokens']} tokens)")
        _, ckpt = c.checkpoint_of(job["id"])
        path = c.download(job["id"], ckpt, data / "downloads")
        print(f"downloaded checkpoint {ckpt['id']} (step {ckpt['step_number']}) to {path}")
        prompts = _samples(demo)
        tuned_name = job["fine_tuned_model"]
        print(f"\nasking {model_dir.name} and {tuned_name} (client.chat.completions.create):")
        base, tuned = _ask(url, [model_dir.name, tuned_name], prompts)
        for prompt, b, t in zip(prompts, base, tuned, strict=True):
            print(f"\nuser:       {prompt[-1]['content']}\nbase:       {b!r}\nfine-tuned: {t!r}")
        return 0
    finally:
        if not keep_running:
            for proc in reversed(started):
                stack.stop(proc)
