"""RL jobs' ``tools`` through the API: the outbound allow-list refuses endpoints with a 400
naming the field, malformed tools are refused, and header values (secrets) are kept in the
job's own secrets key, never in the record GET, the job list or the events show."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.auth import KeyFileError, KeyRing, hash_key
from service.main import create_app
from service.settings import ApiSettings
from tests.service.test_api import create_job, error_of, upload
from workers.store import JobStore

SECRET = "Bearer top-secret-token"
PROMPT = {"messages": [{"role": "user", "content": "key 3"}], "answer": "7"}
GRADER = {
    "type": "string_check",
    "name": "copied",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}


def tool(url: str, **function) -> dict:
    return {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"key": {"type": "string"}}},
            **function,
        },
        "endpoint": {"url": url, "headers": {"Authorization": SECRET, "X-Team": "blue"}},
    }


def grpo(*tools: dict) -> dict:
    return {"type": "grpo", "grpo": {"graders": [GRADER], "tools": list(tools)}}


def settings_for(tmp_path, unit_redis_url, **extra) -> ApiSettings:
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-tools",
        **extra,
    )


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = settings_for(tmp_path, unit_redis_url, tool_allowed_networks="127.0.0.0/8")
    with TestClient(create_app(settings)) as c:
        yield c


def test_header_values_are_kept_out_of_the_record_and_given_to_workers_only(client, redis_client):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=grpo(tool("http://127.0.0.1:8123/lookup")))
    assert resp.status_code == 200, resp.text
    job = resp.json()
    shown = job["method"]["grpo"]["tools"][0]["endpoint"]
    assert shown["headers"] == {"Authorization": "[redacted]", "X-Team": "[redacted]"}
    again = client.get(f"/v1/fine_tuning/jobs/{job['id']}").text
    listed = client.get("/v1/fine_tuning/jobs").text
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").text
    record = json.dumps(redis_client.hgetall(f"test:job:{job['id']}"))
    for text in (again, listed, events, record):
        assert "top-secret" not in text and "blue" not in text
    store = JobStore(redis_client, "test:")
    assert store.tool_secrets(job["id"]) == {
        "tool_headers": {"lookup": {"Authorization": SECRET, "X-Team": "blue"}}
    }


def test_a_loopback_tool_is_refused_unless_the_server_allows_it(
    tmp_path, redis_client, unit_redis_url
):
    with TestClient(create_app(settings_for(tmp_path, unit_redis_url))) as strict:
        fid = upload(strict, [PROMPT]).json()["id"]
        resp = create_job(strict, fid, method=grpo(tool("http://127.0.0.1:8123/lookup")))
        assert resp.status_code == 400
        err = error_of(resp)
        assert err["param"] == "method.grpo.tools[0].endpoint.url"
        assert err["code"] == "invalid_url"
        assert "127.0.0.1" in err["message"]
        assert "POSTTRAIN_TOOL_ALLOWED_NETWORKS" in err["message"]
        assert "top-secret" not in resp.text


def test_a_url_outside_the_allowed_prefixes_is_refused(tmp_path, redis_client, unit_redis_url):
    settings = settings_for(
        tmp_path,
        unit_redis_url,
        tool_allowed_networks="127.0.0.0/8",
        tool_url_prefixes="http://127.0.0.1:8123/tools/",
    )
    with TestClient(create_app(settings)) as c:
        fid = upload(c, [PROMPT]).json()["id"]
        ok = create_job(c, fid, method=grpo(tool("http://127.0.0.1:8123/tools/lookup")))
        assert ok.status_code == 200, ok.text
        resp = create_job(c, fid, method=grpo(tool("http://127.0.0.1:8123/other")))
        assert resp.status_code == 400
        assert error_of(resp)["param"] == "method.grpo.tools[0].endpoint.url"
        assert "POSTTRAIN_TOOL_URL_PREFIXES" in error_of(resp)["message"]


def test_a_tenants_own_rules_widen_its_networks_and_narrow_its_prefixes(
    tmp_path, redis_client, unit_redis_url
):
    """The key file gives team "lab" its own network (loopback here, which the server
    refuses everyone else) and its own URL prefix; "other" has neither. The API applies
    both at creation and records lab's rules for the worker's run plan."""
    hashed = {who: hash_key(f"key-of-{who}") for who in ("lab", "other")}
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "tenants": {
                    "lab": {
                        "keys": [hashed["lab"]],
                        "tool_allowed_networks": ["127.0.0.0/8"],
                        "tool_url_prefixes": ["http://127.0.0.1:8123/lab/"],
                    },
                    "other": {"keys": [hashed["other"]]},
                }
            }
        )
    )
    settings = settings_for(tmp_path, unit_redis_url, api_keys_file=keys)
    with TestClient(create_app(settings)) as c:

        def job(who: str, url: str):
            auth = {"Authorization": f"Bearer key-of-{who}"}
            body = b'{"messages": [{"role": "user", "content": "key 3"}], "answer": "7"}'
            fid = c.post(
                "/v1/files",
                files={"file": ("p.jsonl", body)},
                data={"purpose": "fine-tune"},
                headers=auth,
            ).json()["id"]
            return create_job(c, fid, headers=auth, method=grpo(tool(url)))

        ok = job("lab", "http://127.0.0.1:8123/lab/lookup")
        assert ok.status_code == 200, ok.text
        rules = JobStore(redis_client, "test:").outbound_rules(ok.json()["id"])
        assert rules == {
            "allowed_networks": ["127.0.0.0/8"],
            "url_prefixes": ["http://127.0.0.1:8123/lab/"],
        }
        outside = job("lab", "http://127.0.0.1:8123/elsewhere")
        assert outside.status_code == 400
        assert "tool_url_prefixes" in error_of(outside)["message"]
        refused = job("other", "http://127.0.0.1:8123/lab/lookup")
        assert refused.status_code == 400
        err = error_of(refused)
        assert err["param"] == "method.grpo.tools[0].endpoint.url"
        assert "tool_allowed_networks" in err["message"]


def test_a_key_file_with_a_bad_tenant_network_is_refused(tmp_path):
    keys = tmp_path / "keys.json"
    entry = {"keys": [hash_key("k")], "tool_allowed_networks": ["10.0.0.0/33"]}
    keys.write_text(json.dumps({"tenants": {"lab": entry}}))
    with pytest.raises(KeyFileError, match=r"10\.0\.0\.0/33"):
        KeyRing.load(keys_file=keys)


@pytest.mark.parametrize(
    ("tools", "fragment"),
    [
        ([tool("ftp://127.0.0.1/x")], "http:// or https://"),
        ([tool("http://user:pw@127.0.0.1/x")], "may not carry credentials"),
        ([tool("http://127.0.0.1/x", parameters={"type": "string"})], "type 'object'"),
        ([tool("http://127.0.0.1/x", parameters={"type": 5})], "not a valid JSON schema"),
        ([tool("http://127.0.0.1/x")] * 2, "'lookup' is given more than once"),
    ],
)
def test_malformed_tools_are_refused_naming_the_field(client, tools, fragment):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=grpo(*tools))
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"].startswith("method.grpo.tools")
    assert fragment in err["message"]
    assert "top-secret" not in resp.text


def test_a_header_posttrain_sets_is_refused_without_echoing_values(client):
    fid = upload(client, [PROMPT]).json()["id"]
    bad = tool("http://127.0.0.1/x")
    bad["endpoint"]["headers"] = {"Authorization": "Bearer a\nInjected: 1"}
    resp = create_job(client, fid, method=grpo(bad))
    assert resp.status_code == 400
    assert "no line breaks" in error_of(resp)["message"]
    assert "Injected" not in resp.text
