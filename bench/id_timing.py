"""Does a 404 say whether an id exists? Time GETs of another tenant's job and file
against GETs of ids that do not exist, in one process, interleaved.

    python -m bench.id_timing                    # this tree
    python -m bench.id_timing --src ../old-tree  # another checkout

The API runs in-process (FastAPI's TestClient) against a throwaway redis-server, with two
tenants; tenant b asks for tenant a's job and file and for unknown ids, alternately,
``--n`` times each through HTTP, then ``3 x --n`` times through the ownership check alone
(``service.deps.owned_job`` / ``owned_file``, no HTTP stack, far less noise). Prints the
median and mean of each, and the differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import ApiSettings

    tmp = Path(tempfile.mkdtemp(prefix="idtiming-"))
    port = _port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    keys = {"a": "key-a", "b": "key-b"}
    tenants = {n: {"keys": [hashlib.sha256(k.encode()).hexdigest()]} for n, k in keys.items()}
    (tmp / "keys.json").write_text(json.dumps({"tenants": tenants}))
    (tmp / "models" / "tiny").mkdir(parents=True)
    (tmp / "models" / "tiny" / "config.json").write_text('{"model_type": "llama"}')
    settings = ApiSettings(
        redis_url=f"redis://127.0.0.1:{port}/0", data_dir=tmp, api_keys_file=tmp / "keys.json"
    )
    try:
        with TestClient(create_app(settings)) as c:
            a = {"Authorization": f"Bearer {keys['a']}"}
            b = {"Authorization": f"Bearer {keys['b']}"}
            row = {"messages": [{"role": "user", "content": "hi " * 200},
                                {"role": "assistant", "content": "yo"}]}  # fmt: skip
            fid = c.post("/v1/files", files={"file": ("t.jsonl", json.dumps(row).encode())},
                         data={"purpose": "fine-tune"}, headers=a).json()["id"]  # fmt: skip
            meta = {f"k{i}": "v" * 500 for i in range(16)}
            job = c.post(
                "/v1/fine_tuning/jobs",
                headers=a,
                json={"model": "tiny", "training_file": fid, "metadata": meta},
            ).json()
            paths = {
                "job of another tenant": f"/v1/fine_tuning/jobs/{job['id']}",
                "unknown job": "/v1/fine_tuning/jobs/ftjob-000000000000000000000000",
                "file of another tenant": f"/v1/files/{fid}",
                "unknown file": "/v1/files/file-000000000000000000000000",
            }
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(200):  # warm up
                for p in paths.values():
                    c.get(p, headers=b)
            for _ in range(args.n):
                for name, p in paths.items():
                    t0 = time.perf_counter()
                    r = c.get(p, headers=b)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    assert r.status_code == 404, (name, r.status_code)
            # the same decision without the HTTP stack: the ownership check alone
            from service.auth import Tenant
            from service.deps import owned_file, owned_job
            from service.errors import APIError

            app, tb = c.app, Tenant("b")
            checks = {
                "check: job of another tenant": (owned_job, app.state.jobs, job["id"]),
                "check: unknown job": (owned_job, app.state.jobs, paths["unknown job"][-30:]),
                "check: file of another tenant": (owned_file, app.state.files, fid),
                "check: unknown file": (owned_file, app.state.files, paths["unknown file"][-29:]),
            }
            for name in checks:
                times[name] = []
            for _ in range(args.n * 3):
                for name, (fn, store, ident) in checks.items():
                    t0 = time.perf_counter()
                    try:
                        fn(store, ident, tb)
                    except APIError as exc:
                        assert exc.status == 404
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        redis_proc.kill()
        redis_proc.wait()
    out = {k: {"median_ms": round(statistics.median(v), 4), "mean_ms": round(statistics.mean(v), 4)}
           for k, v in times.items()}  # fmt: skip
    for prefix in ("", "check: "):
        for kind in ("job", "file"):
            other, unknown = (
                out[f"{prefix}{kind} of another tenant"],
                out[f"{prefix}unknown {kind}"],
            )
            out[f"{prefix}{kind}: other - unknown (median ms)"] = round(
                other["median_ms"] - unknown["median_ms"], 4
            )
    print(json.dumps({"src": args.src, **out}, indent=2))


if __name__ == "__main__":
    main()
