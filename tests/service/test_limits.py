"""Input limits, through the real API (issue 11, items 3 and 4).

Numbers: NaN and Infinity anywhere in a job body, values past the documented upper
bounds, and strings or booleans where a number belongs are 400s naming the field,
and nothing is stored; a corrupt record already in Redis does not break GET or list.

Uploads: the key and the Content-Length are checked before the body is read; the
streamed body is capped; a line longer than the line limit, JSON nested too deep, a
number too long or NaN is a 400 naming the line; a UTF-8 BOM is accepted; a refused
upload leaves no file behind.
"""

from __future__ import annotations

import io
import json
import random
import socket

import pytest
import redis
from fastapi.testclient import TestClient

from service.errors import APIError
from service.main import create_app
from service.settings import ApiSettings
from service.upload import LineGuard
from tests.service.liveapi import KEY as LIVE_KEY
from tests.service.liveapi import free_port, raw_request, start_live_api
from workers.filestore import FileStore

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-limits",
        max_line_bytes=8192,
        max_upload_bytes=200_000,
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def error_of(resp) -> dict:
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def upload_bytes(client, data: bytes, name="train.jsonl"):
    return client.post(
        "/v1/files", files={"file": (name, io.BytesIO(data))}, data={"purpose": "fine-tune"}
    )


def lines(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


@pytest.fixture
def file_id(client):
    resp = upload_bytes(client, lines(CHAT, CHAT))
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


@pytest.fixture
def pair_file_id(client):
    return upload_bytes(client, lines(PAIR, PAIR)).json()["id"]


def post_job(client, body: dict):
    """Python's json writes NaN/Infinity literals (as some clients do); httpx would refuse."""
    return client.post(
        "/v1/fine_tuning/jobs",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )


def sft(file_id: str, **hps) -> dict:
    return {
        "model": "tiny",
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hps}},
    }


def files_left(data_dir) -> list[str]:
    """Every file under the data volume's files/ (uploads, staging files)."""
    d = data_dir / "files"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def nothing_stored(redis_client) -> bool:
    return redis_client.zcard("test:jobs") == 0 and not redis_client.keys("test:job:*")


# ---- numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_in_the_learning_rate_multiplier_are_400(
    client, redis_client, file_id, bad
):
    """Before: NaN answered 200 and stored a record whose multiplier no release could read."""
    resp = post_job(client, sft(file_id, learning_rate_multiplier=bad))
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == "method.supervised.hyperparameters.learning_rate_multiplier"
    assert "NaN and Infinity" in err["message"]
    assert nothing_stored(redis_client)
    listed = client.get("/v1/fine_tuning/jobs")
    assert listed.status_code == 200 and listed.json()["data"] == []


@pytest.mark.parametrize(
    "body,param",
    [
        (
            lambda f, p: {
                "model": "tiny",
                "training_file": p,
                "method": {
                    "type": "dpo",
                    "dpo": {
                        "hyperparameters": {
                            "loss_weights": [1.0, float("nan")],
                            "loss_type": ["sigmoid", "sft"],
                        }
                    },
                },
            },
            "method.dpo.hyperparameters.loss_weights[1]",
        ),
        (lambda f, p: {**sft(f), "seed": float("inf")}, "seed"),
        (lambda f, p: {**sft(f), "metadata": {"k": float("nan")}}, "metadata.k"),
        (lambda f, p: {**sft(f), "unknown": {"deep": [float("-inf")]}}, "unknown.deep[0]"),
        (lambda f, p: {**sft(f), "seed": 10**30}, "seed"),
    ],
)
def test_non_finite_numbers_anywhere_in_the_body_are_400(
    client, redis_client, file_id, pair_file_id, body, param
):
    resp = post_job(client, body(file_id, pair_file_id))
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == param
    assert nothing_stored(redis_client)


