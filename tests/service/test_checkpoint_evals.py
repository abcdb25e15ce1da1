"""Evals during fine-tuning: a job's ``eval`` checked at creation (the API), and the run
per checkpoint the worker creates once per checkpoint and reports back onto the job."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient

from service.auth import hash_key
from service.main import create_app
from service.settings import ApiSettings
from trainers.reporting import Reporter
from workers.ckptevals import create_checkpoint_run, report_to_job
from workers.evalruns import EvalRunStore
from workers.evalstore import EvalStore
from workers.evaltasks import grade_run
from workers.filestore import FileStore
from workers.ingest import ReportIngest
from workers.settings import WorkerSettings
from workers.store import JobStatus, JobStore

SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
EVAL = {
    "name": "qa",
    "data_source_config": {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
    "testing_criteria": [CHECK],
}
ITEMS = [{"item": {"question": f"q{i}", "answer": f"a{i}"}} for i in range(4)]
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def data_source(**over) -> dict:
    return {
        "type": "completions",
        "source": {"type": "file_content", "content": ITEMS},
        "input_messages": {
            "type": "template",
            "template": [{"role": "user", "content": "{{item.question}}"}],
        },
        "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
        **over,
    }


# ---- the API: the job's eval checked at creation
@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-ckpt-evals",
        api_keys="k1,k2",
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(client, key: str, rows: list, purpose: str) -> str:
    body = "\n".join(json.dumps(r) for r in rows).encode()
    resp = client.post(
        "/v1/files",
        files={"file": ("f.jsonl", io.BytesIO(body))},
        data={"purpose": purpose},
        headers=auth(key),
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def new_eval(client, key: str) -> str:
    resp = client.post("/v1/evals", json=EVAL, headers=auth(key))
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def create_job(client, key: str, file_id: str, eval_entry: dict):
    body = {"model": "tiny", "training_file": file_id, "eval": eval_entry}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=auth(key))


def test_a_job_names_its_eval_and_the_spec_keeps_it(client, redis_client):
    fid = upload(client, "k1", [CHAT], "fine-tune")
    eval_id = new_eval(client, "k1")
    resp = create_job(client, "k1", fid, {"eval_id": eval_id, "data_source": data_source()})
    assert resp.status_code == 200, resp.text
    spec = json.loads(redis_client.hget(f"test:job:{resp.json()['id']}", "spec"))
    assert spec["eval"] == {"eval_id": eval_id, "data_source": data_source()}


@pytest.mark.parametrize(
    "entry,status,param",
    [
        ({"eval_id": "OTHER"}, 404, "eval.eval_id"),
        ({"eval_id": "eval_" + "0" * 32}, 404, "eval.eval_id"),
        ({"data_source": data_source(model="tiny")}, 400, "eval.data_source.model"),
        ({"data_source": {**data_source(), "type": "jsonl"}}, 400, "eval.data_source.type"),
        (
            {
                "data_source": data_source(
                    input_messages={
                        "type": "template",
                        "template": [{"role": "user", "content": "{{item.nope}}"}],
                    }
                )
            },
            400,
            "eval.data_source.input_messages.template[0].content",
        ),
        (
            {
                "data_source": data_source(
                    source={"type": "file_content", "content": [{"item": {"question": "q"}}]}
                )
            },
            400,
            "eval.data_source.source.content[0].item.answer",
        ),
        (
            {"data_source": data_source(sampling_params={"temperature": 9})},
            400,
            "eval.data_source.sampling_params.temperature",
        ),
        (
            {"data_source": data_source(source={"type": "file_id", "id": "THEIRS"})},
            404,
            "eval.data_source.source.id",
        ),
        ({"data_source": "x"}, 400, "eval.data_source"),
        ({"eval_id": 3}, 400, "eval.eval_id"),
    ],
)
def test_a_bad_eval_is_refused_naming_the_field_and_creates_nothing(
    client, redis_client, entry, status, param
):
    fid = upload(client, "k1", [CHAT], "fine-tune")
    mine = new_eval(client, "k1")
    theirs = new_eval(client, "k2")
    their_file = upload(client, "k2", ITEMS, "evals")
    full = {"eval_id": mine, "data_source": data_source(), **entry}
    if full["eval_id"] == "OTHER":
        full["eval_id"] = theirs
    src = full["data_source"].get("source") if isinstance(full["data_source"], dict) else None
    if isinstance(src, dict) and src.get("id") == "THEIRS":
        src["id"] = their_file
    resp = create_job(client, "k1", fid, full)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert err["message"].startswith(param) or status == 404, err
    assert client.get("/v1/fine_tuning/jobs", headers=auth("k1")).json()["data"] == []


# ---- the worker: one run per checkpoint, its result on the job
@pytest.fixture
def stores(redis_client, tmp_path):
    return (
        JobStore(redis_client, "test:"),
        EvalRunStore(redis_client, "test:"),
        EvalStore(redis_client, "test:"),
        FileStore(redis_client, tmp_path, "test:"),
    )


def test_a_checkpoint_report_applied_twice_makes_one_run_and_reports_once(stores, tmp_path):
    jobs, runs, evals, files = stores
    ev = evals.create(tenant="t1", **EVAL)
    jobs.create("ftjob-e", "{}", JobStatus.running, tenant="t1")
    ckpt_dir = tmp_path / "jobs" / "ftjob-e" / "output" / "checkpoint-4"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "config.json").write_text("{}")
    queued: list[str] = []
    spec_eval = {"eval_id": ev["id"], "data_source": data_source()}

    def on_checkpoint(meta):
        return create_checkpoint_run(
            jobs, runs, evals, files, tmp_path, "ftjob-e", spec_eval, meta, queued.append
        )

    rep = Reporter()
    rep.log(4, 4, {"loss": 1.0}, trained_tokens=10)
    rep.checkpoint(4, "jobs/ftjob-e/output/checkpoint-4", {}, final=True)
    line = rep.sent[-1].model_dump_json()
    for _ in range(2):  # the same report ingested again (a redelivery)
        ingest = ReportIngest(jobs, "ftjob-e", "tiny", on_checkpoint=on_checkpoint)
        ingest.handle_line(rep.sent[0].model_dump_json())
        ingest.handle_line(line)
    listed, _ = runs.list(ev["id"], None, 10)
    (ckpt,) = jobs.checkpoints("ftjob-e")
    assert len(listed) == 1, listed
    run = listed[0]
    assert run["model"] == run["data_source"]["model"] == run["spec"]["model"]["name"]
    assert run["name"] == "ftjob-e step 4" and run["tenant"] == "t1" and run["total"] == 4
    assert run["metadata"]["fine_tuning_job_id"] == "ftjob-e"
    assert run["metadata"]["step"] == "4" and run["metadata"]["final"] == "true"
    assert run["spec"]["model"]["path"] == str(ckpt_dir.resolve())
    assert run["spec"]["sampling"] == {"temperature": 0, "max_completion_tokens": 8}
    assert queued == [run["id"], run["id"]]  # still queued: its message is sent again

    # graded (three of four right), the pass rate lands on the checkpoint and in one event
    def sampler(messages):
        q = messages[0]["content"]
        return {"content": "a" + q[1:] if q != "q3" else "no", "usage": {}}

    wsettings = WorkerSettings(redis_url="redis://unused", key_prefix="test:", data_dir=tmp_path)
    assert grade_run(run["id"], runs, files, wsettings, sampler=sampler) == "completed"
    assert not report_to_job(run["id"], runs, jobs, evals)  # already reported, once
    (ckpt,) = jobs.checkpoints("ftjob-e")
    assert ckpt["metrics"]["eval_pass_rate"] == 0.75 and ckpt["metrics"]["train_loss"] == 1.0
    events = [f for _, f in jobs.events("ftjob-e", None, 50)[0]]
    said = [e for e in events if e["message"].startswith("Eval qa: ")]
    assert [e["message"] for e in said] == ["Eval qa: 3/4 passed at step 4"]
    assert json.loads(said[0]["data"])["per_testing_criteria_pass_rate"] == {"exact": 0.75}
    assert sum("queued for the checkpoint" in e["message"] for e in events) == 1


def test_a_pruned_checkpoint_fails_its_run_naming_it(stores, tmp_path):
    jobs, runs, evals, files = stores
    ev = evals.create(**EVAL)
    jobs.create("ftjob-p", "{}", JobStatus.running)
    meta = {"id": "ftckpt-gone", "step": 2, "path": "jobs/ftjob-p/output/checkpoint-2"}
    jobs.add_checkpoint("ftjob-p", {**meta, "metrics": {"step": 2}})
    spec_eval = {"eval_id": ev["id"], "data_source": data_source()}
    run_id = create_checkpoint_run(
        jobs, runs, evals, files, tmp_path, "ftjob-p", spec_eval, meta, lambda _: None
    )
    wsettings = WorkerSettings(redis_url="redis://unused", key_prefix="test:", data_dir=tmp_path)
    assert grade_run(run_id, runs, files, wsettings, sampler=lambda m: {}) == "failed"
    error = runs.get(run_id)["error"]
    assert error["code"] == "model_not_found" and "ftckpt-gone" in error["message"]
    assert "keep_checkpoints" in error["message"]
    events = [f["message"] for _, f in jobs.events("ftjob-p", None, 50)[0]]
    assert any(m.startswith("Eval qa failed at step 2: the checkpoint ftckpt-gone") for m in events)


def _job_keeping_one(stores, tmp_path, job_id: str, tenant: str):
    """A running job with keep_checkpoints 1 and an eval per checkpoint, fed checkpoint
    reports as the supervisor would; ``checkpoint(step)`` reports one, ``kept()`` is the
    steps its record keeps and the directories left, ``made`` its runs' ids."""
    jobs, runs, evals, files = stores
    ev = evals.create(tenant=tenant, **EVAL)
    jobs.create(job_id, "{}", JobStatus.running, tenant=tenant, eval_runs_limit=5)
    out = tmp_path / "jobs" / job_id / "output"
    spec_eval = {"eval_id": ev["id"], "data_source": data_source()}
    made: list[str] = []

    def on_checkpoint(meta):
        new = create_checkpoint_run(
            jobs, runs, evals, files, tmp_path, job_id, spec_eval, meta, lambda _: None,
            queue="posttrain.q", keep=1,
        )  # fmt: skip
        made.append(new)

    ingest = ReportIngest(
        jobs, job_id, "tiny", data_dir=tmp_path, keep_checkpoints=1, on_checkpoint=on_checkpoint
    )
    rep = Reporter()

    def checkpoint(step: int, final: bool = False) -> None:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        rep.checkpoint(step, f"jobs/{job_id}/output/checkpoint-{step}", {}, final=final)
        ingest.handle_line(rep.sent[-1].model_dump_json())

    def kept() -> tuple[list[int], list[str]]:
        steps = [c["step"] for c in jobs.checkpoints(job_id)]
        return steps, sorted(p.name for p in out.iterdir())

    return ev, checkpoint, kept, made


