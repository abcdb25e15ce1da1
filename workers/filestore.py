"""Uploaded files: bytes on the data volume, metadata in Redis.

  file:{id}   hash: filename, bytes, purpose, created_at, status, format, formats, rows,
              extra_fields, tenant (the owner; absent on older records = the default tenant)
              expires_at (only when the upload set ``expires_after``)
  files       sorted set of file ids by creation time
  files:expiry  sorted set of the ids of files that expire, by ``expires_at``

A file is written to a temporary name, validated, then renamed into place, so a
half-uploaded or invalid file never becomes visible to a job; if its record then
cannot be written, the renamed file is removed again (no file without a record).
A file past its ``expires_at`` is deleted when it is next read, and by
``sweep_expired``, which the API runs periodically.

Removing bytes from the data volume is tried a few times and never reported done when
it was not: ``RemovalFailed`` names what stayed, and the record that points at the
bytes is kept so the deletion can be retried.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import redis

from trainers.contract.jobdir import JobDir
from workers.processes import alive
from workers.store import DEFAULT_TENANT, new_id

log = logging.getLogger("posttrain.files")


class FileNotFound(KeyError):
    pass


class RemovalFailed(OSError):
    """Paths under the data directory that could not be removed, with the reasons."""

    def __init__(self, what: str, failures: list[tuple[str, str]]):
        self.what, self.failures = what, failures
        first, reason = failures[0]
        more = f" and {len(failures) - 1} more" if len(failures) > 1 else ""
        super().__init__(f"could not remove {what}: {first}{more}: {reason}")


def remove_tree(path: Path, data_dir: Path, what: str, attempts: int = 3) -> None:
    """Remove ``path`` (a file or a directory tree), retrying a failed removal; raise
    RemovalFailed naming the paths (relative to ``data_dir``) that stayed."""
    failures: list[tuple[str, str]] = []

    def note(_func, where, excinfo) -> None:
        exc = excinfo[1]
        # a parent left non-empty by its child's failure is a consequence, not a cause
        if not isinstance(exc, FileNotFoundError) and not (
            isinstance(exc, OSError) and exc.errno == errno.ENOTEMPTY and failures
        ):
            failures.append((_relative(Path(where), data_dir), _reason(exc)))

    for attempt in range(attempts):
        failures.clear()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, onerror=note)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                failures.append((_relative(path, data_dir), _reason(exc)))
        if not failures and not os.path.lexists(path):
            return
        if attempt + 1 < attempts:
            log.info(
                "Removal of %s failed (attempt %d of %d: %s); retrying",
                what, attempt + 1, attempts, failures[0] if failures else "still present",
            )  # fmt: skip
            time.sleep(0.1 * (attempt + 1))
    if not failures:  # rmtree reported nothing, yet the path is still there
        failures.append((_relative(path, data_dir), "still present after removal"))
    log.warning("Removal of %s failed after %d attempts: %s", what, attempts, failures)
    raise RemovalFailed(what, failures)


def _relative(path: Path, data_dir: Path) -> str:
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return path.name


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class FileStore:
    def __init__(self, client: redis.Redis, data_dir: Path, prefix: str = "posttrain:"):
        self.r = client
        self.p = prefix
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "files"

    def k_file(self, file_id: str) -> str:
        return f"{self.p}file:{file_id}"

    def writable(self) -> str | None:
        """None when the API can store uploads (a probe file is written to and removed
        from the files directory); otherwise the reason, for the log."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".ready-{os.getpid()}-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return f"{self.dir}: {_reason(exc)}"
        return None

    def staging_path(self) -> Path:
        """A fresh staging name that says which process wrote it (``remove_stale_staging``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f".upload-{os.getpid()}-{uuid.uuid4().hex}@{socket.gethostname()}"

    def remove_stale_staging(self, max_age: float = 86_400.0) -> list[Path]:
        """Delete staging files a killed API left behind: those of a process of this host
        that is gone, and any older than ``max_age`` s (another host's, or unnamed)."""
        removed = []
        host = socket.gethostname()
        for f in self.dir.glob(".upload-*") if self.dir.is_dir() else ():
            owner, _, where = f.name.removeprefix(".upload-").partition("@")
            pid = owner.split("-", 1)[0]
            try:
                stale = time.time() - f.stat().st_mtime > max_age
            except FileNotFoundError:
                continue
            if where == host and pid.isdigit() and not alive(int(pid)):
                stale = True
            if stale:
                f.unlink(missing_ok=True)
                removed.append(f)
        return removed

    def path(self, file_id: str) -> Path:
        return self.dir / f"{file_id}.jsonl"

    def commit(
        self,
        staged: Path,
        *,
        filename: str,
        purpose: str,
        formats: list[str],
        rows: int,
        extra_fields: list[str] = (),
        tenant: str = DEFAULT_TENANT,
        expires_after: int | None = None,
    ) -> dict:
        """Move a validated staged upload into place and record it.

        ``formats``: every row format all rows fit, most specific first (the first is
        the one shown as ``format``); ``extra_fields``: row fields beyond the format's
        own (graders may read them), so a job can check they exist without a rescan;
        ``expires_after``: seconds after creation at which the file is deleted.
        """
        file_id = new_id("file")
        final = self.path(file_id)
        os.replace(staged, final)
        try:
            return self._record(
                file_id,
                final,
                expires_after,
                filename=filename,
                purpose=purpose,
                formats=formats,
                rows=rows,
                extra_fields=extra_fields,
                tenant=tenant,
            )
        except BaseException:
            final.unlink(missing_ok=True)  # never a file on disk without its record
            raise

    def _record(
        self,
        file_id: str,
        final: Path,
        expires_after: int | None,
        *,
        filename: str,
        purpose: str,
        formats: list[str],
        rows: int,
        extra_fields: list[str],
        tenant: str,
    ) -> dict:
        now = int(time.time())
        meta = {
            "id": file_id,
            "filename": filename,
            "purpose": purpose,
            "bytes": final.stat().st_size,
            "created_at": now,
            "status": "processed",
            "format": formats[0],
            "formats": ",".join(formats),
            "rows": rows,
            "extra_fields": json.dumps(sorted(extra_fields)),
            "tenant": tenant,
        }
        if expires_after is not None:
            meta["expires_at"] = now + expires_after
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_file(file_id), mapping={k: str(v) for k, v in meta.items()})
        pipe.zadd(f"{self.p}files", {file_id: time.time()})
        if expires_after is not None:
            pipe.zadd(self.k_expiry(), {file_id: meta["expires_at"]})
        pipe.execute()
        return self.get(file_id)

    def k_expiry(self) -> str:
        return f"{self.p}files:expiry"

    def owner(self, file_id: str) -> str | None:
        """The file's tenant (the default tenant for older records), or None when there is
        no such file: one read of two short fields, whoever owns it."""
        tenant, name = self.r.hmget(self.k_file(file_id), "tenant", "filename")
        return None if name is None else tenant or DEFAULT_TENANT

    def get(self, file_id: str) -> dict:
        rec = self.r.hgetall(self.k_file(file_id))
        if not rec:
            raise FileNotFound(file_id)
        rec["bytes"] = int(rec["bytes"])
        rec["created_at"] = int(rec["created_at"])
        rec["rows"] = int(rec.get("rows", 0))
        # Records of the first release hold one format and no extra fields.
        rec["formats"] = rec.get("formats", rec.get("format", "")).split(",")
        rec["extra_fields"] = json.loads(rec.get("extra_fields", "[]"))
        rec.setdefault("tenant", DEFAULT_TENANT)
        if rec.get("expires_at"):
            rec["expires_at"] = int(rec["expires_at"])
            if rec["expires_at"] <= time.time():
                try:
                    self._remove(file_id)
                except RemovalFailed:
                    pass  # logged; expired all the same, and the sweeper tries again
                raise FileNotFound(file_id)
        return rec

    def sweep_expired(self, now: float | None = None) -> int:
        """Delete every file whose ``expires_at`` has passed; return how many were removed
        (one that cannot be removed now is logged and tried again at the next sweep)."""
        due = self.r.zrangebyscore(self.k_expiry(), "-inf", now or time.time())
        removed = 0
        for file_id in due:
            try:
                self._remove(file_id)
            except RemovalFailed:
                continue
            removed += 1
        return removed

    def list(
        self,
        after: str | None,
        limit: int,
        purpose: str | None = None,
        tenant: str | None = None,
        order: str = "desc",
    ) -> tuple[list[dict], bool]:
        """Newest first (``order="asc"``: oldest first), optionally filtered by purpose
        and owner; ``after`` is the last id of the previous page in the same order."""
        key = f"{self.p}files"
        desc = order != "asc"
        start = 0
        if after:
            rank = self.r.zrevrank(key, after) if desc else self.r.zrank(key, after)
            if rank is None:
                raise FileNotFound(after)
            start = rank + 1
        out: list[dict] = []
        for file_id in self.r.zrange(key, start, -1, desc=desc):
            try:
                rec = self.get(file_id)
            except FileNotFound:  # expired (and now deleted), or removed meanwhile
                continue
            if (purpose is None or rec["purpose"] == purpose) and (
                tenant is None or rec["tenant"] == tenant
            ):
                out.append(rec)
            if len(out) > limit:
                break
        return out[:limit], len(out) > limit

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self._remove(file_id)

    def _remove(self, file_id: str) -> None:
        """The bytes first, then the record: a failed removal (RemovalFailed) keeps the
        record, so the deletion can be retried (the sweeper retries expired files)."""
        remove_tree(self.path(file_id), self.data_dir, f"file {file_id}")
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_file(file_id))
        pipe.zrem(f"{self.p}files", file_id)
        pipe.zrem(self.k_expiry(), file_id)
        pipe.execute()

    # ---- a job's files (the worker writes them under jobs/{id}/: trainers.contract.jobdir)
    def delete_job_dir(self, job_id: str) -> None:
        """Remove everything the job wrote to the data volume (its uploads stay: they are
        files of their own, deleted with ``DELETE /v1/files/{id}``)."""
        remove_tree(JobDir(self.data_dir, job_id).root, self.data_dir, f"the files of job {job_id}")

    def delete_checkpoints(self, job_id: str) -> None:
        """Remove the job's checkpoints (its model's weights); plans and log stay."""
        remove_tree(
            JobDir(self.data_dir, job_id).output, self.data_dir, f"the checkpoints of job {job_id}"
        )