@pytest.mark.parametrize(
    "hps,extra,param",
    [
        ({"n_epochs": 101}, {}, "method.supervised.hyperparameters.n_epochs"),
        ({"batch_size": 4097}, {}, "method.supervised.hyperparameters.batch_size"),
        ({"max_steps": 1_000_001}, {}, "method.supervised.hyperparameters.max_steps"),
        (
            {"learning_rate_multiplier": 100.5},
            {},
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        ({"learning_rate": 1.5}, {}, "method.supervised.hyperparameters.learning_rate"),
        (
            {"gradient_accumulation_steps": 1025},
            {},
            "method.supervised.hyperparameters.gradient_accumulation_steps",
        ),
        (
            {"gradient_checkpointing": "sometimes"},
            {},
            "method.supervised.hyperparameters.gradient_checkpointing",
        ),
        ({}, {"checkpoint_every_steps": 1_000_001}, "checkpoint_every_steps"),
        ({}, {"resources": {"cpu_threads": 513}}, "resources.cpu_threads"),
    ],
)
def test_upper_bounds_are_400_naming_the_field(client, redis_client, file_id, hps, extra, param):
    """Before: n_epochs 10**9, batch_size 10**9, max_steps 10**12, a multiplier of 1e6 and
    a checkpoint interval of 10**15 were all accepted and queued."""
    resp = post_job(client, {**sft(file_id, **hps), **extra})
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == param
    assert nothing_stored(redis_client)


def test_values_at_the_bounds_are_accepted(client, file_id):
    hps = {
        "n_epochs": 100,
        "batch_size": 4096,
        "max_steps": 1_000_000,
        "learning_rate_multiplier": 100,
    }
    resp = post_job(client, {**sft(file_id, **hps), "checkpoint_every_steps": 1_000_000})
    assert resp.status_code == 200, resp.text
    assert resp.json()["hyperparameters"]["learning_rate_multiplier"] == 100


@pytest.mark.parametrize(
    "hps,extra,param",
    [
        ({"n_epochs": "3"}, {}, "method.supervised.hyperparameters.n_epochs"),
        ({"n_epochs": True}, {}, "method.supervised.hyperparameters.n_epochs"),
        ({"batch_size": False}, {}, "method.supervised.hyperparameters.batch_size"),
        (
            {"learning_rate_multiplier": "0.5"},
            {},
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        ({"learning_rate": True}, {}, "method.supervised.hyperparameters.learning_rate"),
        ({"loss_on_prompt": 1}, {}, "method.supervised.hyperparameters.loss_on_prompt"),
        ({}, {"seed": "7"}, "seed"),
        ({}, {"checkpoint_every_steps": True}, "checkpoint_every_steps"),
    ],
)
def test_strings_and_booleans_are_not_numbers(client, redis_client, file_id, hps, extra, param):
    """Before: "3" and true were coerced (true trained 1 epoch)."""
    resp = post_job(client, {**sft(file_id, **hps), **extra})
    assert resp.status_code == 400, resp.text
    assert error_of(resp)["param"] == param
    assert nothing_stored(redis_client)


@pytest.mark.parametrize(
    "spec",
    [
        # what an earlier release could store: a NaN literal, an unreadable spec, a spec
        # that is no object, metadata that is no map of strings, infinities
        '{"model": "m", "training_file": "file-1", "method": {"type": "supervised", '
        '"supervised": {"hyperparameters": {"learning_rate_multiplier": NaN}}}}',
        '{"model": "m", "training_file": "file-1", "method": {"type": "grpo", "grpo": '
        '{"graders": [], "hyperparameters": {"ngrpo_virtual_reward": Infinity}}}}',
        "{not json",
        "[1, 2]",
        '{"model": 5, "training_file": null, "metadata": {"k": 1}, "suffix": 3, '
        '"validation_file": 7, "seed": 1e999}',
    ],
)
def test_get_and_list_survive_a_corrupt_record_already_in_redis(client, redis_client, spec):
    job_id = "ftjob-corrupt000000000000000000"
    redis_client.hset(
        f"test:job:{job_id}",
        mapping={
            "id": job_id,
            "spec": spec,
            "status": "failed",
            "created_at": "1700000000",
            "updated_at": "1700000000",
            "attempt": "0",
        },
    )
    redis_client.zadd("test:jobs", {job_id: 1_700_000_000})
    got = client.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert got.status_code == 200, got.text
    strict = json.loads(got.text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert strict["id"] == job_id and strict["status"] == "failed"
    listed = client.get("/v1/fine_tuning/jobs")
    assert listed.status_code == 200, listed.text
    assert [j["id"] for j in listed.json()["data"]] == [job_id]


# ---- uploads ------------------------------------------------------------------------


def test_a_line_over_the_line_limit_is_400_naming_it_and_stores_nothing(client, settings):
    long = {
        "messages": [{"role": "user", "content": "x" * 9000}, {"role": "assistant", "content": "y"}]
    }
    resp = upload_bytes(client, lines(CHAT, long, CHAT))
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == "file" and err["code"] == "invalid_file_format"
    assert "line 2 is longer than 8192 bytes" in err["message"]
    assert client.get("/v1/files").json()["data"] == []
    assert files_left(settings.data_dir) == []


def test_a_single_line_longer_than_the_limit_is_refused_while_streaming(client, settings):
    """The 200 MB single line of the finding, scaled to this app's limits."""
    resp = upload_bytes(client, b'{"prompt": "' + b"a" * 150_000 + b'", "completion": "b"}')
    assert resp.status_code == 400
    assert "line 1 is longer than 8192 bytes" in error_of(resp)["message"]
    assert files_left(settings.data_dir) == []


@pytest.mark.parametrize(
    "row,fragment",
    [
        (
            '{"prompt": "a", "completion": "b", "x": ' + "[" * 1000 + "]" * 1000 + "}",
            "nested deeper than 64 levels",
        ),
        (
            '{"prompt": "a", "completion": "b", "x": ' + "[" * 70 + "]" * 70 + "}",
            "nested deeper than 64 levels",
        ),
        (
            '{"prompt": "a", "completion": "b", "x": ' + "9" * 5000 + "}",
            "longer than 100 characters",
        ),
        ('{"prompt": "a", "completion": "b", "x": 1e999}', "out of range"),
        ('{"prompt": "a", "completion": "b", "x": NaN}', "NaN and Infinity"),
    ],
)
def test_nesting_and_number_size_are_400_naming_the_line(client, settings, row, fragment):
    """Before: 1,000-level nesting and 5,000-digit numbers were 500s."""
    ok = {"prompt": "a", "completion": "b"}
    resp = upload_bytes(client, lines(ok, row))
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert "line 2" in err["message"] and fragment in err["message"], err["message"]
    assert files_left(settings.data_dir) == []


def test_nesting_within_the_limit_is_accepted(client):
    deep = {"prompt": "a", "completion": "b", "x": json.loads("[" * 60 + "]" * 60)}
    resp = upload_bytes(client, lines(deep))
    assert resp.status_code == 200, resp.text


def test_a_utf8_bom_is_accepted_and_not_stored(client):
    """Before: a BOM was 'invalid JSON (Unexpected UTF-8 BOM)'."""
    resp = upload_bytes(client, b"\xef\xbb\xbf" + lines(CHAT, CHAT))
    assert resp.status_code == 200, resp.text
    assert resp.json()["rows"] == 2
    content = client.get(f"/v1/files/{resp.json()['id']}/content").content
    assert content == lines(CHAT, CHAT)


def test_content_length_over_the_limit_is_413_with_the_limit(client, settings):
    resp = upload_bytes(client, b"x" * 300_000)
    assert resp.status_code == 413
    err = error_of(resp)
    assert err["code"] == "file_too_large" and "200000 bytes" in err["message"]
    assert files_left(settings.data_dir) == []


def test_a_streamed_body_without_content_length_is_capped(client, settings):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    row = (json.dumps(CHAT) + "\n").encode()

    def body():
        yield head
        for _ in range(400_000 // len(row)):
            yield row * 1
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = client.post(
        "/v1/files",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status_code == 413, resp.text
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert files_left(settings.data_dir) == []


@pytest.mark.parametrize(
    "data,param",
    [
        ({"purpose": "vision"}, "purpose"),
        ({}, "purpose"),
        ({"purpose": "fine-tune", "extra": "1"}, "extra"),
    ],
)
def test_form_fields_are_checked(client, settings, data, param):
    resp = client.post("/v1/files", files={"file": ("t.jsonl", io.BytesIO(lines(CHAT)))}, data=data)
    assert resp.status_code == 400 and error_of(resp)["param"] == param
    assert files_left(settings.data_dir) == []


def test_no_file_on_disk_without_its_record(tmp_path, unit_redis_url):
    """The record write fails (Redis gone): the renamed file is removed again."""
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    store = FileStore(dead, tmp_path, "test:")
    staged = store.staging_path()
    staged.write_bytes(lines(CHAT))
    with pytest.raises(redis.ConnectionError):
        store.commit(staged, filename="t.jsonl", purpose="fine-tune", formats=["chat"], rows=1)
    assert files_left(tmp_path) == []


# ---- the live API: refusals before the body is read -------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    api = start_live_api(
        tmp_path_factory.mktemp("limits"), POSTTRAIN_MAX_UPLOAD_BYTES=str(10 << 20)
    )
    yield api
    api.stop()


def _headers_only(port: int, auth: str | None, length: int) -> tuple[int, dict, bytes]:
    """Send an upload's headers and none of its body: the answer must come anyway."""
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: t\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {length}\r\n"
        + (f"Authorization: Bearer {auth}\r\n" if auth else "")
        + "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        return raw_request(sock, head)


@pytest.mark.e2e
def test_live_upload_is_refused_on_auth_before_the_body(live):
    status, _, body = _headers_only(live.port, None, 500 << 20)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, body = _headers_only(live.port, "wrong-key", 5 << 20)
    assert status == 401


@pytest.mark.e2e
def test_live_upload_is_refused_on_content_length_before_the_body(live):
    status, _, body = _headers_only(live.port, LIVE_KEY, 500 << 20)
    assert status == 413
    err = json.loads(body)["error"]
    assert err["code"] == "file_too_large" and str(10 << 20) in err["message"]
    assert files_left(live.data_dir) == []


@pytest.mark.parametrize("seed", range(5))
def test_line_guard_names_the_first_long_line_whatever_the_chunking(seed):
    """Lines cross chunk boundaries (and a BOM may be split) as a body streams in."""
    rng = random.Random(seed)
    limit = 50
    lines_ = [b"x" * rng.randrange(0, 50) for _ in range(40)]
    long_at = rng.randrange(len(lines_))
    lines_[long_at] = b"y" * 51
    data = b"\xef\xbb\xbf" + b"\n".join(lines_)
    guard, out, err = LineGuard(limit), b"", None
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 7, 64, 200])
        try:
            out += guard.feed(data[pos : pos + step])
        except APIError as exc:
            err = exc
            break
        pos += step
    assert err is not None and f"line {long_at + 1} is longer than 50 bytes" in err.message
    ok = LineGuard(limit)
    fine = b"\xef\xbb\xbf" + b"\n".join(b"z" * 50 for _ in range(30))
    kept = b"".join(ok.feed(fine[i : i + 3]) for i in range(0, len(fine), 3)) + ok.finish()
    assert kept == fine[3:]


# ---- the same text rules everywhere (issue 19, item 6) ----------------------------------

LONE = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "yo"}]}'  # noqa: E501


