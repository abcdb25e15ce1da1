"""OpenAI's Evals API, the eval objects (``/v1/evals``), driven with the official ``openai`` SDK.

The reference is the SDK's own types (``openai`` 3.54): every answer validates as
``EvalCreateResponse``, ``EvalRetrieveResponse``, ``EvalListResponse``,
``EvalUpdateResponse`` or ``EvalDeleteResponse`` and carries each of their required
fields. Two keys are two tenants: one's evals are the other's unknown ids.
"""

from __future__ import annotations

import copy
import re
import time

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import (
    EvalCreateResponse,
    EvalDeleteResponse,
    EvalListResponse,
    EvalRetrieveResponse,
    EvalUpdateResponse,
)

from service.main import create_app
from service.routes.evals import SAMPLE_SCHEMA
from service.settings import ApiSettings
from workers.evalstore import EvalNotFound, EvalStore

ITEM_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "meta": {"type": "object", "properties": {"source": {"type": "string"}}},
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
ID = re.compile(r"^eval_[0-9a-f]{32}$")


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-evals",
        api_keys="k1,k2",
    )


@pytest.fixture
def http(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _sdk(http, key: str) -> openai.OpenAI:
    """The SDK, its requests served by the app (a TestClient is an httpx.Client)."""
    return openai.OpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
    )


@pytest.fixture
def sdk(http):
    return _sdk(http, "k1")


@pytest.fixture
def other(http):
    return _sdk(http, "k2")


def create(sdk, **overrides):
    body = {
        "name": "qa",
        "data_source_config": SOURCE,
        "testing_criteria": [CHECK],
        "metadata": {"team": "a"},
        **overrides,
    }
    return sdk.evals.create(**body)


def required_fields(model) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items() if f.is_required()}


def refusal(call, status=400) -> dict:
    """The error object of a refused SDK call."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value.body
    err = info.value.body
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] and err["message"]
    return err


# ---- the objects
def test_create_answers_openai_eval_object(sdk):
    before = int(time.time())
    raw = sdk.evals.with_raw_response.create(
        name="qa", data_source_config=SOURCE, testing_criteria=[CHECK], metadata={"team": "a"}
    )
    body = raw.http_response.json()
    assert required_fields(EvalCreateResponse) <= body.keys()
    ev = EvalCreateResponse.model_validate(body)
    assert ID.match(ev.id) and ev.object == "eval"
    assert ev.name == "qa" and ev.metadata == {"team": "a"}
    assert before <= ev.created_at <= int(time.time())
    assert body["testing_criteria"] == [CHECK]
    assert ev.testing_criteria[0].type == "string_check"
    # OpenAI's answered schema: the run data's namespaces, item and sample
    assert body["data_source_config"] == {
        "type": "custom",
        "schema": {
            "type": "object",
            "properties": {"item": ITEM_SCHEMA, "sample": SAMPLE_SCHEMA},
            "required": ["item", "sample"],
        },
    }
    assert ev.data_source_config.type == "custom"
    assert ev.data_source_config.schema_["properties"]["item"] == ITEM_SCHEMA
    sample = SAMPLE_SCHEMA["properties"]
    assert {"output_text", "output_json", "choices", "model"} <= sample.keys()


def test_without_sample_schema_only_item_is_declared(sdk, http):
    item_only = {"type": "custom", "item_schema": ITEM_SCHEMA}
    check = {**CHECK, "input": "{{item.question}}"}
    ev = create(sdk, data_source_config=item_only, testing_criteria=[check], name=None)
    body = http.get(f"/v1/evals/{ev.id}", headers={"Authorization": "Bearer k1"}).json()
    assert body["data_source_config"]["schema"] == {
        "type": "object",
        "properties": {"item": ITEM_SCHEMA},
        "required": ["item"],
    }
    assert body["name"] == "" and ev.name == ""


def test_unset_metadata_is_an_empty_map(sdk):
    ev = sdk.evals.create(data_source_config=SOURCE, testing_criteria=[CHECK])
    assert ev.metadata == {}


def test_retrieve(sdk):
    ev = create(sdk)
    raw = sdk.evals.with_raw_response.retrieve(ev.id).http_response.json()
    assert required_fields(EvalRetrieveResponse) <= raw.keys()
    got = EvalRetrieveResponse.model_validate(raw)
    assert got.model_dump() == ev.model_dump()


def test_posttrain_graders_and_thresholds_are_kept(sdk):
    """score_model (a local reward model the caller may use) with OpenAI's pass_threshold,
    text_similarity, and posttrain's own regex and multi graders."""
    criteria = [
        {
            "type": "score_model",
            "name": "rm",
            "model": "reward",
            "input": [{"role": "user", "content": "{{item.question}} {{sample.output_text}}"}],
            "range": [0, 1],
            "pass_threshold": 0.5,
        },
        {
            "type": "text_similarity",
            "name": "sim",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "evaluation_metric": "rouge_l",
            "pass_threshold": 0.8,
        },
        {"type": "regex", "name": "digits", "input": "{{sample.output_text}}", "pattern": r"\d+"},
        {
            "type": "multi",
            "name": "both",
            "graders": {"a": CHECK, "b": {**CHECK, "name": "b", "operation": "ilike"}},
            "calculate_output": "0.5 * a + 0.5 * b",
        },
    ]
    ev = create(sdk, testing_criteria=criteria)
    raw = sdk.evals.with_raw_response.retrieve(ev.id).http_response.json()
    assert raw["testing_criteria"] == criteria
    assert ev.testing_criteria[0].pass_threshold == 0.5
    assert ev.testing_criteria[1].pass_threshold == 0.8


