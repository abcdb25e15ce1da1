"""The API under a hostile tenant: /healthz latency and the API's memory during regex
bombs, against the same API idle in the same run.

    python -m bench.api_abuse                    # this tree
    python -m bench.api_abuse --src ../old-tree  # another checkout (e.g. before a fix)

Starts a throwaway redis-server and the API (uvicorn, as deployed) from ``--src`` with
this interpreter, capped at 4 GiB of address space so a bomb that is compiled in the
API fails there instead of exhausting the machine. Then, with /healthz polled all the
while from another thread, sends the probe's bombs to /graders/validate (4 at once,
``--rounds`` times): ``(((a{50}){50}){50}){50}`` and ``a{4294967294}``. Prints the
answers, /healthz p50 / max against the idle baseline (ratios), and the API's
resident memory before, at its peak (VmHWM) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BOMBS = ["(((a{50}){50}){50}){50}", "a{4294967294}"]
CAP = 4 << 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        line = next(x for x in fh if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def _poll(url: str, stop: threading.Event, out: list[float], failed: list[str]) -> None:
    """/healthz every 10 ms: each answer's latency in ms, each failure's name."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            httpx.get(url, timeout=60).raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
        except httpx.HTTPError as exc:
            failed.append(type(exc).__name__)
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    src = Path(args.src).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="abuse-"))
    rport, port = _port(), _port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_")},
        "PYTHONPATH": str(src),
        "POSTTRAIN_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
        "POSTTRAIN_DATA_DIR": str(tmp / "data"),
    }
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"],
        cwd=src, env=env, preexec_fn=_cap, stdout=subprocess.DEVNULL,
        stderr=open(tmp / "api.log", "wb"),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise SystemExit(f"the API did not start; see {tmp / 'api.log'}")
            time.sleep(0.2)
        stop, idle, failed = threading.Event(), [], []
        poller = threading.Thread(target=_poll, args=(f"{base}/healthz", stop, idle, failed))
        poller.start()
        time.sleep(2.0)
        stop.set()
        poller.join()
        rss_before = _status(api.pid, "VmRSS")

        stop, loaded, answers = threading.Event(), [], Counter()
        poller = threading.Thread(target=_poll, args=(f"{base}/healthz", stop, loaded, failed))
        poller.start()

        def bomb(pattern: str) -> None:
            grader = {"type": "regex", "name": "r", "input": "{{sample.output_text}}",
                      "pattern": pattern}  # fmt: skip
            try:
                with httpx.Client(timeout=300) as c:
                    r = c.post(f"{base}/v1/fine_tuning/alpha/graders/validate",
                               json={"grader": grader})  # fmt: skip
                answers[f"{pattern[:12]}: {r.status_code}"] += 1
            except httpx.HTTPError as exc:
                answers[f"{pattern[:12]}: {type(exc).__name__}"] += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(bomb, [b for _ in range(args.rounds) for b in BOMBS for _ in (0, 1)]))
        bombs_s = time.perf_counter() - t0
        time.sleep(0.5)
        stop.set()
        poller.join()
        alive = api.poll() is None
        peak = _status(api.pid, "VmHWM") if alive else float("nan")
        after = _status(api.pid, "VmRSS") if alive else float("nan")
        p50_idle, p50_load = statistics.median(idle), statistics.median(loaded)
        report = {
            "src": str(src),
            "answers": dict(answers),
            "bombs_seconds": round(bombs_s, 2),
            "healthz_idle_ms": {"p50": round(p50_idle, 2), "max": round(max(idle), 2)},
            "healthz_during_ms": {"p50": round(p50_load, 2), "max": round(max(loaded), 2)},
            "healthz_failures": dict(Counter(failed)),
            "healthz_ratio": {
                "p50": round(p50_load / p50_idle, 2),
                "max": round(max(loaded) / max(idle), 2),
            },
            "api_rss_mb": {
                "before": round(rss_before),
                "peak": round(peak),
                "after": round(after),
            },
            "api_alive": alive,
        }
        print(json.dumps(report, indent=2))
    finally:
        api.kill()
        redis_proc.kill()
        api.wait()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
