"""Every error in OpenAI's shape, through the real API (issue 11, item 5).

Each test reproduces a finding of the attack on the API and checks the answer now:
ids that reached Redis keys of another type (500 WRONGTYPE), Redis unreachable
(plain-text 500), an unhandled exception (plain-text 500 that closed the
connection), /readyz leaking the Redis error, /docs and /openapi.json open to all,
and 405 answers naming only some of the path's methods.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from tests.service.liveapi import free_port, raw_request

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
KEY = "k-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_settings(tmp_path, redis_url, **extra) -> ApiSettings:
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    return ApiSettings(
        redis_url=redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-errors",
        api_keys=KEY,
        **extra,
    )


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return make_settings(tmp_path, unit_redis_url)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


def openai_error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def upload(client, rows=(CHAT,)):
    data = "\n".join(json.dumps(r) for r in rows).encode()
    resp = client.post(
        "/v1/files", files={"file": ("t.jsonl", io.BytesIO(data))}, data={"purpose": "fine-tune"}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def create_job(client, fid) -> str:
    resp = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/fine_tuning/jobs/{job}:events"),
        ("GET", "/v1/fine_tuning/jobs/{job}:checkpoints"),
        ("POST", "/v1/fine_tuning/jobs/{job}:events/cancel"),
        ("POST", "/v1/fine_tuning/jobs/{job}:events/pause"),
        ("POST", "/v1/fine_tuning/jobs/{job}:events/resume"),
        ("GET", "/v1/fine_tuning/jobs/{job}:events/events"),
        ("GET", "/v1/fine_tuning/jobs/{job}:events/checkpoints"),
        ("GET", "/v1/fine_tuning/jobs/{job}:events/metrics"),
        ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints/x:y/content"),
        ("GET", "/v1/files/{file}:x"),
        ("GET", "/v1/files/{file}:x/content"),
        ("DELETE", "/v1/files/{file}:x"),
        ("GET", "/v1/files/a%20b"),
    ],
)
def test_ids_that_could_reach_another_record_type_are_404(client, redis_client, method, path):
    """``ftjob-...:events`` is the key of the job's event stream: HGETALL on it was a 500
    WRONGTYPE. An id outside posttrain's alphabet is now a 404 at the route."""
    fid = upload(client)
    jid = create_job(client, fid)
    assert redis_client.type(f"test:job:{jid}:events") == "stream"  # the key the id reached
    resp = client.request(method, path.format(job=jid, file=fid))
    assert resp.status_code == 404, resp.text
    err = openai_error(resp)
    assert err["code"] == "not_found" and err["type"] == "invalid_request_error"


def test_a_bad_id_without_a_key_is_401_not_404(settings):
    with TestClient(create_app(settings)) as anon:
        resp = anon.get("/v1/fine_tuning/jobs/x:y")
    assert resp.status_code == 401 and openai_error(resp)["code"] == "invalid_api_key"


def test_unknown_path_and_bad_query_are_openai_shaped(client):
    resp = client.get("/v1/nothing-here")
    assert resp.status_code == 404 and openai_error(resp)["code"] == "not_found"
    resp = client.get("/v1/files", params={"limit": "many"})
    assert resp.status_code == 400 and openai_error(resp)["param"] == "limit"


def test_405_names_every_method_the_path_serves(client):
    """GET and DELETE /v1/files/{id} are two routes; Starlette's 405 named only GET."""
    fid = upload(client)
    resp = client.put(f"/v1/files/{fid}")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "DELETE, GET"
    assert openai_error(resp)["code"] == "method_not_allowed"
    resp = client.request("OPTIONS", "/v1/fine_tuning/jobs")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, POST"
    resp = client.delete("/v1/fine_tuning/jobs")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, POST"


@pytest.fixture
def dead_redis_settings(tmp_path):
    port = free_port()  # nothing listens here
    return make_settings(tmp_path, f"redis://127.0.0.1:{port}/0")


