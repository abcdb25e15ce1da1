"""A bubblewrap sandbox for user code (the ``python`` grader), torch-free.

``run`` starts one ``bwrap`` process, writes its input to the child's stdin and reads
its stdout as lines, and kills it when it overruns a limit. What the child gets:

* new namespaces of every kind (``--unshare-all``): no network interface but its own
  loopback, its own PIDs (``/proc`` shows only the sandbox), IPC and hostname;
* a read-only view of ``/usr`` (``/lib``, ``/lib64``, ``/bin``, ``/sbin`` as on the
  host: links or read-only binds) and of the interpreter's prefix, an empty private
  ``/tmp`` (tmpfs) and a minimal ``/dev``, under a read-only root; nothing else of the
  host: no ``/etc``, no home, no data directory, so no job's files;
* ``--die-with-parent`` and ``--new-session`` (no signals to our terminal);
* resource limits (address space, CPU seconds, file size, open files, processes, no
  core files), set by the sandboxed Python itself before the code runs (``limited``):
  inside its user namespace ``RLIMIT_NPROC`` counts only the sandbox's processes, not
  the other sandboxes' nor the worker's own threads;
* a wall-clock deadline, after which the process group is killed, and a cap on the
  bytes read from stdout and from stderr (over it: killed).

Root is not bound by ``RLIMIT_NPROC``, so a worker running as root starts ``bwrap`` as
``nobody`` (uid/gid 65534); ``bwrap`` then needs unprivileged user namespaces, as it
does for any non-root worker (the docker images run as uid 10001).

``probe`` runs ``true``-like Python once per policy and process and says whether the
sandbox works here, and if not, why (bwrap missing, namespaces refused).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["SandboxPolicy", "SandboxResult", "SandboxUnavailable", "probe", "run"]

NOBODY = 65534
BWRAP = "bwrap"
# Host directories the sandbox sees read-only (when they exist).
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
MAX_OPEN_FILES = 64


class SandboxPolicy(BaseModel):
    """How this server runs user code: the ``POSTTRAIN_PYTHON_GRADER*`` settings."""

    mode: Literal["off", "bwrap"] = "off"
    memory_mb: int = Field(512, ge=32)
    cpu_seconds: int = Field(10, ge=1)
    wall_seconds: float = Field(20.0, gt=0)
    processes: int = Field(16, ge=1)
    output_bytes: int = Field(1 << 20, ge=1024)
    interpreter: str = ""  # "" = /usr/bin/python3 where it exists, else this Python


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (off, bwrap missing, or namespaces refused)."""


@dataclass
class SandboxResult:
    """What a sandbox run gave: its stdout lines (complete ones, in order), how it ended
    (``killed`` names the limit that stopped it, "" if none) and the head of its stderr."""

    lines: list[str] = field(default_factory=list)
    returncode: int | None = None
    killed: str = ""
    stderr: str = ""


def interpreter(policy: SandboxPolicy) -> str:
    """The Python run inside: the policy's, else the system one, else this process's."""
    if policy.interpreter:
        return policy.interpreter
    if os.access("/usr/bin/python3", os.X_OK):
        return "/usr/bin/python3"
    return os.path.realpath(sys.executable)


def _binds(python: str) -> list[str]:
    args: list[str] = []
    for d in SYSTEM_DIRS:
        p = Path(d)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            args += ["--ro-bind", d, d]
    prefix = str(Path(os.path.realpath(python)).parent.parent)
    if not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
        args += ["--ro-bind", prefix, prefix]
    return args


def command(policy: SandboxPolicy, code: str) -> list[str]:
    """The bwrap command line running ``code`` under the sandbox's Python."""
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed on this host")
    python = interpreter(policy)
    return [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8",
        *_binds(python),
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/tmp",
        python, "-I", "-S", "-c", limited(policy, code),
    ]  # fmt: skip


