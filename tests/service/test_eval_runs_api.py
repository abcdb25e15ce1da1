"""OpenAI's Evals API, the runs (``/v1/evals/{eval_id}/runs``), driven with the ``openai`` SDK.

No Celery worker runs here: a test grades a run by calling the task's function
(``workers.evaltasks.grade_run``) in-process with the app's stores. Answers validate as
the SDK's own types (``openai`` 3.54): ``RunCreateResponse``, ``RunRetrieveResponse``,
``RunListResponse``, ``RunCancelResponse``, ``RunDeleteResponse``,
``OutputItemListResponse`` and ``OutputItemRetrieveResponse``.
"""

from __future__ import annotations

import io
import json
import re

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.evals import (
    RunCancelResponse,
    RunCreateResponse,
    RunDeleteResponse,
    RunListResponse,
    RunRetrieveResponse,
)
from openai.types.evals.runs import OutputItemListResponse, OutputItemRetrieveResponse

from service.main import create_app
from service.settings import ApiSettings
from workers.evalgrading import passes
from workers.evaltasks import grade_run
from workers.recovery import broker_has_message, recover_eval_runs

ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "n": {"type": "integer"},
    },
    "required": ["question", "answer"],
}
CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
SOURCE = {"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True}
RUN_ID = re.compile(r"^evalrun_[0-9a-f]{32}$")


def rows(n: int, wrong: set[int] = frozenset()) -> list[dict]:
    """n rows whose sample answers right except at the indexes in ``wrong``."""
    return [
        {
            "item": {"question": f"q{i}", "answer": f"a{i}"},
            "sample": {"output_text": "nope" if i in wrong else f"a{i}", "model": "m"},
        }
        for i in range(n)
    ]


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-eval-runs",
        api_keys="k1,k2",
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def http(app):
    with TestClient(app) as c:
        yield c


def _sdk(http, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
    )


@pytest.fixture
def sdk(http):
    return _sdk(http, "k1")


@pytest.fixture
def other(http):
    return _sdk(http, "k2")


@pytest.fixture
def ev(sdk):
    return sdk.evals.create(name="qa", data_source_config=SOURCE, testing_criteria=[CHECK])


def grade(app, settings, run_id, **kw) -> str:
    s = app.state
    return grade_run(run_id, s.eval_runs, s.files, settings, **kw)


def events(http, eval_id, run_id, key="k1", **params) -> list[dict]:
    """Every event of the run, newest first (``GET .../events``)."""
    resp = http.get(
        f"/v1/evals/{eval_id}/runs/{run_id}/events",
        params={"limit": 1000, **params},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def jsonl(content) -> dict:
    return {"type": "jsonl", "source": {"type": "file_content", "content": content}}


def refusal(call, status=400) -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value.body
    err = info.value.body
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] and err["message"]
    return err


def raw_json(call) -> dict:
    return call().http_response.json()


# ---- a jsonl run, graded
def test_jsonl_run_graded_to_completed(sdk, app, settings, ev):
    body = raw_json(
        lambda: sdk.evals.runs.with_raw_response.create(
            ev.id, data_source=jsonl(rows(5, wrong={1, 3})), name="r1", metadata={"k": "v"}
        )
    )
    run = RunCreateResponse.model_validate(body)
    assert RUN_ID.match(run.id) and run.object == "eval.run" and run.eval_id == ev.id
    assert run.status == "queued" and run.name == "r1" and run.metadata == {"k": "v"}
    assert body["data_source"] == jsonl(rows(5, wrong={1, 3}))
    assert body["result_counts"] == {"total": 5, "errored": 0, "failed": 0, "passed": 0}
    assert body["report_url"].endswith(f"/v1/evals/{ev.id}/runs/{run.id}")

    assert grade(app, settings, run.id) == "completed"
    body = raw_json(lambda: sdk.evals.runs.with_raw_response.retrieve(run.id, eval_id=ev.id))
    done = RunRetrieveResponse.model_validate(body)
    assert done.status == "completed"
    assert body["result_counts"] == {"total": 5, "errored": 0, "failed": 2, "passed": 3}
    assert body["per_testing_criteria_results"] == [
        {"testing_criteria": "exact", "passed": 3, "failed": 2}
    ]
    assert body["per_model_usage"] == []  # a jsonl run samples nothing
    assert body["error"] == {"code": "", "message": ""}
    # a second delivery of the task finds the run finished
    assert grade(app, settings, run.id) == "completed"


def test_output_items_page_and_filter(sdk, http, app, settings, ev):
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(7, wrong={0, 4, 5})))
    grade(app, settings, run.id)
    auth = {"Authorization": "Bearer k1"}
    url = f"/v1/evals/{ev.id}/runs/{run.id}/output_items"
    body = http.get(url, params={"limit": 3}, headers=auth).json()
    OutputItemListResponse.model_validate(body["data"][0])
    assert [i["datasource_item_id"] for i in body["data"]] == [0, 1, 2]
    assert body["has_more"] is True and body["last_id"] == body["data"][-1]["id"]
    # the SDK's auto-pagination walks every page
    everything = list(sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=2))
    assert [i.datasource_item_id for i in everything] == list(range(7))
    failed = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail")
    assert [i.datasource_item_id for i in failed] == [0, 4, 5]
    assert all(i.status == "fail" for i in failed)
    passed = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, status="pass", order="desc")
    assert [i.datasource_item_id for i in passed] == [6, 3, 2, 1]
    # one item
    first = body["data"][0]
    one = http.get(f"{url}/{first['id']}", headers=auth).json()
    item = OutputItemRetrieveResponse.model_validate(one)
    assert one == first
    assert item.object == "eval.run.output_item" and item.run_id == run.id
    assert item.eval_id == ev.id and item.status == "fail"
    assert item.datasource_item == {"question": "q0", "answer": "a0"}
    assert one["results"][0] == {
        "name": "exact",
        "type": "string_check",
        "score": 0.0,
        "passed": False,
        "sample": None,
    }
    assert item.sample.output[0].content == "nope" and item.sample.model == "m"
    assert sdk.evals.runs.output_items.retrieve(first["id"], eval_id=ev.id, run_id=run.id).id
    # unknown ids
    err = refusal(
        lambda: sdk.evals.runs.output_items.retrieve(
            "outputitem_x_99", eval_id=ev.id, run_id=run.id
        ),
        404,
    )
    assert err["param"] == "output_item_id"
    resp = http.get(url, params={"after": "outputitem_nope_1"}, headers=auth)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "after"


