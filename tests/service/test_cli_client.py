"""The ``posttrain`` client commands against the real API process (no worker: jobs stay
queued here; tests/e2e/test_cli.py follows and downloads a job a worker trains).

Every command runs as its own process, the way a user types it, with the key in the
environment or a config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser
from tests.service.liveapi import KEY, free_port, start_live_api

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    api = start_live_api(tmp_path_factory.mktemp("cli"))
    yield api
    api.stop()


@pytest.fixture
def env(live, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    out = {k: v for k, v in os.environ.items() if not k.startswith(("POSTTRAIN_", "OPENAI_"))}
    return {
        **out,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "POSTTRAIN_BASE_URL": live.base_url,
        "POSTTRAIN_API_KEY": KEY,
    }


def cli(env, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(env, *args: str, stdin: str | None = None) -> str:
    proc = cli(env, *args, stdin=stdin)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text((json.dumps(CHAT) + "\n") * 3)
    return path


def test_version_and_help_on_every_command(env):
    assert ok(env, "--version").strip() == "posttrain 0.1.0"
    seen = []

    def walk(parser, path):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    assert helps.get(name), f"{' '.join([*path, name])} has no help"
                    walk(sub, [*path, name])
        seen.append(path)

    walk(build_parser(), [])
    assert ["jobs", "create"] in seen and ["logs"] in seen and ["chat"] in seen
    text = ok(env, "jobs", "create", "--help")
    assert "--training-file" in text and "-p KEY=VALUE" in text


def test_files_upload_list_get_delete(env, data):
    file_id = ok(env, "files", "upload", str(data), "--no-progress").strip()
    assert file_id.startswith("file-")
    listing = ok(env, "files", "list")
    assert listing.splitlines()[0].split() == ["ID", "PURPOSE", "BYTES", "CREATED", "FILENAME"]
    assert any(line.startswith(file_id) and "train.jsonl" in line for line in listing.splitlines())
    as_json = json.loads(ok(env, "files", "list", "--json"))
    assert any(f["id"] == file_id and f["bytes"] == data.stat().st_size for f in as_json)
    shown = json.loads(ok(env, "files", "get", file_id))
    assert shown["filename"] == "train.jsonl" and shown["purpose"] == "fine-tune"
    assert ok(env, "files", "delete", file_id).strip() == f"deleted {file_id}"
    gone = cli(env, "files", "get", file_id)
    assert gone.returncode == 1 and file_id in gone.stderr and "HTTP 404" in gone.stderr


def test_upload_progress_bar_counts_the_bytes(env, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text((json.dumps(CHAT) + "\n") * 20000)
    proc = cli(env, "files", "upload", str(big))
    assert proc.returncode == 0, proc.stderr
    bar = proc.stderr.replace("\r", "\n").splitlines()
    assert any("upload big.jsonl" in line and "100%" in line for line in bar), proc.stderr


def test_jobs_create_from_a_local_file_then_steer_it(env, data, live):
    proc = cli(
        env,
        "jobs",
        "create",
        "--model",
        "tiny",
        "--training-file",
        str(data),
        "-p",
        "n_epochs=2",
        "-p",
        "learning_rate_multiplier=0.5",
        "--suffix",
        "cli",
        "--seed",
        "7",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.startswith("ftjob-") and "uploaded" in proc.stderr
    job = json.loads(ok(env, "jobs", "get", job_id))
    assert job["method"]["type"] == "supervised" and job["seed"] == 7
    hp = job["method"]["supervised"]["hyperparameters"]
    assert hp["n_epochs"] == 2 and hp["learning_rate_multiplier"] == 0.5
    assert job["training_file"].startswith("file-") and job["suffix"] == "cli"
    listing = ok(env, "jobs", "list").splitlines()
    assert listing[0].split()[:3] == ["ID", "STATUS", "METHOD"]
    assert any(line.startswith(job_id) and " queued " in f" {line} " for line in listing)
    events = ok(env, "logs", job_id)
    assert "Validating training file" in events or "queued" in events.lower(), events
    assert ok(env, "jobs", "cancel", job_id).strip() == f"{job_id}: cancelled"
    assert ok(env, "jobs", "delete", job_id).strip() == f"deleted {job_id}"
    assert cli(env, "jobs", "get", job_id).returncode == 1


def test_a_body_file_with_flags_over_it(env, data, tmp_path):
    file_id = ok(env, "files", "upload", str(data), "--no-progress").strip()
    body = tmp_path / "job.json"
    body.write_text(
        json.dumps(
            {
                "model": "other",
                "training_file": file_id,
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                "metadata": {"team": "cli"},
            }
        )
    )
    proc = cli(env, "jobs", "create", "--body", str(body), "--model", "tiny", "--json")
    # the data is chat rows, not preference pairs: the API names the problem
    assert proc.returncode == 1 and "HTTP 400" in proc.stderr, proc.stderr
    body.write_text(json.dumps({"model": "tiny", "training_file": file_id}))
    job = json.loads(ok(env, "jobs", "create", "--body", "-", "--json", stdin=body.read_text()))
    assert job["model"] == "tiny" and job["status"] in ("validating_files", "queued")
    ok(env, "jobs", "cancel", job["id"])


def test_api_errors_exit_1_with_the_message(env):
    proc = cli(env, "jobs", "get", "ftjob-nope")
    assert proc.returncode == 1
    assert "ftjob-nope" in proc.stderr and "HTTP 404" in proc.stderr
    proc = cli(env, "jobs", "create", "--model", "tiny", "--training-file", "file-missing")
    assert proc.returncode == 1 and "file-missing" in proc.stderr
    proc = cli(env, "jobs", "create", "--model", "tiny")
    assert proc.returncode == 2 and "--training-file" in proc.stderr
    proc = cli(env, "jobs", "create", "--model", "tiny", "--training-file", "f", "-p", "x")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_a_wrong_key_is_the_apis_401(env):
    proc = cli({**env, "POSTTRAIN_API_KEY": "wrong"}, "jobs", "list")
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr


def test_config_file_and_environment(env, tmp_path):
    config = Path(env["XDG_CONFIG_HOME"]) / "posttrain" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'base_url = "{env["POSTTRAIN_BASE_URL"]}/v1"\napi_key = "{KEY}"\n')
    bare = {k: v for k, v in env.items() if k not in ("POSTTRAIN_BASE_URL", "POSTTRAIN_API_KEY")}
    assert ok(bare, "jobs", "list", "--json").startswith("[")
    # the environment wins over the file, the command line over both
    dead = f"http://127.0.0.1:{free_port()}"
    proc = cli({**bare, "POSTTRAIN_BASE_URL": dead}, "jobs", "list")
    assert proc.returncode == 3 and "cannot reach the API" in proc.stderr and dead in proc.stderr
    assert (
        cli(
            {**bare, "POSTTRAIN_BASE_URL": dead},
            "jobs",
            "list",
            "--base-url",
            env["POSTTRAIN_BASE_URL"],
        ).returncode
        == 0
    )
    config.write_text("base_url = [")
    proc = cli(bare, "jobs", "list")
    assert proc.returncode == 3 and "config file" in proc.stderr and str(config) in proc.stderr


def test_download_of_a_job_without_checkpoints_names_it(env, data):
    file_id = ok(env, "files", "upload", str(data), "--no-progress").strip()
    job_id = ok(env, "jobs", "create", "--model", "tiny", "--training-file", file_id).strip()
    proc = cli(env, "download", job_id)
    assert proc.returncode == 1 and f"job {job_id} has no checkpoint yet" in proc.stderr
    proc = cli(env, "download", "ftckpt-unknown")
    assert proc.returncode == 1 and "ftckpt-unknown" in proc.stderr
    ok(env, "jobs", "cancel", job_id)
