"""The ``posttrain`` command: serve, worker, tiny-model, demo.

Heavy imports (torch, transformers) happen only inside the subcommands that
need them; ``posttrain serve`` stays torch-free like the API it runs.
"""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.settings import ApiSettings

    s = ApiSettings()
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=args.host or s.host,
        port=args.port or s.port,
        log_level=args.log_level,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from workers.celery_app import app
    from workers.settings import WorkerSettings

    s = WorkerSettings()
    argv = [
        "worker",
        f"--loglevel={args.log_level.upper()}",
        "-Q",
        s.queue,
        f"--concurrency={s.concurrency}",
        "--pool=prefork",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from trainers.tiny_model import build_tiny_model

    path = build_tiny_model(args.dir, seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(keep_running=args.keep_running)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Self-hosted LLM post-training.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run a Celery training worker (one job at a time)")
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--hostname")
    worker.set_defaults(func=_worker)
    tiny = sub.add_parser("tiny-model", help="write a tiny offline model for tests and demos")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny_model)
    demo = sub.add_parser("demo", help="run one SFT job end to end on the tiny model")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the API and worker the demo started running",
    )
    demo.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