def test_run_list_and_status_filter(sdk, app, settings, ev):
    first = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(2)))
    second = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(2)))
    grade(app, settings, first.id)
    listed = sdk.evals.runs.list(ev.id)
    for run in listed.data:
        RunListResponse.model_validate(run.model_dump(by_alias=True))
    assert [r.id for r in listed.data] == [first.id, second.id]  # oldest first
    assert [r.id for r in sdk.evals.runs.list(ev.id, order="desc")] == [second.id, first.id]
    assert [r.id for r in sdk.evals.runs.list(ev.id, status="completed")] == [first.id]
    assert [r.id for r in sdk.evals.runs.list(ev.id, status="queued")] == [second.id]
    page = sdk.evals.runs.list(ev.id, limit=1)
    assert [r.id for r in page.data] == [first.id] and page.has_more
    assert [r.id for r in sdk.evals.runs.list(ev.id, after=first.id)] == [second.id]


def test_cancel_a_queued_run_and_delete(sdk, http, app, settings, ev):
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(3)))
    body = raw_json(lambda: sdk.evals.runs.with_raw_response.cancel(run.id, eval_id=ev.id))
    assert RunCancelResponse.model_validate(body).status == "canceled"
    assert grade(app, settings, run.id) == "canceled"  # the worker grades nothing
    assert sdk.evals.runs.output_items.list(run.id, eval_id=ev.id).data == []
    # OpenAI's reference path cancels too; a finished run cannot be canceled
    done = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(1)))
    grade(app, settings, done.id)
    resp = http.post(f"/v1/evals/{ev.id}/runs/{done.id}", headers={"Authorization": "Bearer k1"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_state"
    # delete: the run and its items are gone
    body = raw_json(lambda: sdk.evals.runs.with_raw_response.delete(done.id, eval_id=ev.id))
    assert RunDeleteResponse.model_validate(body).deleted is True
    assert body == {"object": "eval.run.deleted", "deleted": True, "run_id": done.id}
    refusal(lambda: sdk.evals.runs.retrieve(done.id, eval_id=ev.id), 404)
    assert not app.state.redis.keys(f"test:evalrun:{done.id}*")
    # deleting the eval deletes its runs
    sdk.evals.delete(ev.id)
    assert app.state.eval_runs.r.zcard(app.state.eval_runs.k_index(ev.id)) == 0
    assert not app.state.redis.keys(f"test:evalrun:{run.id}*")


def test_another_tenant_sees_no_run_nor_item(sdk, other, app, settings, ev):
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(2)))
    grade(app, settings, run.id)
    item = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id).data[0]
    calls = [
        lambda: other.evals.runs.retrieve(run.id, eval_id=ev.id),
        lambda: other.evals.runs.list(ev.id),
        lambda: other.evals.runs.cancel(run.id, eval_id=ev.id),
        lambda: other.evals.runs.delete(run.id, eval_id=ev.id),
        lambda: other.evals.runs.create(ev.id, data_source=jsonl(rows(1))),
        lambda: other.evals.runs.output_items.list(run.id, eval_id=ev.id),
        lambda: other.evals.runs.output_items.retrieve(item.id, eval_id=ev.id, run_id=run.id),
    ]
    for call in calls:
        assert refusal(call, 404)["code"] == "not_found"
    # another tenant's run under its own eval is the same 404
    theirs = other.evals.create(name="b", data_source_config=SOURCE, testing_criteria=[CHECK])
    refusal(lambda: other.evals.runs.retrieve(run.id, eval_id=theirs.id), 404)
    assert sdk.evals.runs.retrieve(run.id, eval_id=ev.id).status == "completed"


