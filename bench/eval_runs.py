"""Benchmark: items graded per second by a ``completions`` eval run, posttrain vs a script.

    python -m bench.eval_runs                         # ~10 min on 2 cores
    python -m bench.eval_runs --quick                 # ~1 min: 50 items, 1 round, no what-ifs
    python -m bench.eval_runs --out FILE --md FILE  # keep every number / the tables

The tiny random chat model (``trainers.tiny_model``, as the demo and the end-to-end tests
build it) is served by one ``posttrain inference --device cpu`` worker behind the real
API (``service.stack``: uvicorn, a Celery worker, a throwaway ``redis-server``, never
the machine's Redis). Every process runs with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` =
``--threads`` (default 1), offline. ``--items`` rows (default 200) of arithmetic
questions are graded by three criteria: a ``string_check`` (the answer occurs in the
sample, ``ilike``), a ``regex`` (the sample has a digit) and a ``text_similarity``
(``fuzzy_match`` >= 0.5 against the answer). Sampling is greedy (``temperature: 0``,
``seed: 0``, ``max_completion_tokens: --max-tokens``), so both arms must get the same
text for every row, and they are checked to. The inference worker and the API also run
with ``POSTTRAIN_INFERENCE_MAX_TOKENS`` = ``--max-tokens`` (``--no-cap``: not), because
the worker's front does not apply ``max_completion_tokens`` (a request carrying only it
runs to the model's context); the run reports answers longer than asked.

Arms, run alternately for ``--rounds`` rounds (order flipped every round):

* ``posttrain``: the ``openai`` SDK creates the eval once, then per round
  ``client.evals.runs.create`` with a ``completions`` data source (the rows inline,
  an ``input_messages`` template, ``model="tiny"``, the sampling params) and polls
  ``client.evals.runs.retrieve`` every ``--poll`` s until the run is finished. Timed
  two ways: client wall time (create sent .. the poll that saw it completed), and
  server-side, from the run's creation (the exact time the API stored it, the score of
  its entry in the eval's run index; ``created_at`` itself is whole seconds) to the
  moment its record said ``completed`` (a thread reads the run's Redis hash every
  20 ms). The same watcher times the phases: queued (API to worker), start (worker
  picked it up .. first row stored: the grading child process starting) and the rows.
* ``plain``: this process renders the same prompts itself, sends them one by one to
  the same inference worker's ``/v1/chat/completions`` (its front, with the model header
  the eval worker sends; one kept-alive ``httpx`` connection) with the same body, then
  grades each answer in-process with posttrain's grader functions
  (``trainers.contract.graders.scoring.grade_report``) and applies the pass rule.

Target: posttrain's items/s (server-side) >= 0.8x the plain script's.

With ``--whatif`` (stale: the what-ifs were written against the earlier worker, which
started a bounded child per criterion; it now grades a row's criteria in one child, what
the ``PerRowChild`` what-if measured), where a row's time goes: each what-if grades a copy of the
last measured run's first ``--whatif-items`` rows (default 100), ``--whatif-rounds``
times (default 2, order rotated), stored directly in Redis, in a process of its own and
without Celery: as shipped (``python -m workers.evaltasks RUN_ID``, what the Celery task
starts), then the same ``grade_run`` from a ``python -c`` process (a forked grading
child re-runs its parent's ``__main__`` module, which for ``-c`` is nothing), with one
bounded child per row for every criterion, each of those two with the next row sampled
while a row is graded (the worker's sampler called one row ahead on a thread), and with
in-process grading (the variants replace ``workers.evalgrading._grade``, which
``output_item`` looks up there, in their own process only; ``_grade`` now grades only
criteria that load a model, none of this bench's, so these two no longer change how its
rows are graded). The plain script runs the same rows before, between and after the
rounds, as their baseline. One grade of each criterion is timed in-process, in a bounded
child, and in a bounded child whose parent's main module is ``workers.evaltasks``.

The machine's runnable task count is sampled throughout, and the CPU seconds of the
engine, the front, the API and the eval worker's process tree (Celery, its grading
child, the grader children) are read around every arm. ``--out`` writes every sample
and the summary as JSON; ``--md`` the tables as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.inference import BenchError, Runnable, cpu_s, free_port
from service.stack import stop as stop_proc

MODEL = "tiny"
ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
SYSTEM = "You are a careful assistant. Answer with the number only."
TEMPLATE = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "{{ item.question }}"},
]
CRITERIA = [
    {
        "type": "string_check",
        "name": "has_answer",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "ilike",
    },
    {
        "type": "regex",
        "name": "has_digit",
        "input": "{{ sample.output_text }}",
        "pattern": "[0-9]",
    },
    {
        "type": "text_similarity",
        "name": "close",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "evaluation_metric": "fuzzy_match",
        "pass_threshold": 0.5,
    },
]
FINISHED = ("completed", "failed", "canceled")


def make_items(n: int) -> list[dict[str, str]]:
    """``n`` arithmetic questions, the same every run."""
    ops = [
        ("plus", lambda a, b: a + b),
        ("minus", lambda a, b: a - b),
        ("times", lambda a, b: a * b),
    ]
    items = []
    for i in range(n):
        a, b = 3 + (i * 7) % 97, 2 + (i * 13) % 89
        word, fn = ops[i % len(ops)]
        items.append({"question": f"What is {a} {word} {b}?", "answer": str(fn(a, b))})
    return items


def render(item: dict[str, str]) -> list[dict[str, str]]:
    """The plain script's own rendering of ``TEMPLATE`` (no posttrain template code)."""
    return [
        {
            "role": m["role"],
            "content": m["content"].replace("{{ item.question }}", item["question"]),
        }
        for m in TEMPLATE
    ]


