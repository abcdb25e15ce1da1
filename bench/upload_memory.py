"""The API's memory peak while it receives one large single-line upload.

Starts a throwaway ``redis-server`` and the real API (uvicorn, the same command a
deployment runs), uploads one JSONL file that is a single chat row whose content is
``--mb`` megabytes long, and reports the uvicorn process's resident memory before the
upload and its peak (``VmHWM``, the kernel's high-water mark of RSS) after it,
together with the answer's status and the first part of its error message.

    python -m bench.upload_memory            # 200 MB single line
    python -m bench.upload_memory --mb 50

Never touches a Redis it did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from service import stack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _write_single_line(path: Path, mb: int) -> int:
    head = b'{"messages": [{"role": "user", "content": "'
    tail = b'"}, {"role": "assistant", "content": "ok"}]}\n'
    chunk = b"a" * (1 << 20)
    with open(path, "wb") as out:
        out.write(head)
        for _ in range(mb):
            out.write(chunk)
        out.write(tail)
    return path.stat().st_size


def measure(mb: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="posttrain-upload-mem-") as tmp:
        root = Path(tmp)
        redis_port = _free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis_proc = stack.start_redis(redis_url, root / "redis.log")
        env = {
            **os.environ,
            "POSTTRAIN_REDIS_URL": redis_url,
            "POSTTRAIN_DATA_DIR": str(root / "data"),
            "POSTTRAIN_API_KEYS": "",
        }
        port = _free_port()
        api = stack.start_api(env, port, root / "api.log")
        try:
            upload = root / "one-line.jsonl"
            size = _write_single_line(upload, mb)
            # uvicorn runs the app in the process it was started as (no --workers).
            pid = api.pid
            before = _status_kb(pid, "VmRSS")
            t0 = time.monotonic()
            with open(upload, "rb") as fh:
                resp = httpx.post(
                    f"http://127.0.0.1:{port}/v1/files",
                    files={"file": ("one-line.jsonl", fh)},
                    data={"purpose": "fine-tune"},
                    timeout=600,
                )
            seconds = time.monotonic() - t0
            peak = _status_kb(pid, "VmHWM")
            try:
                message = resp.json()["error"]["message"][:120]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:120]
            leftover = sorted(p.name for p in (root / "data" / "files").glob("*"))
            return {
                "upload_bytes": size,
                "status": resp.status_code,
                "message": message,
                "rss_before_mb": round(before / 1024, 1),
                "rss_peak_mb": round(peak / 1024, 1),
                "seconds": round(seconds, 1),
                "files_left_on_disk": leftover,
            }
        finally:
            stack.stop(api)
            if isinstance(redis_proc, subprocess.Popen):
                stack.stop(redis_proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the single line in MiB")
    args = parser.parse_args()
    print(json.dumps(measure(args.mb), indent=2))


if __name__ == "__main__":
    main()