# ---- bad input
@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"item": {"question": "q"}, "sample": {}}], "data_source.source.content[0].item.answer"),
        (
            [*rows(2), {"item": {"question": 3, "answer": "a"}, "sample": {}}],
            "data_source.source.content[2].item.question",
        ),
        (
            [{"item": {"question": "q", "answer": "a", "n": 1.5}, "sample": {}}],
            "data_source.source.content[0].item.n",
        ),
        ([{"item": {"question": "q", "answer": "a"}}], "data_source.source.content[0].sample"),
        ([{"sample": {}}], "data_source.source.content[0].item"),
        ([], "data_source.source.content"),
    ],
)
def test_rows_against_item_schema_are_400_naming_item_and_field(sdk, ev, content, param):
    err = refusal(lambda: sdk.evals.runs.create(ev.id, data_source=jsonl(content)))
    assert err["param"] == param, err
    assert param in err["message"]


def test_bad_data_sources(sdk, ev):
    def bad(data_source, status=400):
        return refusal(lambda: sdk.evals.runs.create(ev.id, data_source=data_source), status)

    assert bad({"type": "responses", "source": {}})["code"] == "unsupported_data_source"
    assert bad({"type": "nope"})["param"] == "data_source.type"
    source = {"type": "stored_completions"}
    assert bad({"type": "jsonl", "source": source})["code"] == "unsupported_data_source"
    err = bad({"type": "jsonl", "source": {"type": "file_id", "id": "file-nope"}}, 404)
    assert err["param"] == "data_source.source.id"
    items = {"type": "file_content", "content": [{"item": {"question": "q", "answer": "a"}}]}
    template = {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]}
    completions = {"type": "completions", "source": items, "input_messages": template}
    assert bad({**completions, "model": "nope"}, 404)["code"] == "model_not_found"
    assert bad(completions)["param"] == "data_source.model"
    unknown = {"type": "template", "template": [{"role": "user", "content": "{{item.nope}}"}]}
    err = bad({**completions, "model": "tiny", "input_messages": unknown})
    assert err["param"] == "data_source.input_messages.template[0].content"
    assert "item.nope" in err["message"]
    ref = {"type": "item_reference", "item_reference": "item.missing"}
    err = bad({**completions, "model": "tiny", "input_messages": ref})
    assert err["param"] == "data_source.input_messages.item_reference"
    err = bad({**completions, "model": "tiny", "sampling_params": {"temperature": 5}})
    assert err["param"] == "data_source.sampling_params.temperature"
    err = bad({**completions, "model": "tiny", "sampling_params": {"tools": []}})
    assert err["param"] == "data_source.sampling_params.tools"