def passes(criterion: dict[str, Any], score: float) -> bool:
    """OpenAI's pass marks as posttrain documents them (workers/evalgrading.py)."""
    if criterion.get("pass_threshold") is not None:
        return score >= criterion["pass_threshold"]
    if criterion["type"] == "string_check":
        return score >= 1.0
    return score > 0.5


# --------------------------------------------------------------------------- CPU
_TICK = os.sysconf("SC_CLK_TCK")


def session_cpu(sid: int) -> dict[int, float]:
    """pid -> CPU seconds (with what it reaped: cutime, cstime) of every live process in
    session ``sid``: the Celery worker, its pool, the grading child and its grader
    children, whose fork server reaps them."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            out[int(entry)] = sum(int(x) for x in fields[11:15]) / _TICK
    return out


class TreeCpu:
    """CPU seconds the processes of a session used while watched: read every 0.1 s, so a
    process that ends (the grading child, its fork server) counts with its last reading."""

    def __init__(self, sid: int | None):
        self.sid = sid
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        self.first = session_cpu(self.sid) if self.sid else {}
        while not self._stop.wait(0.1):
            if self.sid:
                self.last.update(session_cpu(self.sid))

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.sid:
            self.last.update(session_cpu(self.sid))

    def seconds(self) -> float:
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


class Cpu:
    def __init__(self, pids: dict[str, int | None]):
        self.pids = pids

    def read(self) -> dict[str, float]:
        out = {name: cpu_s(pid) for name, pid in self.pids.items()}
        out["bench"] = time.process_time()
        return out

    @staticmethod
    def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in after}


# --------------------------------------------------------------------------- the plain arm
def plain_run(front: str, header: dict, items: list[dict], sampling: dict) -> dict:
    """Sample every row from the front, one request at a time, then grade in-process."""
    from trainers.contract.graders.scoring import grade_report
    from trainers.contract.graders.spec import parse_grader

    graders = [(c, parse_grader(c)) for c in CRITERIA]
    headers = {"X-Posttrain-Model": json.dumps(header)}
    rows: list[dict] = []
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as http:
        t0 = time.perf_counter()
        for item in items:
            messages = render(item)
            s0 = time.perf_counter()
            body = {"model": header["name"], "messages": messages, **sampling}
            r = http.post(front + "/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 200:
                raise BenchError(f"plain: HTTP {r.status_code}: {r.text[:300]}")
            data = r.json()
            text = data["choices"][0]["message"].get("content") or ""
            g0 = time.perf_counter()
            scores, passed = [], []
            for criterion, grader in graders:
                report = grade_report(grader, item, text)
                scores.append(report.reward)
                passed.append(not report.errors and passes(criterion, report.reward))
            g1 = time.perf_counter()
            rows.append(
                {
                    "messages": messages,
                    "text": text,
                    "tokens": int(data["usage"]["completion_tokens"]),
                    "scores": scores,
                    "passed": passed,
                    "sample_s": g0 - s0,
                    "grade_s": g1 - g0,
                }
            )
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows}


# --------------------------------------------------------------------------- the posttrain arm
class RunWatch:
    """Reads a run's Redis hash every ``every`` s: when its status changed and when each
    row was stored (the ``progress`` count), on this process's wall clock."""

    def __init__(self, client, key: str, every: float = 0.02):
        self.r, self.key, self.every = client, key, every
        self.status: dict[str, float] = {}
        self.progress: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        last = -1
        while not self._stop.is_set():
            status, progress = self.r.hmget(self.key, "status", "progress")
            now = time.time()
            if status is not None and status not in self.status:
                self.status[status] = now
            n = int(progress or 0)
            if n != last:
                self.progress.append((now, n))
                last = n
            if status in FINISHED:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> RunWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def first_row_at(self) -> float | None:
        return next((t for t, n in self.progress if n >= 1), None)

    def last_row_at(self) -> float | None:
        return self.progress[-1][0] if self.progress else None


def completions_source(items: list[dict], sampling: dict) -> dict:
    return {
        "type": "completions",
        "model": MODEL,
        "input_messages": {"type": "template", "template": TEMPLATE},
        "sampling_params": sampling,
        "source": {"type": "file_content", "content": [{"item": it} for it in items]},
    }


