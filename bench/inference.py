"""Benchmark: chat completions through posttrain against the engine alone, on CPU.

    python -m bench.inference                     # ~3-4 min on 2 cores
    python -m bench.inference --quick             # ~1.5 min: 3 rounds, 64 tokens
    python -m bench.inference --out inference.json --keep /tmp/bench-inference

Two random Qwen2 chat models built offline (``trainers.tiny_model``: ``tiny``, hidden 64
x 2 layers; ``wide``, hidden 512 x 4 layers), served these ways in one run, all with the
same environment (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, default 1,
``TOKENIZERS_PARALLELISM=false``, offline) on a throwaway ``redis-server`` (never the
machine's Redis):

* ``generate``: a self-contained script in a subprocess (torch + transformers only) that
  loads each model once and, per command on its stdin, applies the chat template, runs
  ``model.generate`` with the model's generation config (greedy, ``max_new_tokens``) and
  decodes; its own clock covers template to decode: the engine alone;
* ``serve``: a plain ``transformers serve --device cpu --host 127.0.0.1 --port P
  --model-timeout 300`` (posttrain's flags), called on ``/v1/chat/completions`` with the
  model's directory;
* ``posttrain``: the API (``service.stack.start_api``) and one ``posttrain inference
  --device cpu`` worker (its own ``transformers serve`` behind its front), called on the
  API's ``/v1/chat/completions`` with ``model="tiny"``/``"wide"`` and the API key;
* ``front``: the worker's front called directly with the model header the API would
  send, which splits posttrain's cost between the front and the API.

Every request is greedy (``temperature: 0``) with the same ``max_tokens``. The prompt is
one the ``generate`` arm finds running to ``max_tokens`` without an end-of-turn token
(a random model rarely stops, and greedy decoding makes every arm produce the same
tokens), so every arm generates the same count: ``usage.completion_tokens`` (or the
generated ids) of every request is checked against it, and all arms' texts against each
other. httpx (one kept-alive connection per server) is the client of every HTTP arm;
the ``openai`` SDK is used once, as a smoke check.

Sections, per model:

1. throughput: ``--rounds`` rounds, each running every arm once (generate, serve,
   posttrain, serve-stream, front-stream, posttrain-stream) in an order rotated per
   round, so drift and other processes hit all arms alike; tokens/s of a request = its
   generated tokens / its wall time at the client. The table gives each arm's median
   and its ratio to ``generate`` and to ``serve`` (``serve-stream`` for streams) as the
   median (and IQR) of the per-round ratios; target >= 0.9;
2. added latency: ``--latency-n`` short requests (``max_tokens: 1``) per arm after a
   warm-up, serve / front / posttrain interleaved; p50 and p99 of each, and posttrain's
   minus serve's (target: p50 <= 10 ms);
3. concurrency: ``--conc-rounds`` rounds of ``--clients`` streaming clients at once
   (asyncio + httpx) through posttrain, and through the plain serve for reference
   (order alternating per round), each after two 1-client streams; every client must
   end with a final chunk (``finish_reason``; posttrain's with ``data: [DONE]`` too) and
   the full token count; median aggregate tokens/s vs 1 client.

The CPU time (``/proc/<pid>/stat``) the API, the front and each engine used is read
around every request, so the tables say where posttrain's extra time goes. The worker's
registry entry is watched as the API reads it (gaps between heartbeats, moments it had
expired), and a 503 is noted and retried, then reported, rather than ending the run.
The machine's runnable task count is sampled throughout: other processes on the cores
inflate all arms, which the interleaving spreads evenly but cannot remove. ``--out``
writes every sample and the summary as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from service.stack import stop as stop_proc  # TERM to the process group, then KILL

THROUGHPUT_ARMS = (
    "generate",
    "serve",
    "posttrain",
    "serve-stream",
    "front-stream",
    "posttrain-stream",
)
PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Write a poem about the sea.",
    "What should I cook for dinner tonight?",
    "List some facts about the moon.",
    "Describe your favourite city.",
]

# The plain-transformers arm: nothing of posttrain, one model load per directory.
GEN_SCRIPT = r'''
"""Plain transformers: chat template + model.generate, one JSON command per stdin line."""
import copy, json, sys, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

models = {}


def get(path):
    if path not in models:
        tok = AutoTokenizer.from_pretrained(path)
        models[path] = (tok, AutoModelForCausalLM.from_pretrained(path).eval())
    return models[path]


def generate(path, prompt, max_tokens):
    tok, model = get(path)
    t0 = time.perf_counter()
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens, config.do_sample = max_tokens, False
    out = model.generate(**inputs, generation_config=config)
    new = out[0, inputs["input_ids"].shape[-1]:]
    text = tok.decode(new, skip_special_tokens=True)
    return {
        "seconds": time.perf_counter() - t0,
        "tokens": int(new.shape[-1]),
        "prompt_tokens": int(inputs["input_ids"].shape[-1]),
        "text": text,
    }


def say(obj):
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


say({"ready": True, "threads": torch.get_num_threads()})
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "load":
            t0 = time.perf_counter()
            get(cmd["path"])
            say({"load_s": time.perf_counter() - t0})
        else:
            say(generate(cmd["path"], cmd["prompt"], cmd["max_tokens"]))
    except Exception as exc:
        say({"error": repr(exc)})
'''


class BenchError(RuntimeError):
    pass


class Unavailable(BenchError):
    """A 503 (e.g. the API found no live inference worker): recorded, then retried."""


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of one process (all its threads), 0 once it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def q(values: list[float], p: float) -> float:
    """The p-quantile (0..1), linear between order statistics."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Runnable:
    """Samples the machine's runnable task count (``/proc/loadavg``) every 0.5 s."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            with open("/proc/loadavg") as fh:
                self.samples.append(int(fh.read().split()[3].split("/")[0]) - 1)

    def __enter__(self) -> Runnable:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> int:
        return len(self.samples)

    def mean_since(self, mark: int) -> float:
        got = self.samples[mark:]
        return statistics.mean(got) if got else float("nan")


def wait_for(ready, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} while starting")
        if ready():
            return
        time.sleep(0.2)
    raise BenchError(f"{what} did not become ready within {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Heartbeats:
    """Watches the worker's registry entry as the API reads it: the gaps between its
    rewrites (exact, from the expiry each rewrite sets) and the moments it had expired."""

    def __init__(self, url: str, key: str):
        import redis

        self.r, self.key = redis.Redis.from_url(url, decode_responses=True), key
        self.gaps: list[float] = []
        self.expired_at: list[float] = []
        self.t0 = time.time()
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import redis

        while not self._stop.wait(0.25):
            try:
                sec, usec = self.r.time()
                raw = self.r.hgetall(self.key)
            except redis.RedisError:
                continue
            now = sec + usec / 1e6
            exps = [json.loads(v).get("expires_at", 0) for v in raw.values()]
            if not exps or max(exps) <= now:
                self.expired_at.append(round(time.time() - self.t0, 2))
            if exps:
                exp = max(exps)
                if self._last is not None and exp != self._last:
                    self.gaps.append(exp - self._last)
                self._last = exp

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {
            "beats": len(self.gaps) + 1,
            "max_gap_s": max(self.gaps, default=0.0),
            "gaps_over_4s": [round(g, 2) for g in self.gaps if g > 4],
            "expired_at_s": self.expired_at,
        }


# --------------------------------------------------------------------------- the arms
class GenerateChild:
    """The plain ``generate`` script in a subprocess, driven over its stdin/stdout."""

    def __init__(self, work: Path, env: dict[str, str]):
        script = work / "plain_generate.py"
        script.write_text(GEN_SCRIPT)
        self.log = open(work / "generate.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        self.info: dict | None = None

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"the generate script exited ({self.proc.poll()}); see its log")
            if line.startswith("@@ "):
                return json.loads(line[3:])

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._read()
        return self.info

    def call(self, **cmd: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise BenchError(f"generate script: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_proc(self.proc)
        self.log.close()


class Target:
    """One HTTP way to a model: URL, the body's ``model``, headers."""

    def __init__(self, arm: str, url: str, model: str, headers: dict[str, str], done: bool):
        self.arm, self.url, self.model, self.headers = arm, url, model, headers
        self.sends_done = done  # posttrain ends every stream with data: [DONE]

    def body(self, prompt: str, max_tokens: int, stream: bool) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if stream:
            body["stream"] = True
            if self.sends_done:  # plain serve refuses stream_options
                body["stream_options"] = {"include_usage": True}
        return body