# Set by the sandboxed Python itself before anything else runs: inside its user
# namespace, where RLIMIT_NPROC counts only the sandbox's processes (set before bwrap,
# it would count every process of the worker's uid), and with no preexec_fn in the
# worker (unsafe in a process with threads). Soft = hard, so the code cannot raise them,
# but for the CPU: SIGXCPU at the limit, SIGKILL a second later if that is caught.
_LIMITS = """import resource as _r
for _k, _v in ((_r.RLIMIT_NPROC, {processes}), (_r.RLIMIT_AS, {memory}),
               (_r.RLIMIT_CPU, {cpu}), (_r.RLIMIT_FSIZE, {fsize}),
               (_r.RLIMIT_NOFILE, {files}), (_r.RLIMIT_CORE, 0)):
    _h = _r.getrlimit(_k)[1]
    _v = _v if _h == _r.RLIM_INFINITY else min(_v, _h)
    _r.setrlimit(_k, (_v, _v + 1 if _k == _r.RLIMIT_CPU and _v != _h else _v))
del _r, _k, _v, _h
"""


def limited(policy: SandboxPolicy, code: str) -> str:
    """``code`` behind the prologue that sets the policy's limits."""
    prologue = _LIMITS.format(
        processes=policy.processes,
        memory=policy.memory_mb << 20,
        cpu=policy.cpu_seconds,
        fsize=policy.output_bytes,
        files=MAX_OPEN_FILES,
    )
    return prologue + code


class _Reader(threading.Thread):
    """Reads one pipe to its end, keeping at most ``cap`` bytes; ``over`` is set (and
    ``on_over`` called once) when the pipe gave more."""

    def __init__(self, pipe, cap: int, on_over):
        super().__init__(daemon=True)
        self.pipe, self.cap, self.on_over = pipe, cap, on_over
        self.data = bytearray()
        self.over = False

    def run(self) -> None:
        while chunk := self.pipe.read1(65536):
            if self.over:
                continue  # drained until the kill closes it
            self.data += chunk
            if len(self.data) > self.cap:
                del self.data[self.cap :]
                self.over = True
                self.on_over()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the child died or stopped reading: its end is reported by the readers


def run(policy: SandboxPolicy, code: str, stdin: bytes) -> SandboxResult:
    """Run the Python ``code`` in the sandbox (``python3 -I -S -c``), under the limits."""
    if policy.mode != "bwrap":
        raise SandboxUnavailable("the python grader is off on this server")
    cmd = command(policy, code)
    root = os.getuid() == 0  # root is not bound by RLIMIT_NPROC: run as nobody
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        user=NOBODY if root else None,
        group=NOBODY if root else None,
        extra_groups=[] if root else None,
        close_fds=True,
    )
    over: list[str] = []

    def stop(which: str) -> None:
        over.append(f"wrote more than {policy.output_bytes} bytes to {which}")
        _kill(proc)

    out = _Reader(proc.stdout, policy.output_bytes, lambda: stop("stdout"))
    err = _Reader(proc.stderr, policy.output_bytes, lambda: stop("stderr"))
    out.start(), err.start()
    feeder = threading.Thread(target=_feed, args=(proc, stdin), daemon=True)
    feeder.start()
    killed = ""
    try:
        proc.wait(timeout=policy.wall_seconds)
    except subprocess.TimeoutExpired:
        killed = f"ran longer than {policy.wall_seconds:g} s (wall clock)"
        _kill(proc)
        proc.wait()
    out.join(), err.join(), feeder.join()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    code = proc.returncode
    if not killed and over:
        killed = over[0]
    elif not killed and code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # bwrap: 128 + sig
        killed = f"used more than {policy.cpu_seconds} s of CPU"
    elif not killed and code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        killed = f"was killed (past its {policy.cpu_seconds} s of CPU, or by the host)"
    text = out.data.decode("utf-8", "replace")
    lines = text.split("\n")[:-1]  # a last line without its newline is incomplete
    return SandboxResult(lines, code, killed, err.data[:4096].decode("utf-8", "replace"))


_PROBE = "import sys; sys.stdout.write('ok\\n')"


@functools.lru_cache(maxsize=8)
def _probe(policy_json: str) -> str:
    policy = SandboxPolicy.model_validate_json(policy_json)
    try:
        result = run(policy, _PROBE, b"")
    except (SandboxUnavailable, OSError) as exc:
        return str(exc)
    if result.lines == ["ok"]:
        return ""
    why = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
    return f"bwrap could not start the sandbox ({why[0][:300]})"


def probe(policy: SandboxPolicy) -> str:
    """ "" if the sandbox works on this host under ``policy``, else why not (cached per
    process: the answer does not change while it runs)."""
    if policy.mode != "bwrap":
        return "the python grader is off on this server (POSTTRAIN_PYTHON_GRADER=off)"
    return _probe(policy.model_dump_json())
