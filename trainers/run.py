"""Entry point of one training process: ``python -m trainers.run --plan P --report-fd N``.

Reads the run plan, sets torch's thread count, runs the method from the registry
through the shared runner (``trainers.runner``), and reports the outcome on the
report fd. SIGUSR1 pauses: the trainer
saves a checkpoint at the next step boundary, reports ``paused`` and exits 0. Exit codes: 0 success,
2 a user-facing error (reported, not retried), 1 an unexpected exception
(reported with its type). A process killed by a signal reports nothing; the
supervisor treats that as a crash and may retry from the last checkpoint.

Under ``accelerate launch`` (several ranks) the report channel is a named pipe
(``--report-path``) that only rank 0 opens, a pause is a flag file every rank
reads (``plan.pause_path``), each rank dies with the launcher that started it,
and a rank whose collective failed because another rank died exits as a crash
(retried) rather than reporting a training error.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import traceback

from trainers.contract.errors import JobError
from trainers.contract.plan import RunPlan
from trainers.reporting import PauseRequest, Reporter, open_report_path

_PR_SET_PDEATHSIG = 1
# A collective that failed because a peer rank is gone (gloo's and NCCL's wording).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.run", description=__doc__)
    p.add_argument("--plan", required=True, help="run plan JSON written by the supervisor")
    p.add_argument("--report-fd", type=int, default=None, help="fd for JSON report lines")
    p.add_argument(
        "--report-path", default=None, help="named pipe for JSON report lines (rank 0 writes)"
    )
    return p.parse_args(argv)


def execute(plan: RunPlan, reporter: Reporter) -> int:
    """Run ``plan`` and report its result or error; return the process exit code."""
    import torch

    from trainers import registry
    from trainers.contract.graders.python import configure as configure_python
    from trainers.runner import run_method

    torch.set_num_threads(plan.threads)
    # every python grader this process runs (an RL job's rewards, EGPO's grader judge) runs
    # under the server's sandbox settings, which the run plan carries
    configure_python(plan.python_graders)
    if plan.processes > 1:
        _load_onto_indexed_cpu(torch)
    pause = PauseRequest(plan.pause_path).install()
    try:
        result = run_method(registry.resolve_job(plan.spec), plan, reporter, pause)
    except JobError as exc:
        reporter.error(exc.code, exc.message, exc.param)
        return 2
    except Exception as exc:
        traceback.print_exc()
        if plan.processes > 1 and _peer_lost(exc):
            return 1  # another rank died: a crash of the whole run, retried by the worker
        reporter.error("training_error", f"{type(exc).__name__}: {exc}")
        return 1
    if result.paused:
        reporter.paused(result.step, result.trained_tokens, result.checkpoint)
    else:
        reporter.result(result.step, result.trained_tokens, result.checkpoint)
    return 0


def _peer_lost(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_LOST)


def _load_onto_indexed_cpu(torch) -> None:
    """accelerate gives each rank of a CPU run the device ``cpu:0``, and Trainer resumes
    its optimizer with ``torch.load(map_location=args.device)``, for which torch has no
    deserializer ("don't know how to restore data location ... cpu:0"): register one
    (torch's own ``register_package``; tensors stay on the CPU)."""
    torch.serialization.register_package(
        99, lambda obj: None, lambda obj, location: obj if location.startswith("cpu:") else None
    )


def _die_with_launcher() -> None:
    """A rank started by torch's launcher runs in its own session, out of reach of the
    worker's process-group signals: it must not outlive the launcher."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the launcher was already gone
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        _die_with_launcher()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    fd = open_report_path(args.report_path) if args.report_path else args.report_fd
    reporter = Reporter(fd)
    try:
        plan = RunPlan.model_validate_json(open(args.plan).read())
    except (OSError, ValueError) as exc:
        reporter.error("invalid_plan", f"cannot read run plan {args.plan}: {exc}")
        return 2
    if plan.report_journal is not None and reporter.fd is not None:
        reporter.keep_journal(plan.report_journal)
    return execute(plan, reporter)


if __name__ == "__main__":
    sys.exit(main())