def call(http: httpx.Client, t: Target, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = http.post(t.url, json=t.body(prompt, max_tokens, False), headers=t.headers)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        kind = Unavailable if r.status_code == 503 else BenchError
        raise kind(f"{t.arm}: HTTP {r.status_code}: {r.text[:300]}")
    data = r.json()
    return {
        "seconds": seconds,
        "tokens": int(data["usage"]["completion_tokens"]),
        "prompt_tokens": int(data["usage"]["prompt_tokens"]),
        "text": data["choices"][0]["message"].get("content") or "",
        "finish_reason": data["choices"][0].get("finish_reason"),
    }


class _Stream:
    """What one streamed answer carried, fed its SSE lines."""

    def __init__(self, arm: str, t0: float):
        self.arm, self.t0 = arm, t0
        self.first: float | None = None
        self.tokens: int | None = None
        self.finish: str | None = None
        self.done = False
        self.parts: list[str] = []

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            raise BenchError(f"{self.arm}: stream error {event['error']}")
        if event.get("usage"):
            self.tokens = int(event["usage"]["completion_tokens"])
        for c in event.get("choices") or []:
            text = (c.get("delta") or {}).get("content")
            if text:
                if self.first is None:
                    self.first = time.perf_counter()
                self.parts.append(text)
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]

    def result(self, sends_done: bool) -> dict:
        end = time.perf_counter()
        return {
            "seconds": end - self.t0,
            "ttft": (self.first or end) - self.t0,
            "tokens": self.tokens,
            "text": "".join(self.parts),
            "finish_reason": self.finish,
            "complete": self.finish is not None and (self.done or not sends_done),
            "start": self.t0,
            "end": end,
        }