def posttrain_run(sdk, r, prefix: str, eval_id: str, items, sampling, poll: float) -> dict:
    """One run through the SDK, timed at the client and from the run's Redis record."""
    t0, wall0 = time.perf_counter(), time.time()
    run = sdk.evals.runs.create(
        eval_id, name="bench", data_source=completions_source(items, sampling)
    )
    created_call = time.perf_counter() - t0
    key = f"{prefix}evalrun:{run.id}"
    with RunWatch(r, key) as watch:
        polls = 0
        while True:
            got = sdk.evals.runs.retrieve(run.id, eval_id=eval_id)
            polls += 1
            if got.status in FINISHED:
                break
            time.sleep(poll)
        client_s = time.perf_counter() - t0
        deadline = time.time() + 5
        while "completed" not in watch.status and got.status == "completed":
            if time.time() > deadline:
                break
            time.sleep(0.01)
    if got.status != "completed":
        raise BenchError(f"the run ended {got.status}: {got.error}")
    created = r.zscore(f"{prefix}evalruns:eval:{eval_id}", run.id)
    done_at = watch.status.get("completed")
    out_items = [
        i.model_dump()
        for i in sdk.evals.runs.output_items.list(run.id, eval_id=eval_id, limit=100, order="asc")
    ]
    last_item_at = max(i["created_at"] for i in out_items)
    first, last = watch.first_row_at(), watch.last_row_at()
    return {
        "run_id": run.id,
        "client_s": client_s,
        "create_call_s": created_call,
        "polls": polls,
        "created_at": got.created_at,
        "created_exact": created,
        "server_s": (done_at - created) if done_at and created else None,
        "server_whole_s": last_item_at - got.created_at,  # both whole seconds
        "queued_s": watch.status.get("in_progress", float("nan")) - (created or float("nan")),
        "start_s": (first - watch.status["in_progress"]) if first else None,
        "rows_s": (last - first) if first and last else None,
        "client_wall0": wall0,
        "result_counts": got.result_counts.model_dump(),
        "per_criterion": [c.model_dump() for c in got.per_testing_criteria_results],
        "usage": [u.model_dump() for u in got.per_model_usage],
        "items": out_items,
    }


def compare(plain: dict, post: dict, n: int) -> list[str]:
    """Row by row: the same prompt, the same text, the same verdict per criterion."""
    problems = []
    items = sorted(post["items"], key=lambda i: i["datasource_item_id"])
    if len(items) != n:
        return [f"posttrain stored {len(items)} output items, expected {n}"]
    for row, item in zip(plain["rows"], items, strict=True):
        i = item["datasource_item_id"]
        sample = item["sample"]
        if sample["input"] != row["messages"]:
            problems.append(f"row {i}: the prompts differ: {sample['input']} vs {row['messages']}")
        text = (sample["output"] or [{}])[0].get("content")
        if text != row["text"]:
            problems.append(f"row {i}: the answers differ: {text!r} vs {row['text']!r}")
        verdicts = [res["passed"] for res in item["results"]]
        if verdicts != row["passed"]:
            problems.append(f"row {i}: verdicts {verdicts} vs plain {row['passed']}")
        if len(problems) > 5:
            break
    return problems


# --------------------------------------------------------------------------- what-ifs
# Each what-if grades a run stored directly in Redis (no API, no Celery) in a process of
# its own, as the worker's grading child process does (``python -m workers.evaltasks``).
# The variants run the same ``grade_run`` from a ``python -c`` process instead: a forked
# grading child re-runs its parent's ``__main__`` module by name (multiprocessing's
# ``prepare``), which for ``-c`` is nothing, and for ``-m workers.evaltasks`` is the
# whole module and its imports (Celery included).
WHATIFS = {
    "shipped": "as shipped: `python -m workers.evaltasks`, a bounded child per grade",
    "light-main": "the same code, the grading process's main module not re-run per child",
    "per-row": "one bounded child per row grading every criterion",
    "light-main+ahead": "a child per grade (main not re-run), the next row sampled meanwhile",
    "per-row+ahead": "one child per row, the next row sampled while this one is graded",
    "in-process": "grades in-process (no child)",
}
CHILD = "import sys, bench.eval_runs as b; b.whatif_child(sys.argv[1], sys.argv[2])"


def grade_row(payloads: list[dict], item: Any, text: str) -> list[Any]:
    """Every criterion of one row, in one call (what a per-row bounded child runs)."""
    from trainers.contract.graders.scoring import grade_report

    return [grade_report(p, item, text) for p in payloads]


class PerRowChild:
    """Stands in for ``workers.evalgrading._grade``: the first criterion of a row starts one
    bounded child grading all of them (same time and memory caps as ``run_isolated``);
    the other criteria of the row take their report from it."""

    def __init__(self) -> None:
        from trainers.contract.graders.spec import parse_grader

        self.payloads = [parse_grader(c).model_dump(mode="json") for c in CRITERIA]
        self.cache: tuple[Any, str, list] | None = None

    def __call__(self, grader: Any, item: Any, text: str) -> Any:
        from trainers.contract.graders import scoring
        from trainers.contract.isolation import run_bounded

        if self.cache is None or self.cache[0] is not item or self.cache[1] != text:
            out = run_bounded(
                grade_row,
                (self.payloads, item, text),
                timeout_s=scoring.RUN_TIMEOUT_S,
                memory_bytes=scoring.RUN_MEMORY_BYTES,
                preload=[*scoring._PRELOAD, "bench.eval_runs"],
            )
            if out.kind != "ok":
                raise BenchError(f"per-row grading child: {out.kind} {out.detail}")
            self.cache = (item, text, out.value)
        return self.cache[2][self.payloads.index(grader.model_dump(mode="json"))]