def test_a_runs_spec_says_how_each_criterion_is_graded(sdk, app, settings):
    """Model graders run (tests/service/test_eval_judges.py grades them): the worker's
    spec has a reward model's directory, resolved for the tenant, and a judge's header."""
    score = {
        "type": "score_model",
        "name": "rm",
        "model": "reward",
        "input": [{"role": "user", "content": "{{sample.output_text}}"}],
    }
    judge = {**score, "name": "judge", "model": "tiny"}
    ev = sdk.evals.create(
        name="s", data_source_config=SOURCE, testing_criteria=[CHECK, score, judge]
    )
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(1)))
    none, local, asked = app.state.eval_runs.get(run.id)["spec"]["grading"]
    models = settings.data_dir / "models"
    assert none is None
    assert local["how"] == "local" and local["grader"]["model"] == str(models / "reward")
    header = {"name": "tiny", "path": str(models / "tiny"), "base": None}
    assert asked == {"how": "judge", "model": header}


def test_file_id_source(sdk, http, app, settings, ev):
    lines = "\n".join(json.dumps(r) for r in rows(4, wrong={2})).encode()
    f = sdk.files.create(file=("e.jsonl", io.BytesIO(lines)), purpose="evals")
    run = sdk.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}}
    )
    assert grade(app, settings, run.id) == "completed"
    counts = sdk.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts
    assert (counts.total, counts.passed, counts.failed) == (4, 3, 1)
    # a file that is no eval data is refused at upload, naming the line
    with pytest.raises(openai.BadRequestError) as info:
        sdk.files.create(file=("e.jsonl", io.BytesIO(b'{"item": 1}\n')), purpose="evals")
    assert "line 1" in info.value.body["message"]
    # a fine-tuning file is not eval data; another tenant's file is unknown
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"}]}
    ft = sdk.files.create(
        file=("t.jsonl", io.BytesIO(json.dumps(chat).encode())), purpose="fine-tune"
    )
    source = {"type": "jsonl", "source": {"type": "file_id", "id": ft.id}}
    err = refusal(lambda: sdk.evals.runs.create(ev.id, data_source=source))
    assert err["param"] == "data_source.source.id" and "purpose" in err["message"]
    theirs = _sdk(http, "k2").files.create(file=("e.jsonl", io.BytesIO(lines)), purpose="evals")
    source = {"type": "jsonl", "source": {"type": "file_id", "id": theirs.id}}
    refusal(lambda: sdk.evals.runs.create(ev.id, data_source=source), 404)
    # the file deleted before the run is graded: the run fails, saying why
    run = sdk.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}}
    )
    sdk.files.delete(f.id)
    assert grade(app, settings, run.id) == "failed"
    failed = sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert failed.status == "failed" and failed.error.code == "file_not_found"


