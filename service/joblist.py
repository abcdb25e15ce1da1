"""The job list: OpenAI's ``metadata`` filter read from the query string, and pages
of job records, newest first, that keep it."""

from __future__ import annotations

from typing import Any

from service.errors import APIError
from trainers.contract.spec import stored_spec_view
from workers.store import JobNotFound, JobStore

NO_FILTER: Any = object()


def metadata_filter(query: list[tuple[str, str]]) -> Any:
    """OpenAI's job-list filter from the query string: ``metadata[k]=v`` pairs (a dict),
    ``metadata=null`` (None: jobs without metadata), or ``NO_FILTER``."""
    pairs: dict[str, str] = {}
    null = False
    for key, value in query:
        if key == "metadata":
            if value != "null":
                raise APIError(
                    400,
                    "filter on metadata with metadata[key]=value, or metadata=null for jobs "
                    "without metadata",
                    param="metadata",
                    code="invalid_value",
                )
            null = True
        elif key.startswith("metadata["):
            name, closed, rest = key[len("metadata[") :].partition("]")
            if not closed or rest or not name or len(name) > 64:
                raise APIError(
                    400,
                    f"{key}: a metadata filter names one key of 1 to 64 characters, "
                    "metadata[key]=value",
                    param="metadata",
                    code="invalid_value",
                )
            pairs[name] = value
    if null and pairs:
        raise APIError(
            400,
            "use either metadata[key]=value or metadata=null, not both",
            param="metadata",
            code="invalid_value",
        )
    return None if null else (pairs or NO_FILTER)


def list_jobs(
    jobs: JobStore, after: str | None, limit: int, tenant: str | None, wanted: Any = NO_FILTER
) -> tuple[list[dict], bool]:
    """A page of job records, newest first, keeping those ``wanted`` (``metadata_filter``)."""
    if wanted is NO_FILTER:
        ids, more = jobs.list_ids(after, limit, tenant)
        return [jobs.get(i) for i in ids], more
    out: list[dict] = []
    cursor = after
    while True:
        ids, more = jobs.list_ids(cursor, max(limit + 1, 200), tenant)
        for job_id in ids:
            try:
                rec = jobs.get(job_id)
            except JobNotFound:
                continue  # deleted meanwhile
            meta = stored_spec_view(rec["spec"])["metadata"]
            if wanted is None:
                hit = meta is None
            else:
                hit = meta is not None and all(meta.get(k) == v for k, v in wanted.items())
            if hit:
                out.append(rec)
                if len(out) > limit:
                    return out[:limit], True
        if not more or not ids:
            return out, False
        cursor = ids[-1]
