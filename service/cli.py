"""The ``posttrain`` command: serve, worker, inference, keys, tiny-model, demo, and the
client commands on the HTTP API (files, jobs, logs, download, chat: ``service.clientcli``).

Heavy imports (torch, transformers) happen only inside the subcommands that
need them; ``posttrain serve`` stays torch-free like the API it runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata

from service.clientcli import add_commands as add_client_commands


def _version() -> str:
    try:
        return metadata.version("posttrain")
    except metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.auth import KeyFileError, KeyRing, bind_refusal
    from service.settings import ApiSettings

    s = ApiSettings()
    host = args.host or s.host
    try:
        ring = KeyRing.load(s.api_keys, s.api_keys_file)
    except KeyFileError as exc:
        print(f"posttrain serve: {exc}", file=sys.stderr)
        return 2
    refusal = bind_refusal(host, ring, args.insecure_no_auth or s.insecure_no_auth)
    if refusal:
        print(f"posttrain serve: {refusal}", file=sys.stderr)
        return 2
    from service.httpproto import JsonErrorProtocol

    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=args.port or s.port,
        log_level=args.log_level,
        http=JsonErrorProtocol,  # malformed HTTP answered in OpenAI's error shape
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    import os

    from workers.celery_app import app
    from workers.placement import worker_devices
    from workers.settings import WorkerSettings

    # The flags are the settings' environment variables, so the Celery app's own
    # configuration and every task process read the same values.
    if args.gpus is not None:
        os.environ["POSTTRAIN_WORKER_GPUS"] = args.gpus
    if args.queue:
        os.environ["POSTTRAIN_QUEUE"] = args.queue
    s = WorkerSettings()
    if s.concurrency > 1 and worker_devices(s.worker_gpus):
        # every job of a worker is given all its devices: two at once would share them
        print(
            f"posttrain worker: POSTTRAIN_CONCURRENCY={s.concurrency} on a worker with GPUs "
            "would run jobs on the same devices; start one worker per set of GPUs "
            "(--gpus) with concurrency 1",
            file=sys.stderr,
        )
        return 2
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


def _inference(args: argparse.Namespace) -> int:
    import logging
    import os

    # flags are the settings' environment variables, like the training worker's
    for flag, env in (
        ("engine", "POSTTRAIN_INFERENCE_ENGINE"),
        ("host", "POSTTRAIN_INFERENCE_HOST"),
        ("port", "POSTTRAIN_INFERENCE_PORT"),
        ("queue", "POSTTRAIN_INFERENCE_QUEUE"),
        ("device", "POSTTRAIN_INFERENCE_DEVICE"),
        ("gpus", "POSTTRAIN_INFERENCE_GPUS"),
        ("name", "POSTTRAIN_INFERENCE_NAME"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call otherwise
    from workers.inference.main import run

    return run()


def _csv(text: str) -> list[str]:
    return [q.strip() for q in text.split(",") if q.strip()]


# the key-file fields ``posttrain keys add`` sets, with the flag that sets each
_ENTRY_FLAGS = {
    "admin": "--admin",
    "max_active_jobs": "--max-active-jobs",
    "max_concurrent_eval_runs": "--max-concurrent-eval-runs",
    "queues": "--queues",
    "tool_allowed_networks": "--tool-allowed-networks",
    "tool_url_prefixes": "--tool-url-prefixes",
}


def _keys_add(args: argparse.Namespace) -> int:
    """Make a new key for tenant NAME: print it once, and its key-file entry.

    The entry is checked by the key file's own model before anything is written or printed,
    so a value the API would refuse at start is refused here, naming its flag."""
    import json
    import secrets
    from pathlib import Path

    from pydantic import ValidationError

    from service.auth import TENANT_NAME, KeyFile, hash_key, read_key_file

    def fail(message: str) -> int:
        print(f"posttrain keys add: {message}", file=sys.stderr)
        return 2

    if not TENANT_NAME.match(args.name):
        return fail(f"'{args.name}' is not a valid tenant name")
    fields: dict = {}
    for field in _ENTRY_FLAGS:
        value = getattr(args, field)
        if value is None or value is False:
            continue
        fields[field] = _csv(value) if isinstance(value, str) else value
    key = "pt-" + secrets.token_urlsafe(32)
    digest = hash_key(key)
    path = Path(args.file) if args.file else None
    if path is not None and path.suffix != ".json":
        return fail("--file updates a .json key file; for TOML, paste the entry printed "
                    "without --file")  # fmt: skip
    data = json.loads(path.read_text()) if path and path.exists() else {"tenants": {}}
    entry = data.setdefault("tenants", {}).setdefault(args.name, {"keys": []})
    entry["keys"].append(digest)
    entry.update(fields)
    try:
        KeyFile.model_validate({"tenants": {args.name: entry}})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"][2:]  # ("tenants", NAME, field, ...)
        flag = _ENTRY_FLAGS.get(str(loc[0]), ".".join(map(str, loc))) if loc else args.name
        return fail(f"{flag}: {err['msg'].removeprefix('Value error, ')}")
    if path is not None:
        tmp = path.with_name(f".{path.stem}.tmp.json")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        read_key_file(tmp)  # the whole file, as the API will read it
        tmp.replace(path)
        print(f"added a key for tenant '{args.name}' to {path}; restart the API to use it",
              file=sys.stderr)  # fmt: skip
    else:
        # TOML's values for these types are written as JSON writes them
        lines = [f"[tenants.{args.name}]"]
        lines += [f"{name} = {json.dumps(value)}" for name, value in entry.items()]
        print("add to the TOML key file (POSTTRAIN_API_KEYS_FILE):", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)
    print("the key (shown once; only its sha256 is stored):", file=sys.stderr)
    print(key)
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    """Print the sha256 hex of each key read from stdin (one a line), for the key file."""
    from service.auth import hash_key

    for line in sys.stdin:
        if line.strip():
            print(hash_key(line.strip()))
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    from service.healthcheck import run

    return run(args.service)


def _tiny_model(args: argparse.Namespace) -> int:
    """Built by ``python -m trainers.tiny_model`` in a child: this process never loads torch."""
    cmd = [sys.executable, "-m", "trainers.tiny_model", str(args.dir), "--seed", str(args.seed)]
    return subprocess.run(cmd, check=False).returncode


def _demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(keep_running=args.keep_running)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Self-hosted LLM post-training.")
    p.add_argument("--version", action="version", version=f"posttrain {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without API keys on a non-loopback address (POSTTRAIN_INSECURE_NO_AUTH=1)",
    )
    serve.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="make API keys for the key file").add_subparsers(
        dest="keys_command", required=True
    )
    add = keys.add_parser("add", help="new key for tenant NAME: print it and its entry")
    add.add_argument("name")
    add.add_argument("--file", help="add the key's hash to this JSON key file")
    add.add_argument("--admin", action="store_true", help="the tenant sees every tenant's data")
    add.add_argument("--max-active-jobs", type=int, help="quota of non-terminal jobs")
    add.add_argument(
        "--max-concurrent-eval-runs",
        type=int,
        help="eval runs graded at once (0 = no limit; default POSTTRAIN_EVAL_RUNS_PER_TENANT)",
    )
    add.add_argument("--queues", help="comma-separated worker queues the tenant may use")
    add.add_argument(
        "--tool-allowed-networks",
        help="comma-separated non-public CIDRs the tenant's tools, environments and endpoint "
        "graders may reach",
    )
    add.add_argument(
        "--tool-url-prefixes",
        help="comma-separated prefixes the tenant's tool, environment and grader URLs must have",
    )
    add.set_defaults(func=_keys_add)
    hsh = keys.add_parser("hash", help="print the sha256 of each key read from stdin")
    hsh.set_defaults(func=_keys_hash)
    worker = sub.add_parser("worker", help="run a Celery training worker (one job at a time)")
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--hostname")
    worker.add_argument(
        "--gpus",
        help="the worker's devices, e.g. 0,1 (every training process sees exactly these); "
        "'' = CPU-only; default POSTTRAIN_WORKER_GPUS, else every GPU nvidia-smi lists",
    )
    worker.add_argument("--queue", help="the queue (GPU class) to consume; default POSTTRAIN_QUEUE")
    worker.set_defaults(func=_worker)
    inf = sub.add_parser(
        "inference", help="run an inference worker: an engine for chat and completion requests"
    )
    inf.add_argument("--engine", choices=["transformers", "vllm"], help="default transformers")
    inf.add_argument("--host", help="address of the worker's front (default 127.0.0.1)")
    inf.add_argument("--port", type=int, help="port of the worker's front (default 8100)")
    inf.add_argument("--queue", help="inference queue (class) to serve")
    inf.add_argument("--device", help="transformers serve's device (auto, cpu, cuda:0)")
    inf.add_argument("--gpus", help="CUDA_VISIBLE_DEVICES of the engines")
    inf.add_argument("--name", help="worker name in the registry")
    inf.add_argument("--log-level", default="info")
    inf.set_defaults(func=_inference)
    health = sub.add_parser(
        "healthcheck", help="probe the api, worker or inference service of this host (exit 0: ok)"
    )
    health.add_argument("service", choices=["api", "worker", "inference"])
    health.set_defaults(func=_healthcheck)
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
    add_client_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