# ---- crash-safe resume
def test_a_run_resumed_after_a_crash_never_regrades(sdk, http, app, settings, ev):
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(6, wrong={1, 4})))
    assert grade(app, settings, run.id, stop_after=3) == "stopped"  # the worker "dies"
    mid = sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert mid.status == "in_progress"
    store = app.state.eval_runs
    before = {i: store.item(run.id, i) for i in range(3)}
    assert all(before.values()) and store.item(run.id, 3) is None
    # mark the stored items, so a regrade (which would overwrite them) shows
    for i, item in before.items():
        store.r.hset(store.k_items(run.id), str(i), json.dumps({**item, "created_at": 7}))
    assert grade(app, settings, run.id) == "completed"  # the redelivered task
    for i in range(3):
        assert store.item(run.id, i)["created_at"] == 7
    done = sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    counts = done.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (6, 4, 2, 0)
    assert store.get(run.id)["progress"] == 6 and store.get(run.id)["regraded"] == 0
    (resumed,) = [e for e in events(http, ev.id, run.id) if e["type"] == "resumed"]
    assert resumed["data"]["stored"] == 3 and resumed["data"]["attempt"] == 2
    assert "3 of 6 rows were graded before" in resumed["message"]
    # storing a row twice changes nothing
    assert store.store_item(run.id, 0, before[0], "passed", {"c0:passed": 1}) == 0
    assert sdk.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.passed == 4


# ---- runs are jobs: events, grading slots per tenant, recovery
def test_a_run_says_what_became_of_it_in_events(sdk, http, app, settings, ev):
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(40, wrong={0, 5})))
    assert grade(app, settings, run.id, worker="w@test") == "completed"
    said = events(http, ev.id, run.id)
    kinds = [e["type"] for e in said]
    assert kinds[0] == "completed" and kinds[-2:] == ["started", "created"], kinds
    assert said[-2]["message"] == "Grading started on w@test"
    assert said[-2]["data"] == {"worker": "w@test", "attempt": 1}
    assert said[-1]["data"]["total"] == 40 and said[-1]["level"] == "info"
    # a progress event every 5% of the rows (2 here), each with the counts so far
    progress = [e["data"] for e in reversed(said) if e["type"] == "progress"]
    assert [p["done"] for p in progress] == list(range(2, 41, 2))
    assert progress[2] == {"done": 6, "total": 40, "passed": 4, "failed": 2, "errored": 0}
    assert said[0]["data"] == {
        "progress": 40, "total": 40, "passed": 38, "failed": 2, "errored": 0, "regraded": 0,
    }  # fmt: skip
    assert said[0]["message"] == "Run completed: 40 rows graded, 38 passed, 2 failed, 0 errored"
    assert all(
        e["object"] == "eval.run.event" and e["id"].startswith("evalrunevent-") for e in said
    )
    # pages: newest first, ``after`` the last id of the previous page
    paged, after = [], None
    while True:
        page_ = http.get(
            f"/v1/evals/{ev.id}/runs/{run.id}/events",
            params={"limit": 7, **({"after": after} if after else {})},
            headers={"Authorization": "Bearer k1"},
        ).json()
        paged += page_["data"]
        if not page_["has_more"]:
            break
        after = page_["last_id"]
    assert paged == said
    bad = http.get(
        f"/v1/evals/{ev.id}/runs/{run.id}/events",
        params={"after": "nope"},
        headers={"Authorization": "Bearer k1"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    # a failed run says why; a canceled one how far it got
    body = json.dumps(rows(1)[0]).encode()
    f = sdk.files.create(file=("rows.jsonl", body), purpose="evals")
    gone = sdk.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}}
    )
    sdk.files.delete(f.id)
    assert grade(app, settings, gone.id) == "failed"
    last = events(http, ev.id, gone.id)[0]
    assert last["type"] == "failed" and last["level"] == "error"
    assert last["data"]["error"]["code"] == "file_not_found"
    assert last["message"] == f"Run failed: the file {f.id} was deleted"
    stopped = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(4)))
    assert grade(app, settings, stopped.id, stop_after=1) == "stopped"
    sdk.evals.runs.cancel(stopped.id, eval_id=ev.id)
    last = events(http, ev.id, stopped.id)[0]
    assert last["type"] == "canceled" and last["data"] == {"progress": 1, "total": 4}


