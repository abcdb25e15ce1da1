"""Benchmark: what the service itself costs, against plain TRL scripts, in one run.

    python -m bench.service_overhead                  # ~4 min on 2 idle cores
    python -m bench.service_overhead --steps 40 --repeats 3 --keep /tmp/so
    python -m bench.service_overhead --plain-trainer trl   # only the stock-TRL baseline

The same SFT job (same model directory, data file, config, seed, threads) is
trained in rounds, each round running every variant once, service second
(plain-trl, service, plain-posttrain; then again), so slow drift hits all:

* ``service``: a throwaway ``redis-server`` on a free port (never the machine's
  Redis), the API (uvicorn) and one Celery worker, started by ``service.stack``
  with the environment ``tests/e2e/conftest.py`` uses, and left running for all
  rounds as in a deployment. The data is uploaded once (``POST /v1/files``); each
  round ``POST``s a supervised job with explicit hyperparameters (``n_epochs``,
  ``batch_size``, ``learning_rate``, ``max_steps``; ``seed``) and polls
  ``GET /v1/fine_tuning/jobs/{id}`` until it ends. ``POSTTRAIN_CHECKPOINT_EVERY_STEPS``
  is huge, so the only checkpoint is the one posttrain forces at the last step.
* ``plain-trl``: a subprocess running a self-contained script (written into the
  work dir; imports torch/transformers/trl/datasets, nothing from posttrain) with
  stock ``trl.SFTTrainer``. Its ``SFTConfig`` arguments are the ones posttrain's
  own code builds for this job (``trainers.runner.common_config`` + the SFT
  method's ``config_fields``), got by calling that code with the RunPlan the
  supervisor would write. Rows are formatted as ``trainers.algorithms.sft.method.record``
  does, threads set as the supervisor sets them (``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS``, ``TOKENIZERS_PARALLELISM=false``, then
  ``torch.set_num_threads``), work done in the trainer's order (tokenizer, rows,
  model, trainer), and the last step saved as posttrain's callback forces.
* ``plain-posttrain``: the same script with posttrain's ``PosttrainSFTTrainer``
  (its fused-kernel LM head), so the trainer is the service's and only the
  service path differs. ``plain-trl`` answers "service vs what a user would
  write"; ``plain-posttrain`` isolates the API/worker/supervisor/reporting cost.

Timing sources (wall-clock ``time.time()`` and Redis's clock, one machine):

* service per-step times: the ids of the job's ``metrics`` events in
  ``posttrain:job:{id}:events`` read from the bench's Redis. The supervisor
  ``XADD``s one per step (runs under 1000 steps) when it applies the trainer's
  ``log`` report line, with that step's metrics entry; an auto id's first part is
  Redis's clock in ms, so each id is the moment that step's report reached the
  record (the events' ``created_at`` is only whole seconds). A job that succeeds
  without one entry per step is reported as a failure naming what the events show.
  Start-up milestones come the same way from the events stream (``Fine-tuning job
  started`` = just before the supervisor spawns ``trainers.run``; ``Loaded N
  training rows``; ``Training for N steps`` = ``on_train_begin``) and from the
  record's ``created_at`` (API) and ``started_at`` (worker's claim).
* plain per-step times: a ``TrainerCallback`` records ``time.time()`` in
  ``on_log`` for each step's log (the moment the service's trainer writes its
  report line), plus milestones at script start, after imports, rows, model,
  ``on_train_begin``.

Reported:

* steady-state step time: median of per-step deltas without the first
  ``--skip`` (warm-up), pooled over the rounds; service / plain (target <= 1.03x).
  The 25th percentile is shown too: on a shared machine it is less inflated by
  other processes.
* start-up: service = ``POST`` sent -> step 1's metrics entry; plain = just
  before ``Popen`` -> step 1's ``on_log``; median over rounds; service - plain
  (target <= 2 s). Both include interpreter start, imports, model load and step
  1; the service adds the API, queue, claim, supervisor and its child process.
* total: ``POST`` -> the record's ``finished_at`` (the worker's end-state write,
  after the final checkpoint) vs ``Popen`` -> script exit; informational.
* ``runnable``: mean runnable tasks on the machine during a run (``/proc/loadavg``,
  sampled every 0.5 s). A run uses about ``--threads``; clearly more means other
  processes shared the cores and the run's times are inflated (flagged). Two
  torch threads on two cores slow down far more than the stolen share when a
  third process competes (OpenMP threads wait for the descheduled one), so
  before each run the bench waits up to ``--wait-quiet`` s for idle cores.

The stack's idle processes (API, worker, Redis) also run during the plain runs.
The model is Qwen2 with the tiny model's tokenizer (``trainers.tiny_model``, ids
< 663) and a random decoder of ``--hidden``/``--layers``/``--intermediate`` with
``--vocab`` rows of tied embeddings (default 28.6 M parameters; about 0.2-0.3 s a
step on 2 idle cores at batch 8 of ``trainers/assets/demo_sft.jsonl``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = resources.files("trainers") / "assets" / "demo_sft.jsonl"
HUGE = 1_000_000_000  # checkpoint interval: only the forced save at the last step happens
PREFIX = "posttrain:"  # WorkerSettings.key_prefix default
SEED = 7

# --------------------------------------------------------------------------- plain script
# Written to the work dir and run as ``python plain_sft.py CONFIG.json`` with cwd = the
# work dir, so it imports nothing from posttrain unless --plain-trainer posttrain says so.
PLAIN_SCRIPT = textwrap.dedent(
    """
    import time
    T_START = time.time()
    import json, os, sys

    cfg = json.load(open(sys.argv[1]))
    marks = {"start": T_START}

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if cfg["trainer"] == "posttrain":
        sys.path.insert(0, cfg["repo"])
        from trainers.algorithms.sft.method import PosttrainSFTTrainer as Trainer
    else:
        Trainer = SFTTrainer
    torch.set_num_threads(cfg["threads"])
    marks["imports"] = time.time()

    # the order trainers.runner.run_method works in: tokenizer, rows, model, trainer
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ROLE = {"developer": "system"}

    def text(content):
        return content if isinstance(content, str) else "".join(p["text"] for p in content)

    rows = []
    with open(cfg["data"]) as fh:
        for line in fh:
            if line.strip():
                msgs = json.loads(line)["messages"]
                rows.append({"messages": [
                    {"role": ROLE.get(m["role"], m["role"]), "content": text(m["content"])}
                    for m in msgs
                ]})
    train_ds = Dataset.from_list(rows)
    marks["data"] = time.time()
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    marks["model"] = time.time()


    class Timer(TrainerCallback):
        def __init__(self):
            self.step_end, self.log = [], []

        def on_train_begin(self, args, state, control, **kw):
            marks["train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.step_end.append([state.global_step, time.time()])
            if state.global_step >= state.max_steps:
                control.should_save = True  # as posttrain's ReportingCallback does

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # a step's log (the closing summary has train_loss)
                self.log.append([state.global_step, time.time()])


    timer = Timer()
    trainer = Trainer(
        model=model,
        args=SFTConfig(**cfg["sft_config"]),
        train_dataset=train_ds,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    marks["end"] = time.time()
    print("BENCH_RESULT " + json.dumps({
        "marks": marks, "step_end": timer.step_end, "log": timer.log,
        "threads": torch.get_num_threads(), "steps": trainer.state.global_step,
    }), flush=True)
    """
).lstrip()


# --------------------------------------------------------------------------- setup
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(out: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """Tiny tokenizer + a bigger random Qwen2 decoder; returns the parameter count."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from trainers.tiny_model import build_tokenizer, tiny_config

    tok = build_tokenizer()
    config = tiny_config(tok, hidden, layers)
    if vocab < len(tok):
        raise SystemExit(f"--vocab must be >= the tokenizer's {len(tok)} ids")
    config.vocab_size, config.intermediate_size = vocab, intermediate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def job_body(model_dir: Path, file_id: str, a: argparse.Namespace, rows: int) -> dict:
    epochs = max(1, -(-a.steps * a.batch_size // rows))
    hp = {
        "n_epochs": epochs,
        "batch_size": a.batch_size,
        "learning_rate": a.lr,
        "max_steps": a.steps,
    }
    return {
        "model": str(model_dir),
        "training_file": file_id,
        "seed": SEED,
        "suffix": "bench",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }


def posttrain_sft_kwargs(body: dict, data: Path, work: Path, threads: int) -> dict:
    """The config arguments posttrain's trainer process builds for this job, from its own
    code (the RunPlan the supervisor would write, the method's own definition)."""
    from trainers.contract.plan import RunPlan
    from trainers.contract.spec import JobSpec
    from trainers.registry import resolve
    from trainers.runner import common_config, read_data

    spec = JobSpec.model_validate(body)
    plan = RunPlan(
        job_id="config-check",
        spec=spec,
        training_path=data,
        output_dir=work / "config-check",
        data_dir=work,
        checkpoint_every_steps=HUGE,
        threads=threads,
    )
    hp = spec.method_hyperparameters()
    method = resolve(spec.method_type)
    tdata = read_data(method, plan)
    kwargs = {**common_config(plan, hp, tdata), **method.config_fields(plan, hp, tdata)}
    kwargs = {k: (v.value if hasattr(v, "value") else v) for k, v in kwargs.items()}
    json.dumps(kwargs)  # must travel to the plain script as JSON
    return kwargs


# --------------------------------------------------------------------------- runs
class Runnable:
    """Samples the machine's runnable task count (``/proc/loadavg``) during a run.

    A run with ``--threads N`` keeps about N tasks runnable; clearly more means
    other processes competed for the cores and that run's times are inflated.
    """

    def __init__(self, every: float = 0.5):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.samples.append(runnable_now())
            except OSError:
                return

    def __enter__(self) -> Runnable:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else float("nan")


def runnable_now() -> int:
    """Runnable tasks on the machine, not counting the caller."""
    with open("/proc/loadavg") as fh:
        return int(fh.read().split()[3].split("/")[0]) - 1


def wait_quiet(limit: float, need: float = 2.0) -> float:
    """Wait (at most ``limit`` s) until at most one other task has been runnable for
    ``need`` s, so a run does not start on top of someone else's; return the wait."""
    t0 = quiet_since = time.monotonic()
    while time.monotonic() - t0 < limit:
        if runnable_now() > 1:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= need:
            break
        time.sleep(0.25)
    return time.monotonic() - t0


def service_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each root process and its descendants,
    leaving out training processes (``trainers.run``): the service's own share."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if b"trainers.run" in (d / "cmdline").read_bytes():
                continue
        except OSError:
            continue
        pid = int(d.name)
        parent[pid], cpu[pid] = int(rest[1]), (int(rest[11]) + int(rest[12])) / tick
    out = {}
    for name, root in roots.items():
        total = 0.0
        for pid in cpu:
            p = pid
            while p not in (root, 0, 1) and p in parent:
                p = parent[p]
            if p == root:
                total += cpu[pid]
        out[name] = total
    return out


def run_plain(
    work: Path, idx: int, trainer: str, model_dir: Path, data: Path, kwargs: dict, a
) -> dict:
    script = work / "plain_sft.py"
    script.write_text(PLAIN_SCRIPT)
    out = work / f"plain-{trainer}-{idx}"
    cfg = {
        "model": str(model_dir),
        "data": str(data),
        "threads": a.threads,
        "trainer": trainer,
        "repo": str(REPO),
        "sft_config": {**kwargs, "output_dir": str(out / "output")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    log = out / "train.log"
    t0 = time.time()
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(script), str(out / "config.json")],
            cwd=out,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=a.timeout,
        )
    t_exit = time.time()
    lines = [
        x for x in log.read_text(errors="replace").splitlines() if x.startswith("BENCH_RESULT ")
    ]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"plain run exited {proc.returncode}; {log}:\n{tail}")
    res = json.loads(lines[-1].split(" ", 1)[1])
    m = res["marks"]
    steps = [t for _, t in sorted(res["log"])]
    return {
        "variant": f"plain-{trainer}",
        "steps": steps,
        "first": steps[0] - t0,
        "total": t_exit - t0,
        "milestones": {
            "python started": m["start"] - t0,
            "imports done": m["imports"] - t0,
            "rows loaded": m["data"] - t0,
            "model loaded": m["model"] - t0,
            "train begin": m["train_begin"] - t0,
            "step 1 logged": steps[0] - t0,
        },
        "threads": res["threads"],
        "step_end_first": res["step_end"][0][1] - t0,
    }


def _stream_ms(entry_id: str) -> float:
    return int(entry_id.split("-")[0]) / 1000.0


def run_service(http, r, base: str, body: dict, a, roots: dict[str, int]) -> dict:
    cpu0 = service_cpu(roots)
    t0 = time.time()
    resp = http.post(f"{base}/v1/fine_tuning/jobs", json=body)
    resp.raise_for_status()
    job_id = resp.json()["id"]
    deadline = t0 + a.timeout
    while True:
        job = http.get(f"{base}/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            t_end = time.time()
            cpu1 = service_cpu(roots)
            break
        if time.time() > deadline:
            raise RuntimeError(f"service job {job_id} still {job['status']} after {a.timeout} s")
        time.sleep(a.poll)
    key = f"{PREFIX}job:{job_id}"
    if job["status"] != "succeeded":
        events = [f["message"] for _, f in r.xrange(f"{key}:events")]
        raise RuntimeError(f"service job {job_id} {job['status']}: {job.get('error')}; {events}")
    # the step's ``metrics`` event is added with its metrics entry (whose id is the step,
    # not a time); runs under 1000 steps get one per step (workers.ingest.METRIC_EVENTS)
    metrics = [(i, json.loads(f["data"] or "null")) for i, f in r.xrange(f"{key}:events")]
    by_step = {d["step"]: _stream_ms(i) for i, d in metrics if d and "total_steps" in d}
    if sorted(by_step) != list(range(1, a.steps + 1)):
        msgs = [f["message"] for _, f in r.xrange(f"{key}:events")]
        seen = list(dict.fromkeys(m.split(" in ")[0] for m in msgs))
        raise RuntimeError(
            f"service job {job_id} succeeded but its metrics stream holds {len(by_step)} "
            f"entries for {a.steps} steps (steps {sorted(by_step)[:5]}...), so there are no "
            f"per-step times; {len(msgs)} events, distinct: {seen[:8]}; trainer log: "
            f"{Path(a._data_dir) / 'jobs' / job_id / 'train.log'}"
        )
    steps = [by_step[s] for s in sorted(by_step)]
    rec = r.hgetall(key)
    events = [(_stream_ms(i), f["message"]) for i, f in r.xrange(f"{key}:events")]

    def ev(prefix: str) -> float | None:
        hit = next((t for t, msg in events if msg.startswith(prefix)), None)
        return None if hit is None else hit - t0

    return {
        "variant": "service",
        "job": job_id,
        "steps": steps,
        "first": steps[0] - t0,
        "total": float(rec["finished_at"]) - t0,  # the worker's end-state write
        "seen_done": t_end - t0,
        "milestones": {
            "job record created (API)": float(rec["created_at"]) - t0,
            "claimed by worker": float(rec["started_at"]) - t0,
            "trainer spawned": ev("Fine-tuning job"),
            "rows loaded": ev("Loaded "),
            "train begin": ev("Training for"),
            "step 1 logged": steps[0] - t0,
        },
        "service_cpu": {k: cpu1[k] - cpu0[k] for k in roots},
    }


def steady(steps: list[float], skip: int) -> list[float]:
    deltas = [b - a for a, b in itertools.pairwise(steps)]
    return deltas[skip:]


# --------------------------------------------------------------------------- report
def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def report(runs: list[dict], a, params: int) -> None:
    print(
        f"\nmodel: Qwen2 hidden {a.hidden}, {a.layers} layers, intermediate {a.intermediate}, "
        f"vocab {a.vocab} ({params / 1e6:.1f} M params); batch {a.batch_size}, "
        f"{a.steps} steps, {a.threads} threads"
    )
    print("plain SFTConfig: posttrain's own (trainers.runner.common_config + config_fields)")
    print(
        "plain-trl = stock trl.SFTTrainer; plain-posttrain = posttrain's PosttrainSFTTrainer "
        "(same loss path as the service)"
    )
    print(f"\nper run (step deltas from step {a.skip + 1}->{a.skip + 2} on; ms):")
    print(
        f"{'run':<19} {'median':>7} {'p25':>7} {'mean':>7} {'min':>7} {'max':>7} "
        f"{'start->step1':>12} {'total':>7} {'runnable':>8}"
    )
    for run in runs:
        d = steady(run["steps"], a.skip)
        print(
            f"{run['variant'] + ' #' + str(run['repeat']):<19} "
            f"{statistics.median(d) * 1e3:>7.1f} {_q(d, 0.25) * 1e3:>7.1f} "
            f"{statistics.mean(d) * 1e3:>7.1f} {min(d) * 1e3:>7.1f} {max(d) * 1e3:>7.1f} "
            f"{run['first']:>11.2f}s {run['total']:>6.1f}s {run['runnable']:>8.1f}"
        )
    busy = [r for r in runs if r["runnable"] > a.threads + 0.5]
    if busy:
        print(
            f"  note: {len(busy)} of {len(runs)} runs averaged > {a.threads + 0.5} runnable "
            "tasks: other processes shared the cores, so those runs' times are inflated"
        )

    print("\nstart-up milestones, s after POST (service) / Popen (plain):")
    for run in runs:
        ms = "  ".join(f"{k} {v:.2f}" for k, v in run["milestones"].items() if v is not None)
        print(f"  {run['variant'] + ' #' + str(run['repeat']):<19} {ms}")

    print(
        "\nservice processes' own CPU time during each job (API incl. the bench's polls, "
        "worker incl. its supervisor, Redis; training process excluded):"
    )
    for run in runs:
        if run["variant"] == "service":
            used = run["service_cpu"]
            per_step = sum(used.values()) / len(run["steps"]) * 1e3
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in used.items())
            print(
                f"  service #{run['repeat']}: {parts}; {per_step:.2f} ms CPU per step "
                "(start-up included) "
                f"({per_step / (statistics.median(steady(run['steps'], a.skip)) * 1e3):.1%} "
                "of a step's wall time on one core)"
            )

    names = list(dict.fromkeys(r["variant"] for r in runs))
    var = {v: [r for r in runs if r["variant"] == v] for v in names}
    pooled = {v: [d for r in rs for d in steady(r["steps"], a.skip)] for v, rs in var.items()}
    med = {v: statistics.median(d) for v, d in pooled.items()}
    p25 = {v: _q(d, 0.25) for v, d in pooled.items()}
    first = {v: statistics.median([r["first"] for r in rs]) for v, rs in var.items()}
    total = {v: statistics.median([r["total"] for r in rs]) for v, rs in var.items()}
    plains = [v for v in names if v != "service"]

    def ok(good: bool) -> str:
        return "ok" if good else "MISSED"

    counts = ", ".join(f"{len(rs)} {v}" for v, rs in var.items())
    print(f"\nsummary ({counts} runs; step times pooled over runs, start-up medians over runs):")
    head = "".join(f"{v:>16}" for v in names)
    print(f"{'':<28}{head}   service vs plain (target)")
    row = "".join(f"{med[v] * 1e3:>14.1f}ms" for v in names)
    cmp = ", ".join(
        f"{med['service'] / med[v]:.3f}x vs {v} {ok(med['service'] / med[v] <= 1.03)}"
        for v in plains
    )
    print(f"{'steady step, median':<28}{row}   {cmp} (<= 1.03x)")
    row = "".join(f"{p25[v] * 1e3:>14.1f}ms" for v in names)
    cmp = ", ".join(f"{p25['service'] / p25[v]:.3f}x vs {v}" for v in plains)
    print(f"{'steady step, 25th pct':<28}{row}   {cmp} (less contention-prone)")
    row = "".join(f"{first[v]:>15.2f}s" for v in names)
    cmp = ", ".join(
        f"{first['service'] - first[v]:+.2f} s vs {v} {ok(first['service'] - first[v] <= 2.0)}"
        for v in plains
    )
    print(f"{'start -> step 1 logged':<28}{row}   {cmp} (<= 2 s)")
    row = "".join(f"{total[v]:>15.2f}s" for v in names)
    cmp = ", ".join(f"{total['service'] - total[v]:+.2f} s vs {v}" for v in plains)
    print(f"{'start -> done (incl. save)':<28}{row}   {cmp}")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.service_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32768, help="vocab_size in the model config")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both variants")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every variant (default 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--skip", type=int, default=5, help="warm-up step deltas left out (default 5)")
    p.add_argument("--poll", type=float, default=2.0, help="job status poll interval, s")
    p.add_argument(
        "--plain-trainer",
        type=lambda x: [t for t in x.split(",") if t],
        default=["trl", "posttrain"],
        help="comma list of plain variants, default trl,posttrain: trl = stock SFTTrainer, "
        "posttrain = PosttrainSFTTrainer (the service's loss path, so only the service differs)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        help="before each run, wait up to this many s for the cores to be idle (default 60)",
    )
    p.add_argument("--data", type=Path, default=None, help="chat JSONL (default: demo_sft.jsonl)")
    p.add_argument("--timeout", type=float, default=900, help="per run, s")
    p.add_argument("--keep", type=Path, default=None, help="work dir to keep (default: a temp dir)")
    a = p.parse_args(argv)
    if not a.plain_trainer or set(a.plain_trainer) - {"trl", "posttrain"}:
        p.error("--plain-trainer takes trl, posttrain or trl,posttrain")
    if a.steps < a.skip + 3:
        p.error(f"--steps must be at least --skip + 3 = {a.skip + 3}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import httpx
    import redis

    from service import stack

    t_bench = time.time()
    work = a.keep or Path(tempfile.mkdtemp(prefix="posttrain-bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    data = Path(a.data).resolve() if a.data else Path(str(DEMO))
    rows = sum(1 for line in data.read_text().splitlines() if line.strip())
    model_dir = work / "model"
    params = build_model(model_dir, a.hidden, a.layers, a.intermediate, a.vocab)
    print(
        f"work dir {work}; model {params / 1e6:.1f} M params; data {data} ({rows} rows)", flush=True
    )

    # Our own Redis on a free port: never the machine's.
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    redis_proc = stack.start_redis(redis_url, work / "redis.log")
    if redis_proc is None:
        raise SystemExit(f"something already answers at {redis_url}; refusing to use it")
    a._data_dir = str(work / "data")
    env = {
        **os.environ,
        "POSTTRAIN_REDIS_URL": redis_url,
        "POSTTRAIN_DATA_DIR": a._data_dir,
        "POSTTRAIN_MODEL_ROOTS": str(work),  # the model dir; jobs/ under data stays private
        "POSTTRAIN_QUEUE": f"posttrain.bench.{os.getpid()}",
        "POSTTRAIN_CHECKPOINT_EVERY_STEPS": str(HUGE),
        "POSTTRAIN_TRAIN_THREADS": str(a.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api = worker = None
    runs: list[dict] = []
    failed = False
    try:
        api = stack.start_api(env, port, work / "api.log")
        worker = stack.start_worker(env, work / "worker.log", name="bench")
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        roots = {"API": api.pid, "worker": worker.pid, "Redis": redis_proc.pid}
        with httpx.Client(timeout=60) as http:
            with open(data, "rb") as fh:
                up = http.post(
                    f"{base}/v1/files",
                    files={"file": (data.name, fh, "application/jsonl")},
                    data={"purpose": "fine-tune"},
                )
            up.raise_for_status()
            file_id = up.json()["id"]
            body = job_body(model_dir, file_id, a, rows)
            kwargs = posttrain_sft_kwargs(body, data, work, a.threads)
            print(f"stack up in {time.time() - t_bench:.1f} s (API {base}, Redis {redis_url})")
            order = [f"plain-{t}" for t in a.plain_trainer]
            order.insert(1, "service")  # plain, service, plain ...: drift hits both
            for i in range(a.repeats):
                for variant in order:
                    waited = wait_quiet(a.wait_quiet)
                    try:
                        with Runnable() as busy:
                            if variant == "service":
                                res = run_service(http, r, base, body, a, roots)
                            else:
                                trainer = variant.split("-", 1)[1]
                                res = run_plain(work, i, trainer, model_dir, data, kwargs, a)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"  {variant} #{i + 1}: FAILED: {exc}", flush=True)
                        failed = True
                        break
                    res["runnable"], res["repeat"], res["waited"] = busy.mean(), i + 1, waited
                    runs.append(res)
                    print(
                        f"  {variant} #{i + 1}: step 1 at {res['first']:.2f} s, total "
                        f"{res['total']:.1f} s, {len(res['steps'])} steps, "
                        f"runnable tasks {res['runnable']:.1f}, waited {waited:.0f} s for "
                        f"quiet cores {res.get('job', '')}",
                        flush=True,
                    )
                if failed:
                    break
    finally:
        stack.stop(worker)
        stack.stop(api)
        if redis_proc.poll() is None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    kinds = {r["variant"] for r in runs}
    if "service" in kinds and len(kinds) > 1:
        report(runs, a, params)
    else:
        print("\nno report: the bench needs at least one finished run of each variant")
    print(
        f"\nbench wall time {time.time() - t_bench:.0f} s; work dir "
        f"{work if a.keep else '(temporary, removed)'}"
    )
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