def stream(http: httpx.Client, t: Target, prompt: str, max_tokens: int) -> dict:
    s = _Stream(t.arm, time.perf_counter())
    with http.stream("POST", t.url, json=t.body(prompt, max_tokens, True), headers=t.headers) as r:
        if r.status_code != 200:
            kind = Unavailable if r.status_code == 503 else BenchError
            raise kind(f"{t.arm}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            s.feed(line)
    return s.result(t.sends_done)


async def _astream(http: httpx.AsyncClient, t: Target, prompt: str, max_tokens: int) -> dict:
    s = _Stream(t.arm, time.perf_counter())
    try:
        async with http.stream(
            "POST", t.url, json=t.body(prompt, max_tokens, True), headers=t.headers
        ) as r:
            if r.status_code != 200:
                raise BenchError(f"{t.arm}: HTTP {r.status_code}")
            async for line in r.aiter_lines():
                s.feed(line)
    except (httpx.HTTPError, BenchError) as exc:
        out = s.result(t.sends_done)
        out["complete"], out["error"] = False, repr(exc)
        return out
    return s.result(t.sends_done)


def concurrent(t: Target, prompt: str, max_tokens: int, clients: int) -> list[dict]:
    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients)
        timeout = httpx.Timeout(600.0, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            return await asyncio.gather(
                *(_astream(http, t, prompt, max_tokens) for _ in range(clients))
            )

    return asyncio.run(run())


# --------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, a: argparse.Namespace, work: Path):
        self.a, self.work = a, work
        self.samples: list[dict] = []  # every timed request
        self.pids: dict[str, int | None] = {}
        self.notes: list[str] = []
        self.http: httpx.Client | None = None
        self.child: GenerateChild | None = None
        self.unavailable: list[dict] = []  # 503s met (and retried)
        self.t0 = time.time()

    # ---- CPU accounting around one request
    def cpu(self) -> dict[str, float]:
        out = {name: cpu_s(pid) for name, pid in self.pids.items()}
        out["client"] = time.process_time()
        return out

    def retry(self, fn, section: str, model: str) -> tuple[dict, dict, dict]:
        """``fn()`` with the CPU counters before and after; a 503 is noted and retried
        (for 20 s), so one lapse does not end the run but is reported."""
        for attempt in range(40):
            before = self.cpu()
            try:
                res = fn()
            except Unavailable as exc:
                at = round(time.time() - self.t0, 2)
                self.unavailable.append(
                    {"at_s": at, "section": section, "model": model, "error": str(exc)[:200]}
                )
                if attempt == 39:
                    raise
                time.sleep(0.5)
                continue
            return res, before, self.cpu()
        raise AssertionError("unreachable")

    def record(self, section: str, model: str, arm: str, fn, **extra: Any) -> dict:
        res, before, after = self.retry(fn, section, model)
        res = {k: v for k, v in res.items() if k not in ("start", "end")}
        res.update(section=section, model=model, arm=arm, **extra)
        res["cpu"] = {k: after[k] - before[k] for k in after}
        self.samples.append(res)
        return res

    def arms(self, m: dict) -> dict[str, Any]:
        n, h = m["max_tokens"], self.http
        return {
            "generate": lambda: self.child.call(
                op="gen", path=m["path"], prompt=m["prompt"], max_tokens=n
            ),
            "serve": lambda: call(h, m["serve"], m["prompt"], n),
            "posttrain": lambda: call(h, m["posttrain"], m["prompt"], n),
            "serve-stream": lambda: stream(h, m["serve"], m["prompt"], n),
            "front-stream": lambda: stream(h, m["front"], m["prompt"], n),
            "posttrain-stream": lambda: stream(h, m["posttrain"], m["prompt"], n),
        }

    def throughput(self, m: dict) -> None:
        arms = self.arms(m)
        names = [k for k in arms if not (self.a.no_stream and k.endswith("-stream"))]
        for i in range(self.a.rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            for arm in order:
                self.record("throughput", m["name"], arm, arms[arm], round=i + 1)

    def latency(self, m: dict) -> None:
        short = {
            "serve": lambda: call(self.http, m["serve"], m["prompt"], 1),
            "front": lambda: call(self.http, m["front"], m["prompt"], 1),
            "posttrain": lambda: call(self.http, m["posttrain"], m["prompt"], 1),
        }
        names = list(short)
        for _ in range(self.a.latency_warmup):
            for fn in short.values():
                self.retry(fn, "latency-warmup", m["name"])
        for i in range(self.a.latency_n):
            order = names[i % len(names) :] + names[: i % len(names)]
            for arm in order:
                self.record("latency", m["name"], arm, short[arm], round=i + 1)

    def concurrency(self, m: dict) -> None:
        n = m["max_tokens"]
        for i in range(self.a.conc_rounds):
            for arm in ("posttrain", "serve") if i % 2 == 0 else ("serve", "posttrain"):
                t = m[arm]
                for _ in range(2):
                    self.record(
                        "concurrency",
                        m["name"],
                        arm,
                        lambda t=t: stream(self.http, t, m["prompt"], n),
                        clients=1,
                        round=i + 1,
                    )
                before = self.cpu()
                results = concurrent(t, m["prompt"], n, self.a.clients)
                after = self.cpu()
                first = min(r["start"] for r in results)
                last = max(r["end"] for r in results)
                self.samples.append(
                    {
                        "section": "concurrency",
                        "model": m["name"],
                        "arm": arm,
                        "clients": self.a.clients,
                        "round": i + 1,
                        "seconds": last - first,
                        "tokens": sum(r["tokens"] or 0 for r in results),
                        "complete": sum(bool(r["complete"]) for r in results),
                        "full": sum(r["tokens"] == n for r in results),
                        "ttft": [r["ttft"] for r in results],
                        "per_client_s": [r["seconds"] for r in results],
                        "errors": [r["error"] for r in results if "error" in r],
                        "texts_match": len({r["text"] for r in results}) == 1,
                        "cpu": {k: after[k] - before[k] for k in after},
                    }
                )


def build_models(root: Path, a: argparse.Namespace) -> dict[str, dict]:
    from trainers.tiny_model import build_tiny_model

    sizes = {"tiny": (64, 2), "wide": (a.wide_hidden, a.wide_layers)}
    out = {}
    for name in a.models:
        hidden, layers = sizes[name]
        path = build_tiny_model(root / name, hidden_size=hidden, num_layers=layers)
        out[name] = {"name": name, "path": str(path.resolve()), "hidden": hidden, "layers": layers}
    return out


def start_serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    argv += ["--model-timeout", "300"]
    return subprocess.Popen(
        argv,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_inference(env: dict[str, str], log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("posttrain")
    argv = [str(exe), "inference", "--device", "cpu"] if exe.exists() else None
    if argv is None:
        argv = [sys.executable, "-m", "service.cli", "inference", "--device", "cpu"]
    return subprocess.Popen(
        argv,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def warm(http: httpx.Client, t: Target, prompt: str, max_tokens: int, notes: list) -> dict:
    """First requests load the model; a 503 (model loading) is noted and retried."""
    deadline = time.monotonic() + 180
    while True:
        r = http.post(t.url, json=t.body(prompt, max_tokens, False), headers=t.headers)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        if r.status_code != 503:
            raise BenchError(f"{t.arm}: HTTP {r.status_code}: {r.text[:300]}")
        notes.append({"section": "load", "arm": t.arm, "error": r.text[:200]})
        time.sleep(0.5)
    if r.status_code != 200:
        raise BenchError(f"{t.arm}: the model did not load: {r.text[:300]}")
    return r.json()


def pick_prompt(child: GenerateChild, m: dict, max_tokens: int) -> None:
    """The first prompt whose greedy answer runs to ``max_tokens`` (no early <|end|>)."""
    best = None
    for prompt in PROMPTS:
        out = child.call(op="gen", path=m["path"], prompt=prompt, max_tokens=max_tokens)
        if best is None or out["tokens"] > best[1]["tokens"]:
            best = (prompt, out)
        if out["tokens"] == max_tokens:
            break
    assert best is not None
    m["prompt"], m["max_tokens"] = best[0], best[1]["tokens"]
    m["prompt_tokens"] = best[1]["prompt_tokens"]


def sdk_check(base: str, key: str, name: str) -> str:
    """One request through the ``openai`` SDK, as a caller would send it."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    toks = answer.usage.completion_tokens if answer.usage else None
    return f"openai SDK: {answer.model!r}, {toks} tokens, finish {answer.choices[0].finish_reason}"


def run(a: argparse.Namespace, work: Path, started: float) -> dict:
    from service import stack

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    models = build_models(work / "models", a)
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    key = "sk-bench-" + secrets.token_hex(12)
    api_port, front_port, serve_port = free_port(), free_port(), free_port()
    queue = f"posttrain.bench-inference.{os.getpid()}"
    penv = {
        **env,
        "POSTTRAIN_REDIS_URL": redis_url,
        "POSTTRAIN_DATA_DIR": str(work / "data"),
        "POSTTRAIN_MODEL_ROOTS": str(work / "models"),
        "POSTTRAIN_API_KEYS": key,
        "POSTTRAIN_INFERENCE_PORT": str(front_port),
        "POSTTRAIN_INFERENCE_QUEUE": queue,
        "POSTTRAIN_INFERENCE_CACHE_DIR": str(work / "inference-cache"),
    }
    redis_proc = serve = worker = api = None
    child: GenerateChild | None = None
    watch: Heartbeats | None = None
    bench = Bench(a, work)
    try:
        redis_proc = stack.start_redis(redis_url, work / "redis.log")
        if redis_proc is None:
            raise BenchError(f"something already answers at {redis_url}; refusing to use it")
        # slowest first: they import torch while the API starts
        serve = start_serve(env, serve_port, work / "plain-serve.log")
        worker = start_inference(penv, work / "inference.log")
        child = GenerateChild(work, env)
        api = stack.start_api(penv, api_port, work / "api.log")
        serve_url = f"http://127.0.0.1:{serve_port}"
        wait_for(lambda: http_ok(serve_url + "/health"), 180, "transformers serve", serve)
        log = work / "inference.log"
        wait_for(lambda: "serving at" in log.read_text(errors="replace"), 180, "the worker", worker)
        info = child.ready()
        import redis as redis_lib

        r = redis_lib.Redis.from_url(redis_url, decode_responses=True)
        entries = r.hgetall(f"posttrain:inference:{queue}")
        if not entries:
            raise BenchError("the inference worker is not registered in Redis")
        entry = json.loads(next(iter(entries.values())))
        watch = Heartbeats(redis_url, f"posttrain:inference:{queue}").__enter__()
        bench.pids = {
            "api": api.pid,
            "front": worker.pid,
            "post-engine": (entry.get("engine_pids") or [None])[0],
            "serve-engine": serve.pid,
            "generate": child.proc.pid,
        }
        print(
            f"stack up in {time.time() - started:.1f} s: API :{api_port}, worker front "
            f"{entry['url']}, plain serve :{serve_port}, Redis {redis_url}; generate script "
            f"torch threads {info['threads']}",
            flush=True,
        )
        api_url = f"http://127.0.0.1:{api_port}"
        bench.http = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0))
        bench.child = child
        for m in models.values():
            t0 = time.time()
            child.call(op="load", path=m["path"])
            pick_prompt(child, m, a.max_tokens)
            if m["max_tokens"] != a.max_tokens:
                bench.notes.append(
                    f"{m['name']}: no prompt ran to {a.max_tokens} tokens; using "
                    f"{m['max_tokens']} (prompt {m['prompt']!r})"
                )
            m["serve"] = Target("serve", serve_url + "/v1/chat/completions", m["path"], {}, False)
            m["posttrain"] = Target(
                "posttrain",
                api_url + "/v1/chat/completions",
                m["name"],
                {"Authorization": f"Bearer {key}"},
                True,
            )
            header = json.dumps({"name": m["name"], "path": m["path"], "base": None})
            m["front"] = Target(
                "front",
                entry["url"] + "/v1/chat/completions",
                m["name"],
                {"X-Posttrain-Model": header},
                True,
            )
            for t in (m["serve"], m["posttrain"]):
                warm(bench.http, t, m["prompt"], 1, bench.unavailable)
            arms = bench.arms(m)
            for _ in range(a.warmup):
                for fn in arms.values():
                    bench.retry(fn, "warmup", m["name"])
            print(
                f"{m['name']}: loaded and warmed in {time.time() - t0:.1f} s; prompt "
                f"{m['prompt']!r} ({m['prompt_tokens']} tokens), {m['max_tokens']} generated",
                flush=True,
            )
        print(sdk_check(api_url, key, next(iter(models))), flush=True)
        with Runnable() as load:
            sections = {}
            for m in models.values():
                for name, fn in (
                    ("throughput", bench.throughput),
                    ("latency", bench.latency),
                    ("concurrency", bench.concurrency),
                ):
                    mark, t0 = load.mark(), time.time()
                    fn(m)
                    sections[f"{m['name']}/{name}"] = {
                        "seconds": time.time() - t0,
                        "runnable": load.mean_since(mark),
                    }
                    print(
                        f"  {m['name']} {name}: {time.time() - t0:.1f} s, runnable tasks "
                        f"{load.mean_since(mark):.1f}",
                        flush=True,
                    )
        bench.http.close()
    finally:
        if watch is not None:
            watch.__exit__()
        stop_proc(api)
        stop_proc(worker, timeout=20)
        stop_proc(serve)
        if child is not None:
            child.close()
        if redis_proc is not None and redis_proc.poll() is None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    for m in models.values():
        for k in ("serve", "posttrain", "front"):
            m.pop(k, None)
    return {
        "models": models,
        "samples": bench.samples,
        "sections": sections,
        "notes": bench.notes,
        "unavailable": bench.unavailable,
        "heartbeats": watch.summary(),
    }


# --------------------------------------------------------------------------- report
def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def per_round(rate: dict[str, dict[int, float]], arm: str, base: str) -> list[float]:
    """arm's tokens/s over base's, for each round that ran both."""
    both = sorted(set(rate.get(arm, {})) & set(rate.get(base, {})))
    return [rate[arm][r] / rate[base][r] for r in both]


def iqr(xs: list[float]) -> tuple[float, float]:
    return (q(xs, 0.25), q(xs, 0.75))


def summarize(res: dict, a: argparse.Namespace) -> dict:
    samples, out = res["samples"], {}
    problems: list[str] = []
    for name, m in res["models"].items():
        n = m["max_tokens"]

        def of(section: str, arm: str, name: str = name, **match: Any) -> list[dict]:
            return [
                s
                for s in samples
                if s["section"] == section
                and s["model"] == name
                and s["arm"] == arm
                and all(s.get(k) == v for k, v in match.items())
            ]

        tp: dict[str, dict] = {}
        rate: dict[str, dict[int, float]] = {}  # arm -> round -> tokens/s
        for arm in THROUGHPUT_ARMS:
            rows = of("throughput", arm)
            if not rows:
                continue
            counts = sorted({s["tokens"] for s in rows})
            if counts != [n]:
                problems.append(f"{name} {arm}: generated {counts} tokens, expected {n}")
            if arm.endswith("stream") and not all(s["complete"] for s in rows):
                problems.append(f"{name} {arm}: a stream ended without its final chunk")
            rate[arm] = {s["round"]: s["tokens"] / s["seconds"] for s in rows}
            cpu = {k: statistics.mean([s["cpu"][k] * 1e3 for s in rows]) for k in rows[0]["cpu"]}
            tp[arm] = {
                "tok_s": _med(list(rate[arm].values())),
                "ms": _med([s["seconds"] * 1e3 for s in rows]),
                "runs": rate[arm],
                "counts": counts,
                "cpu_ms": cpu,
            }
            if "ttft" in rows[0]:
                tp[arm]["ttft_ms"] = _med([s["ttft"] * 1e3 for s in rows])

        def paired(arm: str, base: str, rate: dict = rate) -> float:
            """Median over rounds of arm / base, both run in the same round."""
            return _med(per_round(rate, arm, base))

        for arm in tp:
            tp[arm]["vs_generate"] = paired(arm, "generate")
            tp[arm]["vs_generate_iqr"] = iqr(per_round(rate, arm, "generate"))
            base = "serve-stream" if arm.endswith("stream") else "serve"
            tp[arm]["vs_serve"] = paired(arm, base) if arm != "generate" else None
            tp[arm]["vs_serve_iqr"] = iqr(per_round(rate, arm, base))
        texts = {s["text"] for s in samples if s["section"] == "throughput" and s["model"] == name}
        if len(texts) != 1:
            problems.append(f"{name}: the arms' answers differ ({len(texts)} distinct texts)")
        lat: dict[str, dict] = {}
        for arm in ("serve", "front", "posttrain"):
            rows = of("latency", arm)
            ms = [s["seconds"] * 1e3 for s in rows]
            cpu = {k: statistics.mean([s["cpu"][k] * 1e3 for s in rows]) for k in rows[0]["cpu"]}
            lat[arm] = {"p50": q(ms, 0.5), "p99": q(ms, 0.99), "n": len(ms), "cpu_ms": cpu}
        conc: dict[str, dict] = {}
        for arm in ("posttrain", "serve"):
            one = of("concurrency", arm, clients=1)
            many = of("concurrency", arm, clients=a.clients)
            one_rate = _med([s["tokens"] / s["seconds"] for s in one])
            aggs = [s["tokens"] / s["seconds"] for s in many]
            for s in many:
                if s["complete"] != a.clients or s["full"] != a.clients or not s["texts_match"]:
                    problems.append(
                        f"{name} {arm} round {s['round']}: {s['complete']}/{a.clients} streams "
                        f"complete, {s['full']} with all {n} tokens, same texts "
                        f"{s['texts_match']}; errors {s['errors'][:3]}"
                    )
            ttft = [t for s in many for t in s["ttft"]]
            conc[arm] = {
                "one_tok_s": one_rate,
                "agg_tok_s": _med(aggs),
                "aggs": aggs,
                "ratio": _med(aggs) / one_rate,
                "clients": a.clients * len(many),
                "complete": sum(s["complete"] for s in many),
                "full": sum(s["full"] for s in many),
                "ttft_p50_ms": q(ttft, 0.5) * 1e3,
                "ttft_max_ms": max(ttft) * 1e3,
                "wall_s": _med([s["seconds"] for s in many]),
                "cpu_s": [s["cpu"] for s in many],
            }
        out[name] = {
            "throughput": tp,
            "ratios": {
                f"{arm}/{base}": paired(arm, base)
                for arm, base in (
                    ("posttrain", "serve"),
                    ("posttrain", "generate"),
                    ("serve", "generate"),
                    ("posttrain-stream", "serve-stream"),
                    ("posttrain-stream", "front-stream"),
                    ("front-stream", "serve-stream"),
                    ("posttrain-stream", "generate"),
                    ("serve-stream", "generate"),
                )
                if arm in rate and base in rate
            },
            "latency": lat,
            "added_ms": {
                "p50": lat["posttrain"]["p50"] - lat["serve"]["p50"],
                "p99": lat["posttrain"]["p99"] - lat["serve"]["p99"],
                "front_p50": lat["front"]["p50"] - lat["serve"]["p50"],
                "api_p50": lat["posttrain"]["p50"] - lat["front"]["p50"],
            },
            "concurrency": conc,
        }
    for u in res["unavailable"]:
        if "model_loading" not in u["error"]:
            problems.append(f"503 in {u['section']} ({u.get('model', '')}): {u['error'][:120]}")
    hb = res["heartbeats"]
    if hb["expired_at_s"]:
        problems.append(
            f"the worker's registry entry had expired (no live worker for the API) at "
            f"{hb['expired_at_s'][:10]} s; heartbeat gaps over 4 s: {hb['gaps_over_4s']}"
        )
    return {"models": out, "problems": problems}


def report(res: dict, summary: dict, a: argparse.Namespace) -> None:
    models = res["models"]
    print(
        f"\n## posttrain inference vs the engine alone (CPU, {a.threads} thread(s) per "
        f"process, greedy, {a.rounds} rounds; tokens/s = median, ratios = median of per-round "
        "ratios)\n"
    )
    for name, m in models.items():
        print(
            f"- {name}: Qwen2 hidden {m['hidden']} x {m['layers']} layers; prompt "
            f"{m['prompt_tokens']} tokens, {m['max_tokens']} generated per request"
        )
    print(
        "\n| model | arm | tokens/s | vs generate (IQR) | vs serve (IQR) | ms/request | tokens | "
        "API CPU ms/req | front CPU ms/req |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, s in summary["models"].items():
        tp = s["throughput"]
        for arm, row in tp.items():
            api = row["cpu_ms"]["api"] if arm.startswith("posttrain") else None
            front = row["cpu_ms"]["front"] if arm.startswith(("posttrain", "front")) else None
            vs_gen = vs_serve = "-"
            if arm != "generate":
                lo, hi = row["vs_generate_iqr"]
                vs_gen = f"{row['vs_generate']:.3f} ({lo:.2f}-{hi:.2f})"
            if arm not in ("generate", "serve", "serve-stream"):
                lo, hi = row["vs_serve_iqr"]
                vs_serve = f"{row['vs_serve']:.3f} ({lo:.2f}-{hi:.2f})"
            print(
                f"| {name} | {arm} | {row['tok_s']:.1f} | {vs_gen} | {vs_serve}"
                + f" | {row['ms']:.1f} | {'/'.join(map(str, row['counts']))} | "
                + ("-" if api is None else f"{api:.1f}")
                + " | "
                + ("-" if front is None else f"{front:.1f}")
                + " |"
            )
    print(
        f"\nAdded latency ({a.latency_n} requests of max_tokens=1 per arm, "
        "interleaved; ms; CPU = mean per request):\n"
    )
    print("| model | arm | p50 | p99 | added p50 | added p99 | API CPU | front CPU | engine CPU |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, s in summary["models"].items():
        lat = s["latency"]
        for arm, row in lat.items():
            eng = row["cpu_ms"]["serve-engine" if arm == "serve" else "post-engine"]
            added = (
                "- | -"
                if arm == "serve"
                else f"{row['p50'] - lat['serve']['p50']:+.1f} | "
                f"{row['p99'] - lat['serve']['p99']:+.1f}"
            )
            api = f"{row['cpu_ms']['api']:.1f}" if arm == "posttrain" else "-"
            front = f"{row['cpu_ms']['front']:.1f}" if arm != "serve" else "-"
            print(
                f"| {name} | {arm} | {row['p50']:.1f} | {row['p99']:.1f} | {added} | "
                f"{api} | {front} | {eng:.1f} |"
            )
    print(
        f"\nConcurrency ({a.clients} streaming clients at once vs 1 client, {a.conc_rounds} "
        "round(s), medians; tokens/s):\n"
    )
    print(
        "| model | server | complete | 1 client | all clients (each round) | ratio | "
        "first token p50 / max (ms) | wall s |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for name, s in summary["models"].items():
        for arm, row in s["concurrency"].items():
            each = ", ".join(f"{x:.0f}" for x in row["aggs"])
            print(
                f"| {name} | {arm} | {row['complete']}/{row['clients']} (full {row['full']}) | "
                f"{row['one_tok_s']:.1f} | {row['agg_tok_s']:.1f} ({each}) | {row['ratio']:.3f} | "
                f"{row['ttft_p50_ms']:.0f} / {row['ttft_max_ms']:.0f} | {row['wall_s']:.1f} |"
            )
    print("\nTargets:")
    for name, s in summary["models"].items():
        r, added = s["ratios"], s["added_ms"]
        conc = s["concurrency"]["posttrain"]
        checks = [
            (f"{k} {r[k]:.3f} >= 0.9", r[k] >= 0.9)
            for k in (
                "posttrain/generate",
                "posttrain/serve",
                "posttrain-stream/generate",
                "posttrain-stream/serve-stream",
            )
            if k in r
        ]
        checks += [
            (f"added p50 {added['p50']:.1f} ms <= 10 ms", added["p50"] <= 10),
            (
                f"{a.clients} streams complete ({conc['complete']}/{conc['clients']})",
                conc["complete"] == conc["full"] == conc["clients"],
            ),
        ]
        line = "; ".join(f"{text}: {'met' if ok else 'MISSED'}" for text, ok in checks)
        split = ""
        if "front-stream/serve-stream" in r:
            split = (
                f"; stream tokens/s split: front/serve {r['front-stream/serve-stream']:.3f}, "
                f"API/front {r['posttrain-stream/front-stream']:.3f}"
            )
        print(
            f"- {name}: {line} (added p50 split: front {added['front_p50']:+.1f} ms, "
            f"API {added['api_p50']:+.1f} ms{split})"
        )
    busy = {k: v["runnable"] for k, v in res["sections"].items()}
    print(
        "\nrunnable tasks (mean; one engine or client ~1-2 expected): "
        + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
    )
    hb = res["heartbeats"]
    print(
        f"worker registry: {hb['beats']} heartbeats seen, longest gap {hb['max_gap_s']:.2f} s "
        f"(entry lives 6 s), expired {len(hb['expired_at_s'])} time(s) when polled"
    )
    for note in res["notes"] + summary["problems"]:
        print(f"- PROBLEM: {note}" if note in summary["problems"] else f"- note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.inference", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds, 64 tokens, 30 latencies")
    p.add_argument("--out", type=Path, default=None, help="write every sample as JSON here")
    p.add_argument("--keep", type=Path, default=None, help="work dir to keep (default: temp)")
    p.add_argument("--models", default="tiny,wide", help="tiny, wide or tiny,wide")
    p.add_argument("--wide-hidden", type=int, default=512)
    p.add_argument("--wide-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every process")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 128)")
    p.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every arm per model")
    p.add_argument("--latency-n", type=int, default=None, help="short requests per arm (100)")
    p.add_argument("--latency-warmup", type=int, default=5)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--conc-rounds", type=int, default=None, help="concurrency rounds (2)")
    p.add_argument("--no-stream", action="store_true", help="no streaming throughput arms")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not a.models or set(a.models) - {"tiny", "wide"}:
        p.error("--models takes tiny, wide or tiny,wide")
    quick = {"max_tokens": 64, "rounds": 3, "latency_n": 30, "conc_rounds": 1}
    full = {"max_tokens": 128, "rounds": 8, "latency_n": 100, "conc_rounds": 2}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if min(a.rounds, a.clients, a.conc_rounds) < 1 or a.max_tokens < 2 or a.latency_n < 2:
        p.error("--max-tokens, --latency-n >= 2; --rounds, --clients, --conc-rounds >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started = time.time()
    work = (a.keep or Path(tempfile.mkdtemp(prefix="posttrain-bench-inference-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}; {os.cpu_count()} cores; {a.threads} thread(s) per process", flush=True)
    try:
        res = run(a, work, started)
    except BenchError as exc:
        print(f"\nbench failed: {exc}\n(logs under {work})", file=sys.stderr)
        if not a.keep:
            print("re-run with --keep DIR to keep the logs", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
        return 1
    summary = summarize(res, a)
    report(res, summary, a)
    wall = time.time() - started
    print(f"\nbench wall time {wall:.0f} s; work dir {work if a.keep else '(temporary, removed)'}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        a.out.write_text(
            json.dumps(
                {"args": args, "wall_s": wall, **res, "summary": summary}, indent=1, default=str
            )
        )
        print(f"results written to {a.out}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