def _say(obj: dict) -> None:
    print("@@ " + json.dumps(obj), flush=True)


def whatif_child(mode: str, arg: str) -> None:
    """The ``python -c`` side of a what-if: ``mode`` is a key of ``WHATIFS`` (``arg``: the
    run id) or ``micro`` (``arg``: a JSON file of (item, text) pairs to grade)."""
    from trainers.contract.graders import scoring
    from workers import evalgrading, evaltasks

    if mode == "micro":
        _say(micro(json.loads(Path(arg).read_text())))
        return
    settings, runs, files = evaltasks._context()
    if mode.startswith("per-row"):
        evalgrading._grade = PerRowChild()
    elif mode == "in-process":
        evalgrading._grade = scoring.grade_report
    rec = runs.get(arg)
    sampler = evalgrading.http_sampler(runs, settings, rec["spec"])
    if mode.endswith("+ahead"):
        sampler = Ahead(sampler, rec, evalgrading.input_messages)
    sample_s: list[float] = []

    def timed(messages):
        s0 = time.perf_counter()
        try:
            return sampler(messages)
        finally:
            sample_s.append(time.perf_counter() - s0)

    t0 = time.perf_counter()
    outcome = evaltasks.grade_run(arg, runs, files, settings, sampler=timed)
    _say({"outcome": outcome, "seconds": time.perf_counter() - t0, "sample_s": sample_s})


class Ahead:
    """The worker's sampler, one row ahead: asked for row k's answer, it also starts row
    k+1's request on a thread, so the engine generates it while row k is graded and
    stored. ``grade_run`` asks for the rows in order; a row asked out of turn (or whose
    messages differ) is sampled directly. Timed: the wait for an answer."""

    def __init__(self, sampler, rec: dict, render_messages):
        from concurrent.futures import ThreadPoolExecutor

        spec = rec["spec"]
        rows = rec["data_source"]["source"]["content"]
        self.messages = [render_messages(spec["input_messages"], r["item"]) for r in rows]
        self.sampler, self.next = sampler, 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[int, Any] = {}

    def _start(self, k: int) -> None:
        if k < len(self.messages) and k not in self.futures:
            self.futures[k] = self.pool.submit(self.sampler, self.messages[k])

    def __call__(self, messages):
        k = self.next
        self.next += 1
        if k >= len(self.messages) or self.messages[k] != messages:
            return self.sampler(messages)
        self._start(k)
        self._start(k + 1)
        return self.futures.pop(k).result()


def micro(pairs: list[list]) -> dict:
    """ms per grade of each criterion over ``pairs``: in-process, in a bounded child, and
    in a bounded child whose parent's main module is ``workers.evaltasks`` (as in the
    worker's grading process); and the first bounded grade (it starts the fork server)."""
    import importlib.util

    from trainers.contract.graders import scoring
    from trainers.contract.graders.spec import parse_grader

    graders = [parse_grader(c) for c in CRITERIA]
    t0 = time.perf_counter()
    scoring.run_isolated(graders[0], pairs[0][0], pairs[0][1])
    out: dict[str, Any] = {"first_bounded_ms": (time.perf_counter() - t0) * 1e3, "ms": {}}

    def each(fn, g, pairs=pairs) -> float:
        t = time.perf_counter()
        for item, text in pairs:
            fn(g, item, text)
        return (time.perf_counter() - t) / len(pairs) * 1e3

    main = sys.modules["__main__"]
    for c, g in zip(CRITERIA, graders, strict=True):
        row = {
            "in_process": each(scoring.grade_report, g),
            "bounded": each(scoring.run_isolated, g),
        }
        main.__spec__ = importlib.util.find_spec("workers.evaltasks")
        try:
            row["bounded_worker_main"] = each(scoring.run_isolated, g, pairs[:10])
        finally:
            main.__spec__ = None
        out["ms"][c["name"]] = row
    return out


