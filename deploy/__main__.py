"""``make deploy-test`` (``python -m deploy``): build the images, start compose.yaml, use it.

Phases, each timed: the Docker daemon (started if none answers), a local Debian base
image and a Redis image built from Debian's packages (no registry needed), the images
(api, worker-cpu, inference-cpu), ``docker compose up --wait``, then through the
published port with the ``openai`` SDK: upload, an SFT job on the tiny model during which
the worker container is restarted, the checkpoint downloaded and loaded, a chat completion
from the fine-tuned model, ``/metrics``, a Redis restart that must lose no record, deletes
that must remove the files; finally ``docker compose down -v``. It prints the image sizes
and a table of the phases. Needs root (or a docker group member) and a few GB of disk; it
uses its own Compose project and image tag, so it never touches a real deployment.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from deploy import checks, docker
from deploy.docker import Failed

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "posttrain-deploy-test"
TAG = "deploy-test"
SERVICES = ["api", "worker", "inference-cpu"]
TORCH_WHEEL = "torch-2.13.0+cpu-*.whl"


class Phases:
    """Times named phases and prints them as a table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    @contextmanager
    def __call__(self, name: str):
        print(f"\n=== {name}", flush=True)
        start = time.monotonic()
        outcome = "FAILED"
        try:
            yield
            outcome = "ok"
        finally:
            self.rows.append((name, time.monotonic() - start, outcome))
            print(f"=== {name}: {outcome} in {time.monotonic() - start:.1f} s", flush=True)

    def table(self) -> str:
        width = max(len(n) for n, _, _ in self.rows)
        lines = [f"{'phase':<{width}}  {'seconds':>8}  result"]
        lines += [f"{n:<{width}}  {s:>8.1f}  {o}" for n, s, o in self.rows]
        lines.append(f"{'total':<{width}}  {sum(s for _, s, _ in self.rows):>8.1f}")
        return "\n".join(lines)


