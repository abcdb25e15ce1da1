"""Escapes from the python grader's bubblewrap sandbox (``trainers.contract.sandbox``),
each tried by a real grader in a real sandbox: another job's files and the data root
cannot be read, the network cannot be reached, a fork bomb is bounded and leaves no
process behind, memory, CPU and wall-clock limits hold, only ``/tmp`` is writable, and
output past the cap stops the sandbox. Skipped, with the probe's reason, on a host
where bwrap does not work."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from trainers.contract.graders.python import configure
from trainers.contract.graders.scoring import SCORERS
from trainers.contract.graders.spec import parse_grader
from trainers.contract.sandbox import SandboxPolicy, probe, run

POLICY = SandboxPolicy(mode="bwrap", memory_mb=256, cpu_seconds=2, wall_seconds=30)
WHY = probe(POLICY)
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"no working bubblewrap sandbox: {WHY}")
RUNNER_MARK = "_r.RLIMIT_NPROC"  # in a sandboxed command line, and only there


@pytest.fixture(autouse=True)
def sandbox():
    configure(POLICY)
    yield
    configure(SandboxPolicy())


def scores(source: str, items=None, on_error="zero") -> tuple[list[float], list[str]]:
    """The scores of one sample per item (default: one empty item), and the errors."""
    g = parse_grader({"type": "python", "name": "p", "source": source, "on_error": on_error})
    items = items or [{}]
    notes: list = []
    out = SCORERS["python"](g, items, ["text"] * len(items), notes)
    return out, [str(n) for n in notes]


def sandboxed_processes() -> list[int]:
    """PIDs of every sandboxed process still alive on this host."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if RUNNER_MARK.encode() in cmdline:
            found.append(int(pid))
    return found


def test_another_jobs_files_and_the_data_root_cannot_be_read(tmp_path):
    data_root = tmp_path / "data"
    other = data_root / "jobs" / "ftjob-other" / "input" / "train.jsonl"
    other.parent.mkdir(parents=True)
    other.write_text('{"secret": "other tenant"}\n')
    (data_root / "files.json").write_text("{}")
    source = (
        "def grade(sample, item):\n"
        "    try:\n"
        "        return float(len(open(item['path']).read()) > 0)\n"
        "    except OSError:\n"
        "        return -1.0\n"
    )
    paths = [str(other), str(data_root / "files.json"), __file__, "/etc/passwd"]
    got, errors = scores(source, [{"path": p} for p in paths])
    assert got == [-1.0] * len(paths) and errors == []
    listing = "import os\ndef grade(sample, item):\n    return float(len(os.listdir('/')))\n"
    (count,), _ = scores(listing)
    visible = {"tmp", "dev", "proc", "usr", "bin", "sbin", "lib", "lib64", "lib32"}
    assert count <= len(visible)  # no /etc, /home, /root, /work, nor the data root


def test_the_network_cannot_be_reached():
    accepted = []
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def accept():
        server.settimeout(10)
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    waiter = threading.Thread(target=accept)
    waiter.start()
    source = (
        "import socket\n"
        "def grade(sample, item):\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n"
        "        return 1.0\n"
        "    except OSError:\n"
        "        return 0.0\n"
    )
    try:
        assert scores(source) == ([0.0], [])
        resolve = (
            "import socket\ndef grade(sample, item):\n"
            "    try:\n        socket.getaddrinfo('example.com', 80)\n        return 1.0\n"
            "    except OSError:\n        return 0.0\n"
        )
        assert scores(resolve) == ([0.0], [])
    finally:
        server.close()
        waiter.join()
    assert accepted == []


def test_a_fork_bomb_is_bounded_and_leaves_no_process():
    bomb = (
        "import os, time\n"
        "def grade(sample, item):\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(600)\n"
    )
    got, errors = scores(bomb + "\n", [{}, {}])
    assert got == [0.0, 0.0]
    assert len(errors) == 2 and all("Resource temporarily unavailable" in e for e in errors)
    assert sandboxed_processes() == []
    assert scores("def grade(sample, item):\n    return 2.5\n") == ([2.5], [])  # host fine


def test_memory_beyond_the_limit_fails_that_sample_only():
    source = (
        "def grade(sample, item):\n"
        "    data = bytearray(item['mb'] << 20)\n"
        "    return float(len(data) >> 20)\n"
    )
    got, errors = scores(source, [{"mb": 1024}, {"mb": 8}])
    assert got == [0.0, 8.0]
    assert len(errors) == 1 and "MemoryError" in errors[0]


def test_a_cpu_spin_is_killed_at_the_cpu_limit_and_the_next_rows_still_grade():
    source = "def grade(sample, item):\n    while item['spin']:\n        pass\n    return 1.0\n"
    got, errors = scores(source, [{"spin": False}, {"spin": True}, {"spin": False}])
    assert got == [1.0, 0.0, 1.0]
    assert len(errors) == 1 and "more than 2 s of CPU" in errors[0]
    stubborn = (
        "import signal\n"
        "def grade(sample, item):\n"
        "    signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
        "    while True:\n"
        "        pass\n"
    )
    got, errors = scores(stubborn)
    assert got == [0.0] and "was killed (past its 2 s of CPU" in errors[0]


def test_a_sleeper_is_killed_at_the_wall_clock_limit():
    configure(POLICY.model_copy(update={"wall_seconds": 1.0}))
    source = "import time\ndef grade(sample, item):\n    time.sleep(600)\n    return 1.0\n"
    got, errors = scores(source)
    assert got == [0.0] and len(errors) == 1 and "(wall clock)" in errors[0]
    assert sandboxed_processes() == []


def test_only_tmp_is_writable(tmp_path):
    target = tmp_path / "escaped.txt"
    source = (
        "def grade(sample, item):\n"
        "    try:\n"
        "        with open(item['path'], 'w') as f:\n"
        "            f.write('x')\n"
        "        return 1.0\n"
        "    except OSError:\n"
        "        return 0.0\n"
    )
    paths = ["/tmp/scratch.txt", "/usr/escaped.txt", "/escaped.txt", str(target)]
    got, errors = scores(source, [{"path": p} for p in paths])
    assert got == [1.0, 0.0, 0.0, 0.0] and errors == []
    assert not target.exists() and not Path("/usr/escaped.txt").exists()


def test_output_past_the_cap_stops_the_sandbox():
    policy = POLICY.model_copy(update={"output_bytes": 4096})
    flood = "import sys\nsys.stdout.write('x' * (64 << 20))\nsys.stdout.flush()\n"
    result = run(policy, flood, b"")
    assert result.killed == "wrote more than 4096 bytes to stdout" and result.lines == []
    configure(policy)
    source = "def grade(sample, item):\n    print('y' * (64 << 20))\n    return 1.0\n"
    got, errors = scores(source)
    assert got == [0.0] and "wrote more than 4096 bytes to stderr" in errors[0]


def test_the_sandbox_is_refused_where_the_policy_is_off():
    assert "off" in probe(SandboxPolicy())
    configure(SandboxPolicy())
    with pytest.raises(Exception, match="cannot run: the python grader is off"):
        scores("def grade(sample, item):\n    return 1.0\n")