def _broker_has(app, settings, run_id) -> bool:
    """A ``posttrain.run_eval`` message for the run waits in the broker (the test's Redis)."""
    has = broker_has_message(app.state.redis, settings.queue, settings.broker_key_prefix)
    return has(run_id)


def test_at_most_k_runs_of_a_tenant_grade_at_once(sdk, other, http, app, settings, ev):
    assert settings.eval_runs_per_tenant == 2
    store = app.state.eval_runs
    a, b, c = (sdk.evals.runs.create(ev.id, data_source=jsonl(rows(3))) for _ in range(3))
    assert store.get(a.id)["limit"] == 2  # the tenant's limit, recorded on the run
    # two workers grade a and b (their claims hold the tenant's two slots)
    for run in (a, b):
        assert store.claim(run.id, f"w-{run.id}", 30, 2, 3).outcome == "claimed"
    app.state.redis.delete(f"{settings.broker_key_prefix}{settings.queue}")  # sent messages
    assert grade(app, settings, c.id) == "waiting"
    assert grade(app, settings, c.id) == "waiting"  # a duplicate message: still waiting
    assert sdk.evals.runs.retrieve(c.id, eval_id=ev.id).status == "queued"
    waits = [e for e in events(http, ev.id, c.id) if e["type"] == "waiting"]
    assert len(waits) == 1 and waits[0]["data"] == {"grading": 2, "slots": 2}, waits
    # another tenant's runs are not held back
    ev_b = other.evals.create(name="b", data_source_config=SOURCE, testing_criteria=[CHECK])
    theirs = other.evals.runs.create(ev_b.id, data_source=jsonl(rows(2)))
    assert grade(app, settings, theirs.id) == "completed"
    # a cancel frees a's slot, and c's task is sent again at once
    assert not _broker_has(app, settings, c.id)
    sdk.evals.runs.cancel(a.id, eval_id=ev.id)
    assert _broker_has(app, settings, c.id)
    assert grade(app, settings, c.id) == "completed"
    # b's worker is killed: the slot it held frees once its lease has run out
    d, e = (sdk.evals.runs.create(ev.id, data_source=jsonl(rows(2))) for _ in range(2))
    assert store.claim(d.id, "w-d", 30, 2, 3).outcome == "claimed"
    assert grade(app, settings, e.id) == "waiting"
    store.expire_lease(b.id)  # what b's lease running out amounts to
    assert grade(app, settings, e.id) == "completed"
    assert store.get(b.id)["status"] == "in_progress"  # until the reaper requeues it
    sent: list[str] = []
    assert recover_eval_runs(store, sent.append, lambda _: False, 60, 2) == [b.id]
    assert sent == [b.id] and store.get(b.id)["status"] == "queued"
    (requeued,) = [x for x in events(http, ev.id, b.id) if x["type"] == "requeued"]
    assert requeued["level"] == "warn" and requeued["data"]["worker"] == f"w-{b.id}"
    assert grade(app, settings, b.id) == "completed"  # d holds one slot, b takes the other
    # 0 = no limit
    unlimited = ApiSettings(**{**settings.model_dump(), "eval_runs_per_tenant": 0})
    with TestClient(create_app(unlimited)) as c0:
        many = [
            c0.post(
                f"/v1/evals/{ev.id}/runs",
                json={"data_source": jsonl(rows(1))},
                headers={"Authorization": "Bearer k1"},
            ).json()["id"]
            for _ in range(3)
        ]
    assert all(store.get(r)["limit"] == 0 for r in many)
    assert [store.claim(r, "w", 30, 0, 3).outcome for r in many] == ["claimed"] * 3