def test_a_lone_surrogate_is_refused_at_upload_naming_line_and_field(client, settings):
    resp = upload_bytes(client, lines(CHAT, LONE))
    assert resp.status_code == 400
    err = error_of(resp)
    assert "line 2" in err["message"] and "messages[0].content" in err["message"]
    assert "lone surrogate" in err["message"]
    assert files_left(settings.data_dir) == []
    paired = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "yo"}]}'  # noqa: E501
    assert upload_bytes(client, lines(CHAT, paired)).status_code == 200  # an emoji is fine


SURROGATE_BODIES = [
    ('{"model": "tiny", "training_file": "f", "suffix": "a\\udc00"}', "suffix", "lone surrogate"),
    ('{"model": "tiny", "training_file": "f", "metadata": {"k\\ud800": "v"}}', "metadata",
     "field name holds a lone surrogate"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "words"), SURROGATE_BODIES)
def test_a_lone_surrogate_in_a_job_body_is_a_400(client, redis_client, body, param, words):
    resp = client.post(
        "/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == param and words in err["message"]
    assert nothing_stored(redis_client)


GRADER = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
          "reference": "x", "operation": "eq"}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("run", '{"grader": G, "model_sample": "x", "item": {"n": NaN}}', "item.n", "NaN"),
        ("run", '{"grader": G, "model_sample": "x\\u0000"}', "model_sample", "NUL"),
        ("run", '{"grader": G, "model_sample": "\\udfff"}', "model_sample", "lone surrogate"),
        ("validate", '{"grader": G}', "grader.reference", "NUL"),
    ],
)
def test_grader_endpoints_refuse_what_job_bodies_refuse(client, path, body, param, words):
    grader = dict(GRADER, reference="x\x00") if path == "validate" else GRADER
    resp = client.post(
        f"/v1/fine_tuning/alpha/graders/{path}",
        content=body.replace("G", json.dumps(grader)),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == param and words in err["message"]