def find_torch_wheel(explicit: str | None) -> Path | None:
    """The CPU torch wheel to build with: ``--torch-wheel``, else one in the directories
    pip on this host is configured to find wheels in (PIP_FIND_LINKS, pip config)."""
    if explicit:
        return Path(explicit)
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    dirs += [m.group(1) for m in re.finditer(r"find-links='([^']+)'", out)]
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d.removeprefix("file://"), TORCH_WHEEL)))
        if hits:
            return Path(hits[-1])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path) -> tuple[str, Path]:
    """A key file with one admin key (through ``posttrain keys add``) and the tiny model
    in a models directory; returns the key and the model."""
    keys = work / "keys.json"
    cmd = [sys.executable, "-m", "service.cli", "keys", "add", "deploy-test", "--admin"]
    key = subprocess.run(
        [*cmd, "--file", str(keys)], capture_output=True, text=True, check=True
    ).stdout.strip()
    keys.chmod(0o644)  # only hashes; the API's uid must read it
    model = work / "models" / "tiny-model"
    subprocess.run([sys.executable, "-m", "trainers.tiny_model", str(model)], check=True)
    for p in [work / "models", *model.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return key, model


def compose_env(args, work: Path, port: int, wheel: Path | None) -> dict[str, str]:
    env = {
        **os.environ,
        "COMPOSE_BAKE": "false",  # build with the daemon's BuildKit, no buildx needed
        "POSTTRAIN_PYTHON_BASE": docker.BASE_IMAGE,
        "POSTTRAIN_REDIS_IMAGE": docker.REDIS_IMAGE,
        "POSTTRAIN_BUILD_NETWORK": "host",
        "POSTTRAIN_IMAGE_TAG": TAG,
        "POSTTRAIN_PUBLISH": f"127.0.0.1:{port}",
        "POSTTRAIN_KEYS_FILE": str(work / "keys.json"),
        "POSTTRAIN_MODELS_DIR": str(work / "models"),
        "POSTTRAIN_UID": str(args.uid),
    }
    if wheel is not None:  # the local wheel by its exact version; torch's deps from PyPI
        version = wheel.name.split("-")[1]
        env |= {"POSTTRAIN_TORCH_SPEC": f"torch=={version}",
                "POSTTRAIN_TORCH_INDEX": "https://pypi.org/simple"}  # fmt: skip
    return env


def print_sizes(images: list[str]) -> None:
    print("\nimage sizes:")
    for ref in images:
        print(f"  {ref:<48} {docker.image_size(ref) / 1e6:>9.1f} MB")


def scenario(st: checks.Stack, phases: Phases, work: Path, base: Path) -> None:
    client = st.sdk()
    with phases("upload + SFT job with a worker restart mid-job"):
        out = checks.train_through_a_worker_restart(st, client)
    job = out["job"]
    with phases("same uid everywhere, no torch in the API"):
        checks.same_uid(st, SERVICES)
        checks.api_without_torch(st)
    with phases("download + load the checkpoint"):
        checks.download_and_load(st, client, job.id, base, work / "downloads")
    with phases("chat completion from the fine-tuned model"):
        checks.chat(st, client, job.fine_tuned_model)
    with phases("Prometheus metrics"):
        checks.metrics(st)
    with phases("Redis restart loses no record"):
        checks.restart_redis(st, client, job.id)
    with phases("deletes remove the files"):
        checks.deletions(st, client, job.id, job.fine_tuned_model, out["file"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n")[0])
    ap.add_argument("--torch-wheel", help="CPU torch wheel for the worker images")
    ap.add_argument("--rebuild-base", action="store_true", help="rebuild the local base images")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror")
    ap.add_argument("--uid", type=int, default=10001, help="POSTTRAIN_UID of the images")
    ap.add_argument("--keep", action="store_true", help="leave the stack up (no down -v)")
    return ap.parse_args(argv)


def report(st: checks.Stack | None, phases: Phases, ok: bool) -> None:
    if st is not None and st.notes:
        print("\nchecks made:")
        for note in st.notes:
            print(f"  - {note}")
    print("\n" + phases.table())
    print("\ndeploy-test: " + ("PASSED" if ok else "FAILED"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    phases = Phases()
    work = Path(tempfile.mkdtemp(prefix="posttrain-deploy-test-"))
    wheel = find_torch_wheel(args.torch_wheel)
    port = free_port()
    env = compose_env(args, work, port, wheel)
    compose = [*docker.compose_command(), "-f", str(ROOT / "compose.yaml"), "-p", PROJECT]
    st = None
    ok = False
    try:
        with phases("dockerd"):
            print(docker.ensure_daemon(Path("/var/log/posttrain-dockerd.log")))
        with phases("local base images (Debian packages)"):
            for ref, build in ((docker.BASE_IMAGE, lambda: docker.build_base(args.mirror)),
                               (docker.REDIS_IMAGE, docker.build_redis)):  # fmt: skip
                if args.rebuild_base or not docker.image_exists(ref):
                    build()
                else:
                    print(f"{ref} exists (--rebuild-base to build it again)")
        with phases("key file + tiny model"):
            key, model = prepare(work)
            st = checks.Stack(compose, env, f"http://127.0.0.1:{port}", key, args.uid)
        with phases("build images"):
            if wheel is not None:
                docker.stage_wheels([wheel], ROOT / "docker" / "wheels")
                print(f"CPU torch from {wheel}")
            st.dc("--profile", "cpu", "build", *SERVICES)
        print_sizes(
            [docker.BASE_IMAGE, docker.REDIS_IMAGE]
            + [f"posttrain/{s}:{TAG}" for s in ("api", "worker-cpu", "inference-cpu")]
        )
        with phases("compose up, healthy"):
            st.dc("--profile", "cpu", "up", "-d", "--wait", "--wait-timeout", "600")
            st.dc("ps")
            checks.wait_for("/readyz", lambda: checks.api_ready(st), 60)
            checks.all_healthy(st, ["redis", *SERVICES])
        scenario(st, phases, work, model)
        ok = True
    except Exception as exc:  # any failure: say it, show the services' logs, clean up
        print(f"\nFAILED: {type(exc).__name__}: {exc}", flush=True)
        if not isinstance(exc, Failed):
            traceback.print_exc()
        if st is not None:
            st.dc("--profile", "cpu", "logs", "--no-color", "--tail", "60", check=False)
    finally:
        if st is not None and not args.keep:
            with phases("compose down -v"):
                st.dc("--profile", "cpu", "down", "-v", "--remove-orphans", check=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        report(st, phases, ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