def test_a_waiting_run_is_never_lost(sdk, app, settings, ev):
    """The message of a run woken for a freed slot can be lost (a crash between the wake
    and the send): the reaper sends it again; and one still queued is not sent twice."""
    store = app.state.eval_runs
    a, b = (sdk.evals.runs.create(ev.id, data_source=jsonl(rows(2))) for _ in range(2))
    for run in (a, b):
        store.claim(run.id, "w", 30, 2, 3)
    c = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(2)))
    assert grade(app, settings, c.id) == "waiting"
    store.transition(a.id, "completed", ("in_progress",))  # a ended; its worker died then
    sent: list[str] = []
    assert recover_eval_runs(store, sent.append, lambda _: False, 60, 2) == [c.id]
    # woken just now: not again within the grace period, nor while its message waits
    assert recover_eval_runs(store, sent.append, lambda _: False, 60, 2) == []
    assert recover_eval_runs(store, sent.append, lambda _: True, 0, 2) == []
    assert recover_eval_runs(store, sent.append, lambda _: False, 0, 2) == [c.id]
    assert grade(app, settings, c.id) == "completed"
    assert recover_eval_runs(store, sent.append, lambda _: False, 0, 2) == []
    assert not store.r.zscore(store.k_queued(), c.id)


def test_a_run_claimed_too_often_fails_naming_why(sdk, http, app, settings, ev):
    run = sdk.evals.runs.create(ev.id, data_source=jsonl(rows(5)))
    for _ in range(settings.max_attempts):  # each grading process "dies" after one row
        assert grade(app, settings, run.id, stop_after=1) == "stopped"
    assert grade(app, settings, run.id) == "failed"
    failed = sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert failed.status == "failed" and failed.error.code == "worker_lost"
    assert "stopped unexpectedly 3 times" in failed.error.message
    assert failed.result_counts.total == 5 and app.state.eval_runs.get(run.id)["progress"] == 3
    assert events(http, ev.id, run.id)[0]["type"] == "failed"


# ---- completions, with a stand-in for the inference worker
def test_completions_run_samples_and_grades(sdk, app, settings):
    ev = sdk.evals.create(
        name="c",
        data_source_config=SOURCE,
        testing_criteria=[{**CHECK, "input": "{{sample.output_text}}"}],
    )
    items = [{"item": {"question": f"q{i}", "answer": f"a{i}"}} for i in range(3)]
    template = [
        {"role": "system", "content": "Answer."},
        {"role": "user", "content": {"type": "input_text", "text": "Q: {{item.question}}"}},
    ]
    run = sdk.evals.runs.create(
        ev.id,
        data_source={
            "type": "completions",
            "model": "tiny",
            "source": {"type": "file_content", "content": items},
            "input_messages": {"type": "template", "template": template},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 8, "seed": 1},
        },
    )
    assert run.model == "tiny"
    seen = []

    def sampler(messages):
        seen.append(messages)
        question = messages[-1]["content"].removeprefix("Q: ")
        if question == "q2":
            return {"error": {"code": "inference_unavailable", "message": "no worker"}}
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        answer = "a0" if question == "q0" else "wrong"
        return {"content": answer, "finish_reason": "stop", "usage": usage}

    assert grade(app, settings, run.id, sampler=sampler) == "completed"
    assert seen[0] == [
        {"role": "system", "content": "Answer."},
        {"role": "user", "content": "Q: q0"},
    ]
    body = sdk.evals.runs.with_raw_response.retrieve(run.id, eval_id=ev.id).http_response.json()
    RunRetrieveResponse.model_validate(body)
    assert body["result_counts"] == {"total": 3, "errored": 1, "failed": 1, "passed": 1}
    assert body["per_model_usage"] == [
        {
            "model_name": "tiny",
            "invocation_count": 2,
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 14,
            "cached_tokens": 0,
        }
    ]
    items = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    assert items[0].sample.input[1].content == "Q: q0" and items[0].sample.temperature == 0
    assert items[0].sample.max_completion_tokens == 8 and items[0].sample.finish_reason == "stop"
    assert items[2].sample.error.code == "inference_unavailable" and items[2].results == []


def test_pass_rule():
    assert passes("string_check", 1.0, None) and not passes("string_check", 0.99, None)
    assert passes("text_similarity", 0.7, 0.7) and not passes("text_similarity", 0.69, 0.7)
    assert passes("regex", 0.51, None) and not passes("regex", 0.5, None)
