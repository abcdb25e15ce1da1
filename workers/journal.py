"""The report journals in a job's directory, and replaying them into the record.

The trainer appends every report line it sends to its journal,
``reports/{fence}-{attempt}.jsonl`` in the job's directory (``JobDir.journal``; the path
is in its run plan), so lines a worker held but never applied (it stalled or
died while Redis was down) are still on the data volume. Before a new attempt starts, the
supervisor replays from them the metrics of steps the resumed run will not train again.
"""

from __future__ import annotations

from trainers.contract.checkpoints import newest_complete_step
from trainers.contract.jobdir import JobDir
from trainers.contract.messages import InvalidReport, parse_report
from workers.store import JobStore


def replay_journals(store: JobStore, job_id: str, job_dir: JobDir) -> int:
    """Before a new attempt starts: put the metrics of steps an earlier attempt trained
    and saved (up to the newest complete checkpoint, which the new attempt resumes
    from) but whose report lines never reached the record, from that attempt's
    journal. Returns how many steps were recovered."""
    resume = newest_complete_step(job_dir.output)
    last = store.last_metric_step(job_id)
    found: dict[int, dict[str, float]] = {}
    journals = sorted(
        job_dir.reports.glob("*.jsonl"),
        key=lambda p: tuple(int(x) for x in p.stem.split("-") if x.isdigit()),
    )
    for path in journals:
        for raw in path.read_text(errors="replace").splitlines():
            try:
                msg = parse_report(raw)
            except InvalidReport:
                continue  # a line torn by a kill
            if msg.type == "log" and last < msg.step <= resume:
                found[msg.step] = {k: v for k, v in msg.metrics.items() if v is not None}
    for step in sorted(found):
        store.add_metrics(job_id, step, found[step])
    if found:
        store.add_event(
            job_id,
            f"Recovered the metrics of {len(found)} steps ({min(found)}-{max(found)}) "
            "from an earlier attempt's report journal",
        )
    return len(found)
