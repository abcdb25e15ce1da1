"""A small client of posttrain's HTTP API, for the CLI's job commands and the demo.

It speaks HTTP only (never Redis), so it works from any machine that can reach the API.
Where it finds the server and the key, first match wins:

* ``--base-url`` on the command line, else ``POSTTRAIN_BASE_URL``, else ``base_url`` in
  the config file, else ``http://127.0.0.1:8000``. A trailing ``/v1`` is accepted.
* ``POSTTRAIN_API_KEY``, else ``OPENAI_API_KEY`` (what the ``openai`` SDK reads), else
  ``api_key`` in the config file; none is fine for a server without keys.
* The config file is ``POSTTRAIN_CONFIG`` if set, else
  ``$XDG_CONFIG_HOME/posttrain/config.toml`` (``~/.config/posttrain/config.toml``)::

      base_url = "https://posttrain.example.org"
      api_key = "pt-..."

An answer that is not a success raises ``ApiError`` with the API's own message, and a
server that cannot be reached raises ``Unreachable``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from tqdm import tqdm

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
JOB_ENDS = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The API answered with an error: its status and OpenAI-shaped error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __str__(self) -> str:
        extra = ", ".join(f"{k}: {v}" for k, v in (("param", self.param), ("code", self.code)) if v)
        return f"{self.message} (HTTP {self.status}{', ' + extra if extra else ''})"


class Unreachable(Exception):
    """The API could not be reached at all."""


class ConfigError(Exception):
    """The config file cannot be read."""


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str | None


def config_path() -> Path:
    if os.environ.get("POSTTRAIN_CONFIG"):
        return Path(os.environ["POSTTRAIN_CONFIG"])
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "posttrain" / "config.toml"


def load_config(base_url: str | None = None) -> Config:
    """The server and key, from the command line, the environment and the config file."""
    path, stored = config_path(), {}
    if path.is_file():
        try:
            stored = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    url = (
        base_url
        or os.environ.get("POSTTRAIN_BASE_URL")
        or stored.get("base_url")
        or DEFAULT_BASE_URL
    )
    key = (
        os.environ.get("POSTTRAIN_API_KEY")
        or os.environ.get("OPENAI_API_KEY")
        or stored.get("api_key")
    )
    url = str(url).rstrip("/").removesuffix("/v1")
    return Config(base_url=url, api_key=str(key) if key else None)


class ProgressReader(io.RawIOBase):
    """A file object that advances a progress bar as it is read (an upload's body)."""

    def __init__(self, fh: BinaryIO, bar: tqdm):
        self._fh, self._bar = fh, bar

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self._bar.update(len(chunk))
        return chunk

    def fileno(self) -> int:  # httpx reads the length from fstat
        return self._fh.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()


def _report_rows(rows: list[dict], up_to: float, on_metrics) -> int | None:
    """Report (and take off ``rows``) the rows up to step ``up_to``; the last one's step."""
    last = None
    while rows and rows[0]["step"] <= up_to:
        row = rows.pop(0)
        on_metrics(row)
        last = row["step"]
    return last


class Client:
    """The API's ``/v1`` routes as methods returning the decoded JSON bodies."""

    def __init__(self, config: Config, timeout: float = 60.0, progress: bool = True):
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.base_url = config.base_url
        self.progress = progress
        self.http = httpx.Client(base_url=f"{config.base_url}/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # ---- plumbing
    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the API at {self.base_url}: {exc}") from None
        check(resp)
        return resp.json()

    def pages(self, path: str, limit: int = 100, **params: Any) -> Iterator[dict]:
        """Every item of an OpenAI-style list, following ``after`` cursors."""
        after = None
        while True:
            body = self.request("GET", path, params={**params, "limit": limit, "after": after})
            yield from body["data"]
            if not body.get("has_more") or not body["data"]:
                return
            after = body["data"][-1]["id"]

    def _bar(self, total: int | None, desc: str) -> tqdm:
        return tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not self.progress,
            dynamic_ncols=True,
        )

    # ---- files
    def upload(self, path: Path, purpose: str) -> dict:
        with open(path, "rb") as fh, self._bar(path.stat().st_size, f"upload {path.name}") as bar:
            files = {"file": (path.name, ProgressReader(fh, bar))}
            return self.request("POST", "/files", files=files, data={"purpose": purpose})

    # ---- jobs
    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/fine_tuning/jobs/{job_id}")

    def events_since(self, job_id: str, last: str | None) -> list[dict]:
        """The job's events newer than the event id ``last`` (all if None), oldest first."""
        new: list[dict] = []
        for event in self.pages(f"/fine_tuning/jobs/{job_id}/events"):  # newest first
            if last is not None and _event_key(event["id"]) <= _event_key(last):
                break
            new.append(event)
        return new[::-1]

    def metrics_since(self, job_id: str, after: int | None) -> list[dict]:
        """The job's per-step metrics after step ``after`` (all if None), oldest first."""
        rows: list[dict] = []
        while True:
            params = {"limit": 1000, **({"after": after} if after is not None else {})}
            body = self.request("GET", f"/fine_tuning/jobs/{job_id}/metrics", params=params)
            rows.extend(body["data"])
            if not body.get("has_more") or not body["data"]:
                return rows
            after = body["data"][-1]["step"]

    def follow(
        self,
        job_id: str,
        on_event: Callable[[dict], None],
        on_metrics: Callable[[dict], None] | None = None,
        poll: float = 1.0,
        follow: bool = True,
    ) -> dict:
        """Report the job's events (and metrics rows) as they arrive; with ``follow``
        until the job ends, else once. The job as it was last read.

        Rows carry a step and no time, so they are put among the events by the
        ``metrics`` events the worker writes beside some steps' rows (always step 1 and
        the last): a metrics event for step k is reported after every row up to k, so
        "Training for N steps" comes before step 1's row and a checkpoint's event after
        its step's row. Rows past the newest such event follow the poll's events."""
        last_event: str | None = None
        last_step: int | None = None
        while True:
            job = self.job(job_id)  # read first: what follows is complete up to its status
            rows = [] if on_metrics is None else self.metrics_since(job_id, last_step)
            for event in self.events_since(job_id, last_event):
                data = event.get("data")
                if event.get("type") == "metrics" and isinstance(data, dict) and "step" in data:
                    last_step = _report_rows(rows, data["step"], on_metrics) or last_step
                on_event(event)
                last_event = event["id"]
            last_step = _report_rows(rows, float("inf"), on_metrics) or last_step
            if not follow or job["status"] in JOB_ENDS:
                return job
            time.sleep(poll)

    def checkpoint_of(self, ref: str) -> tuple[str, dict]:
        """The job and checkpoint a reference names: a job id or fine-tuned model name
        (its newest checkpoint, the final one of a finished job) or a checkpoint id."""
        step = None
        if ref.startswith("ft:"):  # ft:<base>:<suffix>:<job>, or <...>:<job>:ckpt-step-<n>
            parts = ref.split(":")
            if parts[-1].startswith("ckpt-step-") and parts[-1][10:].isdigit():
                step, parts = int(parts[-1][10:]), parts[:-1]
            ref = parts[-1]
        if step is not None:
            for ckpt in self.pages(f"/fine_tuning/jobs/{ref}/checkpoints"):
                if ckpt["step_number"] == step:
                    return ref, ckpt
            raise ApiError(404, f"job {ref} has no checkpoint at step {step}", "checkpoint", None)
        if ref.startswith("ftckpt-"):
            for job in self.pages("/fine_tuning/jobs"):
                for ckpt in self.pages(f"/fine_tuning/jobs/{job['id']}/checkpoints"):
                    if ckpt["id"] == ref:
                        return job["id"], ckpt
            raise ApiError(404, f"no checkpoint '{ref}' among your jobs", "checkpoint", None)
        data = self.request("GET", f"/fine_tuning/jobs/{ref}/checkpoints", params={"limit": 1})
        if not data["data"]:
            raise ApiError(404, f"job {ref} has no checkpoint yet", "job", "no_checkpoint")
        return ref, data["data"][0]

    def download(self, job_id: str, ckpt: dict, dest: Path, keep_tar: bool = False) -> Path:
        """Stream a checkpoint's tar with a progress bar; unpack it under ``dest``
        (``dest/<job>-step-<n>``) or, with ``keep_tar``, save ``dest/<job>-step-<n>.tar``.
        What was written."""
        dest.mkdir(parents=True, exist_ok=True)
        name = f"{job_id}-step-{ckpt['step_number']}"
        part = dest / f".{name}.tar.part"
        url = f"/fine_tuning/jobs/{job_id}/checkpoints/{ckpt['id']}/content"
        try:
            with self.http.stream("GET", url) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    check(resp)
                size = int(resp.headers.get("content-length") or 0) or None
                with open(part, "wb") as out, self._bar(size, f"download {name}") as bar:
                    for chunk in resp.iter_bytes(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except httpx.TransportError as exc:
            part.unlink(missing_ok=True)
            raise Unreachable(f"the download from {self.base_url} broke off: {exc}") from None
        if keep_tar:
            return part.rename(dest / f"{name}.tar")
        try:
            with tarfile.open(part) as tar:
                tar.extractall(dest, filter="data")
        finally:
            part.unlink(missing_ok=True)
        return dest / name

    # ---- chat
    def chat_stream(self, body: dict) -> Iterator[str]:
        """The text of a streamed chat completion, piece by piece."""
        try:
            with self.http.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code >= 400:
                    r.read()
                    check(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        err = chunk["error"]
                        raise ApiError(
                            500, err.get("message", "stream error"), None, err.get("code")
                        )
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the API at {self.base_url}: {exc}") from None


def check(resp: httpx.Response) -> None:
    """``ApiError`` with the API's message for an answer that is not a success."""
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        raise ApiError(resp.status_code, str(err["message"]), err.get("param"), err.get("code"))
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip()[:300] or resp.reason_phrase
        raise ApiError(resp.status_code, text) from None


def _event_key(event_id: str) -> tuple[int, int]:
    """An event id (``ftevent-<ms>-<seq>``, a Redis stream id) as a sortable pair."""
    ms, _, seq = event_id.removeprefix("ftevent-").partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)
