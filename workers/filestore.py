"""Uploaded files: bytes on the data volume, metadata in Redis.

  file:{id}   hash: filename, bytes, purpose, created_at, status, format, formats, rows,
              extra_fields
  files       sorted set of file ids by creation time

A file is written to a temporary name, validated, then renamed into place, so a
half-uploaded or invalid file never becomes visible to a job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import redis

from workers.store import new_id


class FileNotFound(KeyError):
    pass


class FileStore:
    def __init__(self, client: redis.Redis, data_dir: Path, prefix: str = "posttrain:"):
        self.r = client
        self.p = prefix
        self.dir = Path(data_dir) / "files"

    def k_file(self, file_id: str) -> str:
        return f"{self.p}file:{file_id}"

    def staging_path(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f".upload-{new_id('tmp')}"

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
    ) -> dict:
        """Move a validated staged upload into place and record it.

        ``formats``: every row format all rows fit, most specific first (the first is
        the one shown as ``format``); ``extra_fields``: row fields beyond the format's
        own (graders may read them), so a job can check they exist without a rescan.
        """
        file_id = new_id("file")
        final = self.path(file_id)
        os.replace(staged, final)
        meta = {
            "id": file_id,
            "filename": filename,
            "purpose": purpose,
            "bytes": final.stat().st_size,
            "created_at": int(time.time()),
            "status": "processed",
            "format": formats[0],
            "formats": ",".join(formats),
            "rows": rows,
            "extra_fields": json.dumps(sorted(extra_fields)),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_file(file_id), mapping={k: str(v) for k, v in meta.items()})
        pipe.zadd(f"{self.p}files", {file_id: time.time()})
        pipe.execute()
        return self.get(file_id)

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
        return rec

    def list(
        self, after: str | None, limit: int, purpose: str | None = None
    ) -> tuple[list[dict], bool]:
        """Newest first, optionally filtered by purpose."""
        key = f"{self.p}files"
        start = 0
        if after:
            rank = self.r.zrevrank(key, after)
            if rank is None:
                raise FileNotFound(after)
            start = rank + 1
        out: list[dict] = []
        for file_id in self.r.zrange(key, start, -1, desc=True):
            rec = self.get(file_id)
            if purpose is None or rec["purpose"] == purpose:
                out.append(rec)
            if len(out) > limit:
                break
        return out[:limit], len(out) > limit

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_file(file_id))
        pipe.zrem(f"{self.p}files", file_id)
        pipe.execute()
        self.path(file_id).unlink(missing_ok=True)
