"""Entry point of one training process: ``python -m trainers.run --plan P --report-fd N``.

Reads the run plan, sets torch's thread count, runs the method from the registry
through the shared runner (``trainers.runner``), and reports the outcome on the
report fd. SIGUSR1 pauses: the trainer
saves a checkpoint at the next step boundary, reports ``paused`` and exits 0. Exit codes: 0 success,
2 a user-facing error (reported, not retried), 1 an unexpected exception
(reported with its type). A process killed by a signal reports nothing; the
supervisor treats that as a crash and may retry from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from trainers.plan import JobError, RunPlan
from trainers.reporting import PauseRequest, Reporter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.run", description=__doc__)
    p.add_argument("--plan", required=True, help="run plan JSON written by the supervisor")
    p.add_argument("--report-fd", type=int, default=None, help="fd for JSON report lines")
    return p.parse_args(argv)


def execute(plan: RunPlan, reporter: Reporter) -> int:
    """Run ``plan`` and report its result or error; return the process exit code."""
    import torch

    from trainers import registry
    from trainers.runner import run_method

    torch.set_num_threads(plan.threads)
    pause = PauseRequest().install()
    try:
        result = run_method(registry.resolve(plan.spec.method_type), plan, reporter, pause)
    except JobError as exc:
        reporter.error(exc.code, exc.message, exc.param)
        return 2
    except Exception as exc:
        traceback.print_exc()
        reporter.error("training_error", f"{type(exc).__name__}: {exc}")
        return 1
    if result.paused:
        reporter.paused(result.step, result.trained_tokens, result.checkpoint)
    else:
        reporter.result(result.step, result.trained_tokens, result.checkpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    reporter = Reporter(args.report_fd)
    try:
        plan = RunPlan.model_validate_json(open(args.plan).read())
    except (OSError, ValueError) as exc:
        reporter.error("invalid_plan", f"cannot read run plan {args.plan}: {exc}")
        return 2
    return execute(plan, reporter)


if __name__ == "__main__":
    sys.exit(main())