def test_redis_unreachable_is_503_in_openai_shape(dead_redis_settings):
    s = dead_redis_settings
    with TestClient(create_app(s), headers=AUTH) as c:
        for method, path in [
            ("GET", "/v1/files"),
            ("GET", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/fine_tuning/jobs/ftjob-0123"),
            ("POST", "/v1/fine_tuning/jobs/ftjob-0123/cancel"),
        ]:
            resp = c.request(method, path)
            assert resp.status_code == 503, (path, resp.text)
            err = openai_error(resp)
            assert err["code"] == "service_unavailable" and err["type"] == "server_error"
            assert "refused" not in err["message"].lower() and str(s.redis_url) not in resp.text
        # an upload is read and checked, then its record cannot be written: the file must
        # not stay on disk without a record
        resp = c.post(
            "/v1/files",
            files={"file": ("t.jsonl", io.BytesIO(json.dumps(CHAT).encode()))},
            data={"purpose": "fine-tune"},
        )
        assert resp.status_code == 503 and openai_error(resp)["code"] == "service_unavailable"
        assert list((s.data_dir / "files").iterdir()) == []
        ready = c.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "redis": "unreachable", "data_dir": "ok"}


def test_readyz_when_ready(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "redis": "ok", "data_dir": "ok"}


def test_readyz_and_uploads_say_when_the_data_directory_is_not_writable(client, frozen):
    """A data volume owned by another user: /readyz is 503 naming the data directory,
    and an upload is a 500 that says what an operator must fix (not a PermissionError)."""
    files_dir = client.app.state.files.dir
    files_dir.mkdir(parents=True, exist_ok=True)
    thaw = frozen(files_dir)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "redis": "ok", "data_dir": "not_writable"}
    resp = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", io.BytesIO(json.dumps(CHAT).encode() + b"\n"))},
        data={"purpose": "fine-tune"},
        headers=AUTH,
    )
    assert resp.status_code == 500, resp.text
    err = openai_error(resp)
    assert err["code"] == "storage_not_writable" and "data directory" in err["message"]
    thaw()
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/files", headers=AUTH).json()["data"] == []


@pytest.mark.parametrize(
    "access,anonymous,keyed",
    [("auth", 401, 200), ("public", 200, 200), ("off", 404, 404)],
)
def test_docs_and_openapi_follow_the_auth_setting(
    tmp_path, redis_client, unit_redis_url, access, anonymous, keyed
):
    s = make_settings(tmp_path, unit_redis_url, docs_access=access)
    with TestClient(create_app(s)) as c:
        for path in ("/openapi.json", "/docs"):
            assert c.get(path).status_code == anonymous, path
            assert c.get(path, headers=AUTH).status_code == keyed, path
        if keyed == 200:
            assert c.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "posttrain"
        if anonymous == 401:
            assert openai_error(c.get("/openapi.json"))["code"] == "invalid_api_key"


@pytest.fixture
def threaded_api(settings):
    """The app under a real uvicorn server (in a thread), with one route that fails."""
    app = create_app(settings)

    @app.get("/v1/test-boom")
    def boom() -> dict:
        raise RuntimeError("internal detail that must not reach the client")

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def test_unhandled_exception_is_an_openai_500_and_keeps_the_connection(threaded_api):
    """Starlette's last-resort handler answered plain text and uvicorn then closed the
    connection; now the 500 is an ordinary response on a connection that stays open."""
    head = f"GET /v1/test-boom HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", threaded_api), timeout=30) as sock:
        status, headers, body = raw_request(sock, head)
        assert status == 500
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert b"internal detail" not in body
        assert headers.get("connection", "").lower() != "close"
        # the same connection serves the next request
        status, _, body = raw_request(sock, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 200 and json.loads(body) == {"status": "ok"}


def test_every_refusal_the_api_writes_names_a_code():
    """OpenAI's error object has a ``code``; every APIError the service raises sets one
    (the constructor requires it, and this reads every call site)."""
    import ast
    from pathlib import Path

    missing = [
        f"{path}:{node.lineno}"
        for path in Path(__file__).resolve().parents[2].joinpath("service").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", "") == "APIError"
        and not any(k.arg == "code" for k in node.keywords)
    ]
    assert missing == []


def test_every_refusal_about_a_request_field_names_the_field():
    """A refusal of part of the request (400, 401, 404, 409, 410, 413) names that part in
    ``param``; only the answers about the tenant or the service (429, 5xx) have none."""
    import ast
    from pathlib import Path

    without = []
    for path in Path(__file__).resolve().parents[2].joinpath("service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "APIError"):
                continue
            status = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
            param = next((k.value for k in node.keywords if k.arg == "param"), None)
            if status not in (429, 500, 502, 503) and (
                param is None or (isinstance(param, ast.Constant) and param.value is None)
            ):
                without.append(f"{path.name}:{node.lineno}")
    assert without == []
