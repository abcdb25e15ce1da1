"""The CLI's client commands: files, jobs, logs, download and chat over the HTTP API.

Each command talks to the API through ``service.client`` (never to Redis), so it runs on
any machine that reaches the server. Exit codes: 0 done; 1 the API refused (its message
is printed); 2 a usage error (argparse); 3 the API could not be reached or the config
file could not be read; 4 ``jobs create --follow``/``logs -f`` saw the job fail or be
cancelled; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.client import ApiError, Client, ConfigError, Unreachable, load_config
from trainers.contract.methods import DEFAULT_METHOD

EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_JOB_FAILED = 1, 2, 3, 4


class UsageError(Exception):
    """A command line the API would not understand (checked before anything is sent)."""


def _client(args: argparse.Namespace) -> Client:
    return Client(load_config(args.base_url), progress=not args.no_progress)


def _run(handler):
    """Wrap a command: the API's errors become a message on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            client = _client(args)
        except ConfigError as exc:
            print(f"posttrain: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        try:
            return handler(client, args) or 0
        except ApiError as exc:
            print(f"posttrain: error: {exc}", file=sys.stderr)
            return EXIT_API
        except UsageError as exc:
            print(f"posttrain: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except Unreachable as exc:
            print(f"posttrain: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except KeyboardInterrupt:
            return 130
        finally:
            client.close()

    return run


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _when(ts: Any) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(ts)))


def _table(rows: list[dict], columns: list[tuple[str, Any]]) -> None:
    """Rows as aligned columns; each column is (header, key or function of the row)."""
    cells = [
        [
            str(get(r) if callable(get) else (r.get(get) if r.get(get) is not None else "-"))
            for _, get in columns
        ]
        for r in rows
    ]
    heads = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    for line in [heads, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


# ---- files
def _files_upload(c: Client, a: argparse.Namespace) -> None:
    f = c.upload(Path(a.path), a.purpose)
    _print_json(f) if a.json else print(f["id"])


def _files_list(c: Client, a: argparse.Namespace) -> None:
    params = {"purpose": a.purpose} if a.purpose else {}
    files = c.request("GET", "/files", params={**params, "limit": a.limit})["data"]
    if a.json:
        return _print_json(files)
    _table(
        files,
        [
            ("ID", "id"),
            ("PURPOSE", "purpose"),
            ("BYTES", "bytes"),
            ("CREATED", lambda f: _when(f.get("created_at"))),
            ("FILENAME", "filename"),
        ],
    )


def _files_get(c: Client, a: argparse.Namespace) -> None:
    _print_json(c.request("GET", f"/files/{a.file_id}"))


def _files_delete(c: Client, a: argparse.Namespace) -> None:
    body = c.request("DELETE", f"/files/{a.file_id}")
    print(f"deleted {body['id']}" if body.get("deleted") else json.dumps(body))


# ---- jobs
def _value(text: str) -> Any:
    """A hyperparameter's value: JSON where it parses (numbers, true, "auto"), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def job_request(a: argparse.Namespace, upload) -> dict:
    """The body ``jobs create`` sends: ``--body`` (a JSON file, ``-`` for stdin) with the
    flags laid over it; a training or validation file that is a local path is uploaded
    first (``upload(path) -> file id``)."""
    body: dict[str, Any] = {}
    if a.body:
        text = sys.stdin.read() if a.body == "-" else Path(a.body).read_text()
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise UsageError("--body must hold a JSON object (the job request)")
    for flag, key in (("model", "model"), ("suffix", "suffix"), ("seed", "seed")):
        if getattr(a, flag) is not None:
            body[key] = getattr(a, flag)
    for flag in ("training_file", "validation_file"):
        ref = getattr(a, flag)
        if ref is not None:
            body[flag] = upload(Path(ref)) if Path(ref).is_file() else ref
    if a.method or a.hyperparameter:
        method = body.setdefault("method", {})
        kind = a.method or method.get("type") or DEFAULT_METHOD
        method["type"] = kind
        block = method.setdefault(kind, {})
        hp = block.setdefault("hyperparameters", {})
        for pair in a.hyperparameter or []:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"-p takes KEY=VALUE, not '{pair}'")
            hp[key] = _value(value)
    for field in ("model", "training_file"):
        if field not in body:
            raise UsageError(f"a job needs --{field.replace('_', '-')} (or {field} in --body)")
    return body


def _jobs_create(c: Client, a: argparse.Namespace) -> int:
    def upload(path: Path) -> str:
        f = c.upload(path, "fine-tune")
        print(f"uploaded {path} -> {f['id']}", file=sys.stderr)
        return f["id"]

    job = c.request("POST", "/fine_tuning/jobs", json=job_request(a, upload))
    _print_json(job) if a.json else print(job["id"])
    if a.follow:
        return _follow(c, job["id"], follow=True, metrics=True, poll=a.poll)
    return 0


def _jobs_list(c: Client, a: argparse.Namespace) -> None:
    jobs = c.request("GET", "/fine_tuning/jobs", params={"limit": a.limit})["data"]
    if a.json:
        return _print_json(jobs)
    _table(
        jobs,
        [
            ("ID", "id"),
            ("STATUS", "status"),
            ("METHOD", lambda j: (j.get("method") or {}).get("type", "-")),
            ("MODEL", "model"),
            ("CREATED", lambda j: _when(j.get("created_at"))),
            ("FINE-TUNED MODEL", "fine_tuned_model"),
        ],
    )


def _jobs_get(c: Client, a: argparse.Namespace) -> None:
    _print_json(c.job(a.job_id))


def _jobs_action(action: str):
    def act(c: Client, a: argparse.Namespace) -> None:
        if action == "delete":
            body = c.request("DELETE", f"/fine_tuning/jobs/{a.job_id}")
            print(f"deleted {a.job_id}" if body.get("deleted", True) else json.dumps(body))
            return
        job = c.request("POST", f"/fine_tuning/jobs/{a.job_id}/{action}")
        print(f"{job['id']}: {job['status']}")

    return act


# ---- logs
def _metrics_line(row: dict) -> str:
    step = row.get("step")
    total = row.get("total_steps")
    values = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k not in ("step", "total_steps", "object") and not isinstance(v, (dict, list))
    )
    return f"step {step}{f'/{total}' if total else ''}  {values}"


def _follow(c: Client, job_id: str, follow: bool, metrics: bool, poll: float) -> int:
    def on_event(e: dict) -> None:
        if metrics and e.get("type") == "metrics":
            return  # the metrics rows below say the same, every step
        level = e.get("level", "info")
        mark = "" if level == "info" else f"[{level}] "
        print(f"{_when(e['created_at'])}  {mark}{e['message']}", flush=True)

    def on_metrics(row: dict) -> None:
        print(_metrics_line(row), flush=True)

    job = c.follow(job_id, on_event, on_metrics if metrics else None, poll=poll, follow=follow)
    if follow:
        print(f"{job_id}: {job['status']}", file=sys.stderr)
        if job["status"] in ("failed", "cancelled"):
            if job.get("error"):
                print(f"posttrain: {json.dumps(job['error'])}", file=sys.stderr)
            return EXIT_JOB_FAILED
    return 0


def _logs(c: Client, a: argparse.Namespace) -> int:
    return _follow(c, a.job_id, follow=a.follow, metrics=not a.no_metrics, poll=a.poll)


# ---- download
def _download(c: Client, a: argparse.Namespace) -> None:
    job_id, ckpt = c.checkpoint_of(a.ref)
    out = c.download(job_id, ckpt, Path(a.output), keep_tar=a.tar)
    print(out)


# ---- chat
def _chat(c: Client, a: argparse.Namespace) -> None:
    messages: list[dict[str, str]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    params: dict[str, Any] = {"model": a.model}
    if a.temperature is not None:
        params["temperature"] = a.temperature
    if a.max_tokens is not None:
        params["max_tokens"] = a.max_tokens

    def ask(text: str) -> None:
        messages.append({"role": "user", "content": text})
        answer = []
        for piece in c.chat_stream({**params, "messages": messages}):
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})

    if a.message is not None:
        return ask(a.message)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            ask(line.rstrip("\n"))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The client commands, added to the ``posttrain`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        help="the API's address (default: POSTTRAIN_BASE_URL, the config file, "
        "http://127.0.0.1:8000); the key comes from POSTTRAIN_API_KEY, OPENAI_API_KEY "
        "or the config file (POSTTRAIN_CONFIG, ~/.config/posttrain/config.toml)",
    )
    common.add_argument("--no-progress", action="store_true", help="draw no progress bars")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON objects")

    def command(parent, name, help_, func, parents=(common,)):
        p = parent.add_parser(name, help=help_, description=help_, parents=list(parents))
        p.set_defaults(func=_run(func))
        return p

    files = sub.add_parser("files", help="upload, list, show and delete files").add_subparsers(
        dest="files_command", required=True, metavar="{upload,list,get,delete}"
    )
    p = command(files, "upload", "upload a JSONL file; print its id", _files_upload)
    p.add_argument("path", help="the file to upload")
    p.add_argument("--purpose", default="fine-tune", help="fine-tune (default) or evals")
    p.add_argument("--json", action="store_true", help="print the file object")
    p = command(files, "list", "list your files, newest first", _files_list, (common, listing))
    p.add_argument("--purpose", help="only files of this purpose")
    p = command(files, "get", "show one file object", _files_get)
    p.add_argument("file_id")
    p = command(files, "delete", "delete a file", _files_delete)
    p.add_argument("file_id")

    jobs = sub.add_parser("jobs", help="create, list, show and steer fine-tuning jobs")
    jobs = jobs.add_subparsers(
        dest="jobs_command",
        required=True,
        metavar="{create,list,get,cancel,pause,resume,delete}",
    )
    p = command(jobs, "create", "create a fine-tuning job; print its id", _jobs_create)
    p.add_argument("--model", help="base model (a name the server allows) or ft: model")
    p.add_argument("--training-file", help="a file id, or a local JSONL file to upload first")
    p.add_argument("--validation-file", help="a file id, or a local JSONL file to upload first")
    p.add_argument("--method", help="supervised (default), dpo, grpo, ... (README: Methods)")
    p.add_argument(
        "-p",
        "--hyperparameter",
        action="append",
        metavar="KEY=VALUE",
        help="a hyperparameter of the method (repeatable), e.g. -p n_epochs=3",
    )
    p.add_argument("--suffix", help="suffix of the fine-tuned model's name")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument(
        "--body",
        metavar="FILE",
        help="a JSON job request ('-' reads stdin) for every other field; flags override it",
    )
    p.add_argument("--follow", action="store_true", help="then show its logs until it ends")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls (--follow)")
    p.add_argument("--json", action="store_true", help="print the job object")
    command(jobs, "list", "list your jobs, newest first", _jobs_list, (common, listing))
    for name, help_, func in (
        ("get", "show one job object", _jobs_get),
        ("cancel", "cancel a job", _jobs_action("cancel")),
        ("pause", "pause a running job (it keeps its place)", _jobs_action("pause")),
        ("resume", "resume a paused job", _jobs_action("resume")),
        ("delete", "delete a finished job and its checkpoints", _jobs_action("delete")),
    ):
        command(jobs, name, help_, func).add_argument("job_id")

    p = command(sub, "logs", "print a job's events and metrics", _logs)
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--no-metrics", action="store_true", help="events only, no per-step metrics")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls with -f")

    p = command(
        sub,
        "download",
        "download a checkpoint (a job's newest, i.e. its final model once done) and unpack it",
        _download,
    )
    p.add_argument("ref", help="a job id, a checkpoint id (ftckpt-...) or an ft: model name")
    p.add_argument("-o", "--output", default=".", help="directory to unpack into (default .)")
    p.add_argument("--tar", action="store_true", help="keep the tar file, do not unpack")

    p = command(sub, "chat", "chat with a base or fine-tuned model (reads lines from stdin)", _chat)
    p.add_argument("model", help="a base model, an ft: model or a checkpoint")
    p.add_argument("-m", "--message", help="send one message, print the answer and exit")
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