def test_list_pages_newest_first(sdk):
    ids = [create(sdk, name=f"e{i}").id for i in range(5)]
    page = sdk.evals.list(limit=2)
    assert [e.id for e in page.data] == ids[::-1][:2] and page.has_more
    rest = sdk.evals.list(limit=2, after=page.data[-1].id)
    assert [e.id for e in rest.data] == ids[::-1][2:4] and rest.has_more
    last = sdk.evals.list(limit=2, after=rest.data[-1].id)
    assert [e.id for e in last.data] == ids[:1] and not last.has_more
    assert [e.id for e in sdk.evals.list(limit=2)] == ids[::-1]  # the SDK follows `after`
    asc = sdk.evals.list(order="asc", limit=3)
    assert [e.id for e in asc.data] == ids[:3]
    assert [e.id for e in sdk.evals.list(order="asc", after=ids[2])] == ids[3:]


def test_list_answers_openai_page(sdk, http):
    ids = [create(sdk).id for _ in range(2)]
    body = http.get("/v1/evals", headers={"Authorization": "Bearer k1"}).json()
    assert body["object"] == "list" and body["has_more"] is False
    assert (body["first_id"], body["last_id"]) == (ids[1], ids[0])
    for item in body["data"]:
        assert required_fields(EvalListResponse) <= item.keys()
        EvalListResponse.model_validate(item)
    empty = http.get("/v1/evals", headers={"Authorization": "Bearer k2"}).json()
    assert empty == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": "",  # strings on an empty page too, as OpenAI's OpenAPI document says
        "last_id": "",
    }


def test_list_by_update_time(sdk):
    ids = [create(sdk, name=f"e{i}").id for i in range(3)]
    sdk.evals.update(ids[0], name="touched")
    by_update = [e.id for e in sdk.evals.list(order_by="updated_at")]
    assert by_update == [ids[0], ids[2], ids[1]]
    assert [e.id for e in sdk.evals.list(order_by="created_at")] == ids[::-1]
    asc = [e.id for e in sdk.evals.list(order_by="updated_at", order="asc")]
    assert asc == [ids[1], ids[2], ids[0]]


@pytest.mark.parametrize(
    "query,param",
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"order": "newest"}, "order"),
        ({"order_by": "name"}, "order_by"),
        ({"after": "eval_" + "0" * 32}, "after"),
    ],
)
def test_bad_list_queries(http, query, param):
    resp = http.get("/v1/evals", params=query, headers={"Authorization": "Bearer k1"})
    assert resp.status_code in (400, 404), resp.text
    assert resp.status_code == (404 if param == "after" else 400)
    assert resp.json()["error"]["param"] == param