def _child_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    lines = [x for x in proc.stdout.splitlines() if x.startswith("@@ ")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{what} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(lines[-1][3:])


def whatifs(
    r, prefix: str, penv: dict, measured: dict, eval_id: str, n: int, work: Path, rounds: int, plain
) -> dict:
    """Each ``WHATIFS`` variant grades its own copy of the measured run's first ``n`` rows,
    once per round (order rotated); items/s from its process start to the run's
    ``completed``. ``plain()`` (items/s of the plain script on the same rows) runs before
    every round and after the last."""
    from workers.evalruns import EvalRunStore

    runs = EvalRunStore(r, prefix)
    rec = runs.get(measured["run_id"])
    ds = dict(rec["data_source"])
    ds["source"] = {"type": "file_content", "content": ds["source"]["content"][:n]}
    pairs = [
        (i["datasource_item"], (i["sample"]["output"] or [{}])[0].get("content") or "")
        for i in sorted(measured["items"], key=lambda i: i["datasource_item_id"])[:n]
    ]
    path = work / "whatif-pairs.json"
    path.write_text(json.dumps(pairs))
    root = str(Path(__file__).resolve().parents[1])
    env = {**penv, "PYTHONPATH": os.pathsep.join(filter(None, [root, penv.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "micro", str(path)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out: dict[str, Any] = {"micro": _child_out(proc, "the micro what-if"), "plain_items_s": []}
    runs_of: dict[str, list[dict]] = {mode: [] for mode in WHATIFS}
    modes = list(WHATIFS)
    for i in range(rounds):
        out["plain_items_s"].append(plain())
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            runs_of[mode].append(_whatif(r, runs, rec, ds, mode, n, env, root, eval_id))
    out["plain_items_s"].append(plain())
    med = statistics.median
    out["variants"] = {
        mode: {
            "name": WHATIFS[mode],
            "runs": got,
            "items_s": med(v["items_s"] for v in got),
            "start_s": med(v["start_s"] for v in got),
            "per_row_ms": med(v["per_row_ms"] for v in got),
            "counts": got[-1]["counts"],
            **({"sample_ms": med(v["sample_ms"] for v in got)} if mode != "shipped" else {}),
        }
        for mode, got in runs_of.items()
    }
    return out


def _whatif(r, runs, rec, ds, mode: str, n: int, env: dict, root: str, eval_id: str) -> dict:
    run = runs.create(
        eval_id=eval_id,
        name=f"what-if {mode}",
        model=rec["model"],
        data_source=ds,
        spec=rec["spec"],
        total=n,
        tenant=rec["tenant"],
    )
    if mode == "shipped":
        argv = [sys.executable, "-m", "workers.evaltasks", run["id"]]
    else:
        argv = [sys.executable, "-c", CHILD, mode, run["id"]]
    t0 = time.time()
    with RunWatch(r, runs.k_run(run["id"])) as watch:
        proc = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"what-if {mode} exited {proc.returncode}: {proc.stderr[-1500:]}")
    got = runs.get(run["id"])
    first, last, done = watch.first_row_at(), watch.last_row_at(), watch.status.get("completed")
    if got["status"] != "completed" or not (first and last and done):
        raise BenchError(f"what-if {mode}: the run ended {got['status']}")
    v: dict[str, Any] = {
        "seconds": done - t0,
        "start_s": first - t0,
        "per_row_ms": (last - first) / max(n - 1, 1) * 1e3,
        "counts": [got["passed"], got["failed"], got["errored"]],
    }
    v["items_s"] = n / v["seconds"]
    if mode != "shipped":
        v["sample_ms"] = statistics.mean(_child_out(proc, f"what-if {mode}")["sample_s"]) * 1e3
    runs.delete(run["id"])
    return v


# --------------------------------------------------------------------------- the bench
def warm_model(api: str, key: str) -> None:
    """The first request loads the model into the engine; 503s while it loads."""
    deadline = time.monotonic() + 180
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    while True:
        resp = httpx.post(
            api + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        if resp.status_code == 200:
            return
        if resp.status_code != 503 or time.monotonic() > deadline:
            raise BenchError(f"warm-up chat: HTTP {resp.status_code}: {resp.text[:300]}")
        time.sleep(0.5)


def run(a: argparse.Namespace, work: Path) -> dict:
    import redis as redis_lib
    from openai import OpenAI

    from service import stack
    from trainers.tiny_model import build_tiny_model
    from workers.inference.registry import registry_key

    threads = str(a.threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    model_dir = Path(build_tiny_model(work / "models" / MODEL, seed=0)).resolve()
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    key = "sk-bench-" + secrets.token_hex(12)
    prefix = "posttrain:"
    tag = f"bench-evals-{os.getpid()}"
    settings_kw = {
        "redis_url": redis_url,
        "data_dir": str(work / "data"),
        "key_prefix": prefix,
        "queue": f"posttrain.{tag}",
        "inference_queue": f"posttrain.{tag}-inference",
    }
    penv = {
        **env,
        **{f"POSTTRAIN_{k.upper()}": v for k, v in settings_kw.items()},
        "POSTTRAIN_MODEL_ROOTS": str(work / "models"),
        "POSTTRAIN_API_KEYS": key,
        "POSTTRAIN_INFERENCE_DEVICE": "cpu",
        "POSTTRAIN_INFERENCE_CACHE_DIR": str(work / "inference-cache"),
    }
    if a.cap:  # the server's bound: what a request without max_tokens may generate
        penv["POSTTRAIN_INFERENCE_MAX_TOKENS"] = str(a.max_tokens)
    sampling = {"temperature": 0, "seed": 0, "max_completion_tokens": a.max_tokens}
    items = make_items(a.items)
    redis_proc = api = worker = inference = None
    res: dict[str, Any] = {"rounds": [], "notes": []}
    try:
        redis_proc = stack.start_redis(redis_url, work / "redis.log")
        if redis_proc is None:
            raise BenchError(f"something already answers at {redis_url}; refusing to use it")
        t0 = time.time()
        inference = stack.start_inference(penv, work / "inference.log", free_port())
        api_port = free_port()
        api = stack.start_api(penv, api_port, work / "api.log")
        worker = stack.start_worker(penv, work / "worker.log", name=tag)
        r = redis_lib.Redis.from_url(redis_url, decode_responses=True)
        entries = r.hgetall(registry_key(prefix, settings_kw["inference_queue"]))
        if not entries:
            raise BenchError("the inference worker is not registered in Redis")
        entry = json.loads(next(iter(entries.values())))
        api_url = f"http://127.0.0.1:{api_port}"
        warm_model(api_url, key)
        print(
            f"stack up in {time.time() - t0:.1f} s: API {api_url}, inference front "
            f"{entry['url']}, Redis {redis_url}",
            flush=True,
        )
        pids = {
            "api": api.pid,
            "front": inference.pid,
            "engine": (entry.get("engine_pids") or [None])[0],
        }
        cpu = Cpu(pids)
        sdk = OpenAI(base_url=api_url + "/v1", api_key=key, max_retries=0, timeout=600)
        ev = sdk.evals.create(
            name="arithmetic",
            data_source_config={
                "type": "custom",
                "item_schema": ITEM_SCHEMA,
                "include_sample_schema": True,
            },
            testing_criteria=CRITERIA,
        )
        header = {"name": MODEL, "path": str(model_dir), "base": None}
        # untimed: a short run of each arm (page cache, connections, the engine's first calls)
        warm = posttrain_run(sdk, r, prefix, ev.id, items[:5], sampling, a.poll)
        spec_header = json.loads(r.hget(f"{prefix}evalrun:{warm['run_id']}", "spec"))["model"]
        if spec_header != header:
            raise BenchError(f"the eval worker's model header {spec_header} is not {header}")
        plain_run(entry["url"], header, items[:5], sampling)
        print(f"warmed up; {len(items)} items, max_completion_tokens {a.max_tokens}", flush=True)
        with Runnable() as load:
            for i in range(a.rounds):
                order = ("plain", "posttrain") if i % 2 == 0 else ("posttrain", "plain")
                rnd: dict[str, Any] = {"round": i + 1, "order": list(order)}
                for arm in order:
                    mark, before = load.mark(), cpu.read()
                    with TreeCpu(worker.pid) as tree:
                        if arm == "plain":
                            got = plain_run(entry["url"], header, items, sampling)
                        else:
                            got = posttrain_run(sdk, r, prefix, ev.id, items, sampling, a.poll)
                    got["cpu"] = Cpu.diff(before, cpu.read())
                    got["cpu"]["eval-worker"] = tree.seconds()
                    got["runnable"] = load.mean_since(mark)
                    rnd[arm] = got
                    secs = got["seconds"] if arm == "plain" else got["server_s"]
                    print(
                        f"  round {i + 1} {arm}: {secs:.1f} s, {a.items / secs:.2f} items/s, "
                        f"runnable tasks {got['runnable']:.1f}",
                        flush=True,
                    )
                rnd["problems"] = compare(rnd["plain"], rnd["posttrain"], a.items)
                res["rounds"].append(rnd)
            if a.whatif:
                mark = load.mark()
                n = min(a.whatif_items or 100, a.items)
                last = res["rounds"][-1]["posttrain"]

                def plain(n=n):  # the what-ifs' own baseline, between their rounds
                    return n / plain_run(entry["url"], header, items[:n], sampling)["seconds"]

                res["whatif"] = whatifs(
                    r, prefix, penv, last, ev.id, n, work, a.whatif_rounds, plain
                )
                res["whatif"]["items"] = n
                res["whatif"]["runnable"] = load.mean_since(mark)
                for mode, v in res["whatif"]["variants"].items():
                    print(f"  what-if {mode}: {v['items_s']:.2f} items/s", flush=True)
    finally:
        stop_proc(api)
        stop_proc(worker, timeout=20)
        stop_proc(inference, timeout=20)
        if redis_proc is not None and redis_proc.poll() is None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    return res


# --------------------------------------------------------------------------- report
def summarize(res: dict, a: argparse.Namespace) -> dict:
    n = a.items
    rounds = res["rounds"]
    plain = [n / r["plain"]["seconds"] for r in rounds]
    server = [n / r["posttrain"]["server_s"] for r in rounds]
    client = [n / r["posttrain"]["client_s"] for r in rounds]
    ratios = [s / p for s, p in zip(server, plain, strict=True)]
    ratios_client = [c / p for c, p in zip(client, plain, strict=True)]
    prow = [row for r in rounds for row in r["plain"]["rows"]]
    post = [r["posttrain"] for r in rounds]
    med = statistics.median
    rows_ms = [p["rows_s"] / max(n - 1, 1) * 1e3 for p in post if p["rows_s"]]
    problems = [f"round {r['round']}: {p}" for r in rounds for p in r["problems"]]
    for r in rounds:
        counts = r["posttrain"]["result_counts"]
        if counts["errored"]:
            problems.append(f"round {r['round']}: {counts['errored']} rows errored")
    over = [row["tokens"] for row in prow if row["tokens"] > a.max_tokens]
    if over:
        problems.append(
            f"{len(over)} of {len(prow)} answers ran past max_completion_tokens "
            f"{a.max_tokens} (up to {max(over)} tokens): the inference server did not "
            "honour it"
        )
    return {
        "items_s": {
            "plain": med(plain),
            "posttrain_server": med(server),
            "posttrain_client": med(client),
        },
        "per_round": {"plain": plain, "server": server, "client": client},
        "ratio": med(ratios),
        "ratio_client": med(ratios_client),
        "ratios": ratios,
        "plain_ms": {
            "sample": statistics.mean(r["sample_s"] for r in prow) * 1e3,
            "grade": statistics.mean(r["grade_s"] for r in prow) * 1e3,
            "tokens": statistics.mean(r["tokens"] for r in prow),
        },
        "posttrain_ms": {
            "queued": med([p["queued_s"] * 1e3 for p in post]),
            "start": med([p["start_s"] * 1e3 for p in post if p["start_s"] is not None]),
            "per_row": med(rows_ms) if rows_ms else float("nan"),
            "server_whole_s": med([p["server_whole_s"] for p in post]),
            "client_minus_server": med([(p["client_s"] - p["server_s"]) * 1e3 for p in post]),
        },
        "counts": rounds[-1]["posttrain"]["result_counts"],
        "per_criterion": rounds[-1]["posttrain"]["per_criterion"],
        "problems": problems,
    }


def tables(res: dict, s: dict, a: argparse.Namespace) -> str:
    n = a.items
    out = [
        f"## posttrain eval run vs a plain script ({n} items, `completions`, tiny model on "
        f"CPU, {a.threads} thread(s) per process, greedy, max_completion_tokens "
        f"{a.max_tokens}{'' if a.cap else ' (server not capped)'}, {a.rounds} round(s); "
        "items/s = median over rounds)",
        "",
        "| arm | items/s | vs plain (per-round) | s per run | ms per item |",
        "|---|--:|--:|--:|--:|",
    ]
    ip = s["items_s"]
    pr = s["per_round"]
    fmt = ", ".join
    out.append(
        f"| plain script (sample, then grade in-process) | {ip['plain']:.2f} | - | "
        f"{n / ip['plain']:.1f} | {1e3 / ip['plain']:.1f} |"
    )
    out.append(
        f"| posttrain, server-side (created .. completed) | {ip['posttrain_server']:.2f} | "
        f"{s['ratio']:.3f} ({fmt(f'{x:.2f}' for x in s['ratios'])}) | "
        f"{n / ip['posttrain_server']:.1f} | {1e3 / ip['posttrain_server']:.1f} |"
    )
    out.append(
        f"| posttrain, client wall (SDK create .. poll sees completed) | "
        f"{ip['posttrain_client']:.2f} | {s['ratio_client']:.3f} | "
        f"{n / ip['posttrain_client']:.1f} | {1e3 / ip['posttrain_client']:.1f} |"
    )
    out += [
        "",
        "Per round (items/s): plain "
        + fmt(f"{x:.2f}" for x in pr["plain"])
        + "; posttrain server "
        + fmt(f"{x:.2f}" for x in pr["server"])
        + "; client "
        + fmt(f"{x:.2f}" for x in pr["client"])
        + f". From the whole-second `created_at` to the last output item's `created_at`: "
        f"{s['posttrain_ms']['server_whole_s']} s.",
        "",
        "Where a run's time goes (medians; ms):",
        "",
        "| | plain | posttrain |",
        "|---|--:|--:|",
        f"| queued (API stored it .. a worker marked it in_progress) | - | "
        f"{s['posttrain_ms']['queued']:.0f} |",
        f"| start (in_progress .. first row stored) | - | {s['posttrain_ms']['start']:.0f} |",
        f"| per row, steady state | {s['plain_ms']['sample'] + s['plain_ms']['grade']:.1f} "
        f"(sample {s['plain_ms']['sample']:.1f} + grade {s['plain_ms']['grade']:.2f}) | "
        f"{s['posttrain_ms']['per_row']:.1f} |",
        f"| client wall minus server-side | - | {s['posttrain_ms']['client_minus_server']:.0f} |",
        "",
        f"Tokens per answer: {s['plain_ms']['tokens']:.1f}. Result counts (last run): "
        f"{s['counts']}; per criterion: "
        + fmt(
            f"{c['testing_criteria']} {c['passed']}/{c['passed'] + c['failed']}"
            for c in s["per_criterion"]
        )
        + ".",
        "",
        "CPU seconds per run (mean over rounds):",
        "",
        "| arm | engine | front | API | eval worker tree | bench process |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for arm in ("plain", "posttrain"):
        c = {
            k: statistics.mean(r[arm]["cpu"][k] for r in res["rounds"])
            for k in res["rounds"][0][arm]["cpu"]
        }
        out.append(
            f"| {arm} | {c['engine']:.1f} | {c['front']:.1f} | {c['api']:.1f} | "
            f"{c['eval-worker']:.1f} | {c['bench']:.1f} |"
        )
    w = res.get("whatif")
    if w:
        out += [
            "",
            f"What-ifs ({w['items']} items each, {a.whatif_rounds} round(s), medians): the "
            "worker's own `grade_run` on a run stored directly in Redis, in a process of its "
            "own (no API, no Celery); items/s from that process's start to the run's "
            "`completed`; vs plain: vs the median of the plain script on the same rows "
            f"before, between and after the rounds "
            f"({fmt(f'{x:.2f}' for x in w['plain_items_s'])} items/s):",
            "",
            "| grading process | items/s | vs plain | start ms | ms per row | "
            "ms per sample | passed/failed/errored |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        base = statistics.median(w["plain_items_s"])
        for v in w["variants"].values():
            sample = f"{v['sample_ms']:.1f}" if "sample_ms" in v else "-"
            out.append(
                f"| {v['name']} | {v['items_s']:.2f} | {v['items_s'] / base:.3f} | "
                f"{v['start_s'] * 1e3:.0f} | {v['per_row_ms']:.1f} | {sample} | "
                f"{'/'.join(map(str, v['counts']))} |"
            )
        m = w["micro"]
        out += [
            "",
            "One grade (ms, mean over the run's answers; the first bounded grade of a "
            f"process also starts its fork server: {m['first_bounded_ms']:.0f} ms):",
            "",
            "| criterion | in-process (`grade_report`) | bounded child (`run_isolated`) | "
            "bounded child, parent's main `workers.evaltasks` |",
            "|---|--:|--:|--:|",
        ]
        for name, v in m["ms"].items():
            out.append(
                f"| {name} | {v['in_process']:.3f} | {v['bounded']:.1f} | "
                f"{v['bounded_worker_main']:.1f} |"
            )
    met = "met" if s["ratio"] >= 0.8 else "MISSED"
    out += ["", f"Target: posttrain/plain {s['ratio']:.3f} >= 0.8: {met}."]
    busy = [r[arm]["runnable"] for r in res["rounds"] for arm in ("plain", "posttrain")]
    out.append(f"Runnable tasks during the arms (mean): {statistics.mean(busy):.1f}.")
    for p in s["problems"] + res["notes"]:
        out.append(f"- PROBLEM: {p}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.eval_runs", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="50 items, 1 round, no what-ifs")
    p.add_argument("--items", type=int, default=None, help="rows per run (default 200)")
    p.add_argument("--rounds", type=int, default=None, help="runs of each arm (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_completion_tokens")
    p.add_argument(
        "--no-cap",
        dest="cap",
        action="store_false",
        help="do not also bound the inference server at --max-tokens "
        "(POSTTRAIN_INFERENCE_MAX_TOKENS)",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every process")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between runs.retrieve")
    p.add_argument("--no-whatif", action="store_true", help="skip the what-if runs (default)")
    p.add_argument(
        "--whatif",
        dest="want_whatif",
        action="store_true",
        help="the what-if runs: they stand in for the grading of the earlier worker (a child "
        "per criterion) and no longer measure the shipped one",
    )
    p.add_argument(
        "--whatif-items", type=int, default=None, help="rows per what-if run (default 100)"
    )
    p.add_argument("--whatif-rounds", type=int, default=2, help="runs of each what-if")
    p.add_argument("--out", type=Path, default=None, help="write every sample as JSON here")
    p.add_argument(
        "--md", dest="markdown", type=Path, default=None, help="write the tables as Markdown here"
    )
    p.add_argument("--keep", type=Path, default=None, help="work dir to keep (default: temp)")
    a = p.parse_args(argv)
    a.whatif = a.want_whatif and not (a.no_whatif or a.quick)
    a.items = a.items or (50 if a.quick else 200)
    a.rounds = a.rounds or (1 if a.quick else 2)
    if a.items < 2 or a.rounds < 1 or a.max_tokens < 1:
        p.error("--items >= 2, --rounds >= 1, --max-tokens >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started = time.time()
    work = (a.keep or Path(tempfile.mkdtemp(prefix="posttrain-bench-evals-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}; {os.cpu_count()} cores; {a.threads} thread(s) per process", flush=True)
    try:
        res = run(a, work)
    except (BenchError, RuntimeError) as exc:
        print(f"\nbench failed: {exc}\n(logs under {work})", file=sys.stderr)
        if not a.keep:
            print("re-run with --keep DIR to keep the logs", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
        return 1
    summary = summarize(res, a)
    text = tables(res, summary, a)
    print("\n" + text)
    wall = time.time() - started
    print(f"\nbench wall time {wall:.0f} s; work dir {work if a.keep else '(temporary, removed)'}")
    if md := a.markdown:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text + "\n")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        for rnd in res["rounds"]:  # timings are kept; prompts, answers and items are not
            rnd["posttrain"]["items"] = len(rnd["posttrain"]["items"])
            for row in rnd["plain"]["rows"]:
                del row["messages"], row["text"]
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        a.out.write_text(
            json.dumps(
                {"args": args, "wall_s": wall, **res, "summary": summary}, indent=1, default=str
            )
        )
        print(f"results written to {a.out}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