def test_a_checkpoint_is_not_pruned_while_its_eval_run_is_pending(stores, tmp_path):
    """keep_checkpoints 1 with an eval per checkpoint: a checkpoint whose run is queued or
    in progress stays (record and directory) past the newest one; its run's end prunes
    it, whichever way the run ended."""
    _, runs, _, files = stores
    _, checkpoint, kept, made = _job_keeping_one(stores, tmp_path, "ftjob-k", "t1")
    for step in (1, 2, 3):
        checkpoint(step)
    both = ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert kept() == ([1, 2, 3], both)  # runs of 1 and 2 still queued
    run1, run2, run3 = made
    assert runs.get(run1)["queue"] == "posttrain.q" and runs.get(run1)["limit"] == 5
    wsettings = WorkerSettings(redis_url="redis://unused", key_prefix="test:", data_dir=tmp_path)

    def sampler(messages):
        return {"content": "a" + messages[0]["content"][1:], "usage": {}}

    # run 2 is being graded (in progress): still kept; run 1 completes: pruned
    assert runs.claim(run2, "w", 30, 0, 3).outcome == "claimed"
    assert grade_run(run1, runs, files, wsettings, sampler=sampler) == "completed"
    assert kept() == ([2, 3], ["checkpoint-2", "checkpoint-3"])
    # a canceled run releases its checkpoint too (when its task next meets it)
    runs.transition(run2, "canceled", ("in_progress",))
    assert grade_run(run2, runs, files, wsettings, sampler=sampler) == "canceled"
    assert kept() == ([3], ["checkpoint-3"])
    # the final checkpoint is never pruned; the run of step 3 ends: 3 is the newest kept
    checkpoint(4, final=True)
    assert kept() == ([3, 4], ["checkpoint-3", "checkpoint-4"])
    assert grade_run(run3, runs, files, wsettings, sampler=sampler) == "completed"
    assert kept() == ([3, 4], ["checkpoint-3", "checkpoint-4"])
    assert [runs.get(r)["status"] for r in made[:3]] == ["completed", "canceled", "completed"]
    # a checkpoint whose run has ended is pruned as before when a newer one comes
    checkpoint(5)
    assert kept() == ([4, 5], ["checkpoint-4", "checkpoint-5"])


def test_a_checkpoint_run_canceled_through_the_api_releases_its_checkpoint(
    client, stores, tmp_path
):
    tenant = f"key-{hash_key('k1')[:12]}"  # the API's tenant of the key k1
    ev, checkpoint, kept, made = _job_keeping_one(stores, tmp_path, "ftjob-c", tenant)
    for step in (1, 2, 3):
        checkpoint(step)
    assert kept()[0] == [1, 2, 3]
    path = f"/v1/evals/{ev['id']}/runs"
    assert client.post(f"{path}/{made[0]}/cancel", headers=auth("k1")).status_code == 200
    assert kept() == ([2, 3], ["checkpoint-2", "checkpoint-3"])
    assert client.delete(f"{path}/{made[1]}", headers=auth("k1")).status_code == 200
    assert kept() == ([3], ["checkpoint-3"])