def test_update_name_and_metadata(sdk):
    ev = create(sdk)
    raw = sdk.evals.with_raw_response.update(ev.id, name="renamed", metadata={"v": "2"})
    body = raw.http_response.json()
    assert required_fields(EvalUpdateResponse) <= body.keys()
    up = EvalUpdateResponse.model_validate(body)
    assert (up.name, up.metadata) == ("renamed", {"v": "2"})
    assert up.created_at == ev.created_at and body["testing_criteria"] == [CHECK]
    again = sdk.evals.update(ev.id, metadata={"w": "3"})  # name unchanged
    assert (again.name, again.metadata) == ("renamed", {"w": "3"})
    cleared = sdk.evals.update(ev.id, metadata=None)
    assert cleared.metadata == {}
    got = sdk.evals.retrieve(ev.id)
    assert (got.name, got.metadata) == ("renamed", {})


@pytest.mark.parametrize(
    "body,param",
    [
        ({"testing_criteria": [CHECK]}, "testing_criteria"),
        ({"data_source_config": SOURCE}, "data_source_config"),
        ({"name": "x" * 257}, "name"),
        ({"name": None}, "name"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
    ],
)
def test_update_changes_only_name_and_metadata(sdk, body, param):
    ev = create(sdk)
    err = refusal(lambda: sdk.evals.update(ev.id, extra_body=body))
    assert err["param"] == param
    assert sdk.evals.retrieve(ev.id).model_dump() == ev.model_dump()


def test_delete_then_404(sdk):
    ev = create(sdk)
    keep = create(sdk)
    raw = sdk.evals.with_raw_response.delete(ev.id).http_response.json()
    assert raw == {"object": "eval.deleted", "deleted": True, "eval_id": ev.id}
    assert required_fields(EvalDeleteResponse) <= raw.keys()
    EvalDeleteResponse.model_validate(raw)
    for call in (
        lambda: sdk.evals.retrieve(ev.id),
        lambda: sdk.evals.delete(ev.id),
        lambda: sdk.evals.update(ev.id, name="x"),
    ):
        err = refusal(call, 404)
        assert err["code"] == "not_found" and err["param"] == "eval_id"
    assert [e.id for e in sdk.evals.list()] == [keep.id]


# ---- tenants
def test_another_tenants_eval_is_an_unknown_id(sdk, other):
    mine = create(sdk)
    unknown = "eval_" + "0" * 32

    def same_as_unknown(call):
        theirs = refusal(lambda: call(mine.id), 404)
        nobody = refusal(lambda: call(unknown), 404)
        assert theirs == {**nobody, "message": nobody["message"].replace(unknown, mine.id)}

    same_as_unknown(other.evals.retrieve)
    same_as_unknown(lambda i: other.evals.update(i, name="stolen", metadata={"x": "y"}))
    same_as_unknown(other.evals.delete)
    theirs = create(other, name="b's")
    assert [e.id for e in other.evals.list()] == [theirs.id]
    err = refusal(lambda: other.evals.list(after=mine.id), 404)  # no cursor for B
    assert err["param"] == "after"
    assert sdk.evals.retrieve(mine.id).model_dump() == mine.model_dump()
    assert [e.id for e in sdk.evals.list()] == [mine.id]


@pytest.mark.parametrize("eval_id", ["eval_x:y", "a%20b", "eval_" + "0" * 200])
def test_ids_no_eval_can_have_are_404(http, eval_id):
    for method in ("GET", "POST", "DELETE"):
        resp = http.request(
            method, f"/v1/evals/{eval_id}", headers={"Authorization": "Bearer k1"}, json={}
        )
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "not_found"


def test_every_route_needs_a_key(http):
    for method, path in [
        ("POST", "/v1/evals"),
        ("GET", "/v1/evals"),
        ("GET", "/v1/evals/eval_x"),
        ("POST", "/v1/evals/eval_x"),
        ("DELETE", "/v1/evals/eval_x"),
        ("GET", "/v1/evals/bad:id"),
    ]:
        assert http.request(method, path, json={}).status_code == 401, (method, path)


# ---- validation
def _criteria(*criteria):
    return {"testing_criteria": list(criteria)}


def _source(**changes):
    source = copy.deepcopy(SOURCE)
    source.update(changes)
    return {"data_source_config": {k: v for k, v in source.items() if v is not None}}


def _schema(**changes):
    schema = copy.deepcopy(ITEM_SCHEMA)
    schema.update(changes)
    return _source(item_schema={k: v for k, v in schema.items() if v is not None})


BAD = [
    # data source config
    (_source(type="logs"), "data_source_config.type", "'logs'"),
    (_source(type="stored_completions"), "data_source_config.type", "stored_completions"),
    (_source(type="file"), "data_source_config.type", "'file'"),
    ({"data_source_config": {"item_schema": ITEM_SCHEMA}}, "data_source_config.type", "type"),
    (_source(extra=1), "data_source_config.extra", "unknown field"),
    (_source(include_sample_schema="yes"), "data_source_config.include_sample_schema", "true"),
    (
        {"data_source_config": {"type": "custom"}},
        "data_source_config.item_schema",
        "item_schema is required",
    ),
    (_source(item_schema=[1]), "data_source_config.item_schema", "JSON Schema"),
    (_schema(type="array"), "data_source_config.item_schema.type", "'object'"),
    (_schema(properties=None), "data_source_config.item_schema.properties", "properties"),
    (_schema(properties=[]), "data_source_config.item_schema.properties", "properties"),
    (
        _schema(properties={"a": 1}),
        "data_source_config.item_schema.properties.a",
        "JSON Schema",
    ),
    (_schema(required="answer"), "data_source_config.item_schema.required", "required"),
    (
        _schema(description="x" * 70_000),
        "data_source_config.item_schema",
        "bytes of JSON",
    ),
    # testing criteria
    (_criteria(), "testing_criteria", "at least one"),
    (
        _criteria(
            {
                "type": "label_model",
                "name": "judge",
                "model": "gpt-4o",
                "input": [{"role": "user", "content": "{{item.question}}"}],
                "labels": ["good", "bad"],
                "passing_labels": ["good"],
            }
        ),
        "testing_criteria[0].model",
        "model not found or not allowed",
    ),
    (
        _criteria({"type": "python", "name": "py", "source": "def grade(s, i): return 1"}),
        "testing_criteria[0]",
        "the python grader needs the bubblewrap sandbox on the workers",
    ),
    (_criteria({**CHECK, "type": "nonsense"}), "testing_criteria[0]", "unknown grader type"),
    (
        _criteria({k: v for k, v in CHECK.items() if k != "operation"}),
        "testing_criteria[0].operation",
        "operation",
    ),
    (_criteria({**CHECK, "pass_threshold": 1}), "testing_criteria[0].pass_threshold", ""),
    (_criteria(CHECK, {**CHECK, "name": ""}), "testing_criteria[1].name", "testing_criteria[1]"),
    (
        _criteria({**CHECK, "reference": "{{item.gold}}"}),
        "testing_criteria[0]",
        "'item.gold'",
    ),
    (
        _criteria({**CHECK, "reference": "{{item.meta.author}}"}),
        "testing_criteria[0]",
        "'item.meta.author'",
    ),
    (
        {**_source(include_sample_schema=False), **_criteria(CHECK)},
        "testing_criteria[0]",
        "include_sample_schema",
    ),
    (
        _criteria({**CHECK, "input": "{{sample.choices}}"}),
        "testing_criteria[0].input",
        "sample.choices",
    ),
    (
        _criteria(
            {
                "type": "text_similarity",
                "name": "sim",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "evaluation_metric": "bleu",
            }
        ),
        "testing_criteria[0].pass_threshold",
        "pass_threshold is required",
    ),
    (
        _criteria(
            {
                "type": "score_model",
                "name": "rm",
                "model": "no-such-model",
                "input": [{"role": "user", "content": "{{sample.output_text}}"}],
            }
        ),
        "testing_criteria[0].model",
        "model not found or not allowed",
    ),
    (
        _criteria(
            {
                "type": "score_model",
                "name": "rm",
                "model": "reward",
                "input": [{"role": "user", "content": "{{sample.output_text}}"}],
                "pass_threshold": "high",
            }
        ),
        "testing_criteria[0].pass_threshold",
        "number",
    ),
    (
        _criteria({"type": "regex", "name": "r", "input": "{{item.answer}}", "pattern": "("}),
        "testing_criteria[0].pattern",
        "",
    ),
    # name and metadata
    ({"name": "n" * 257}, "name", "256"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "16"),
    ({"metadata": {"k" * 65: "v"}}, "metadata", "64"),
    ({"metadata": {"k": "v" * 513}}, "metadata", "512"),
    ({"metadata": {"k": 1}}, "metadata.k", "string"),
]


@pytest.mark.parametrize("change,param,words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_refusals_name_the_field(sdk, change, param, words):
    body = {"name": "qa", "data_source_config": SOURCE, "testing_criteria": [CHECK], **change}
    err = refusal(lambda: sdk.evals.create(**body))
    assert err["param"] == param, err
    assert words in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert list(sdk.evals.list()) == []  # nothing stored


def test_unknown_top_level_field_is_refused(sdk):
    err = refusal(
        lambda: sdk.evals.create(
            data_source_config=SOURCE, testing_criteria=[CHECK], extra_body={"runs": []}
        )
    )
    assert err["param"] == "runs"


def test_nested_item_paths_are_checked_as_deep_as_declared(sdk):
    deep = [
        {**CHECK, "reference": "{{item.meta.source}}"},  # declared
        {**CHECK, "name": "n", "reference": "{{item.question.text}}"},  # string: not walked
    ]
    assert len(create(sdk, testing_criteria=deep).testing_criteria) == 2


# ---- the OpenAPI document
def test_openapi_declares_the_routes_errors(http):
    doc = http.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()
    ops = doc["paths"]
    assert '"422"' not in str(ops["/v1/evals"]).replace("'", '"')
    err = {"$ref": "#/components/schemas/Error"}
    for method, statuses in (("post", {"400", "401", "429"}), ("get", {"400", "401", "404"})):
        responses = ops["/v1/evals"][method]["responses"]
        assert statuses <= responses.keys(), (method, responses.keys())
        assert responses["400"]["content"]["application/json"]["schema"] == err
    for method in ("get", "post", "delete"):
        op = ops["/v1/evals/{eval_id}"][method]
        assert {"400", "401", "404"} <= op["responses"].keys()
        assert op["security"] == [{"bearerAuth": []}]


# ---- the store
def test_store_lists_per_tenant_and_never_recreates_a_deleted_eval(redis_client):
    store = EvalStore(redis_client, "test:")
    made = {
        t: [
            store.create(
                name=f"{t}{i}",
                data_source_config=SOURCE,
                testing_criteria=[CHECK],
                tenant=t,
            )["id"]
            for i in range(2)
        ]
        for t in ("a", "b")
    }
    assert [r["id"] for r in store.list(None, 10, tenant="a")[0]] == made["a"][::-1]
    everyone, more = store.list(None, 3, tenant=None)
    assert [r["id"] for r in everyone] == (made["a"] + made["b"])[::-1][:3] and more
    assert store.owner(made["b"][0]) == "b" and store.owner("eval_none") is None
    with pytest.raises(EvalNotFound):
        store.list(made["b"][0], 10, tenant="a")  # B's id is not in A's list
    gone = made["a"][0]
    store.delete(gone)
    with pytest.raises(EvalNotFound):
        store.update(gone, name="back?")
    with pytest.raises(EvalNotFound):
        store.delete(gone)
    assert not redis_client.exists(store.k_eval(gone))
    assert all(redis_client.zscore(k, gone) is None for k in redis_client.keys("test:evals*"))
