"""An RL job's stateful ``environment`` through the API: malformed environments are a 400
naming the field, the URL passes the outbound policy, graders may be left out when the
environment scores, and header values are kept in the job's secrets key only."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.test_api import create_job, error_of, upload
from tests.service.test_tools_api import GRADER, PROMPT, SECRET, settings_for, tool
from workers.store import JobStore

URL = "http://127.0.0.1:8124/env"
ACTION = {
    "name": "increment",
    "description": "Add to the counter.",
    "parameters": {"type": "object", "properties": {"by": {"type": "integer"}}},
}


def environment(**fields) -> dict:
    return {"url": URL, "headers": {"Authorization": SECRET}, "tools": [ACTION], **fields}


def grpo(env: dict, graders: list | None = None, tools: list | None = None) -> dict:
    block = {"environment": env, "graders": graders if graders is not None else []}
    if tools:
        block["tools"] = tools
    return {"type": "grpo", "grpo": block}


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = settings_for(tmp_path, unit_redis_url, tool_allowed_networks="127.0.0.0/8")
    with TestClient(create_app(settings)) as c:
        yield c


def test_an_environment_that_scores_needs_no_grader_and_its_headers_stay_secret(
    client, redis_client
):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=grpo(environment()))
    assert resp.status_code == 200, resp.text
    job = resp.json()
    shown = job["method"]["grpo"]["environment"]
    assert shown["headers"] == {"Authorization": "[redacted]"} and shown["url"] == URL
    assert shown["reward"] is True
    for text in (
        client.get(f"/v1/fine_tuning/jobs/{job['id']}").text,
        client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").text,
        json.dumps(redis_client.hgetall(f"test:job:{job['id']}")),
    ):
        assert "top-secret" not in text
    store = JobStore(redis_client, "test:")
    assert store.tool_secrets(job["id"]) == {"environment_headers": {"Authorization": SECRET}}


def test_a_reinforcement_job_takes_an_environment_beside_its_grader(client):
    fid = upload(client, [PROMPT]).json()["id"]
    method = {"type": "reinforcement", "reinforcement": {"grader": GRADER}}
    method["reinforcement"]["environment"] = environment(reward=False)
    resp = create_job(client, fid, method=method)
    assert resp.status_code == 200, resp.text


def test_a_loopback_environment_is_refused_unless_the_server_allows_it(
    tmp_path, redis_client, unit_redis_url
):
    with TestClient(create_app(settings_for(tmp_path, unit_redis_url))) as strict:
        fid = upload(strict, [PROMPT]).json()["id"]
        resp = create_job(strict, fid, method=grpo(environment()))
        assert resp.status_code == 400
        err = error_of(resp)
        assert err["param"] == "method.grpo.environment.url"
        assert "POSTTRAIN_TOOL_ALLOWED_NETWORKS" in err["message"]
        assert "top-secret" not in resp.text


@pytest.mark.parametrize(
    ("method", "param", "fragment"),
    [
        (grpo(environment(reward=False)), "method.grpo", "graders: give at least one grader"),
        (grpo(environment(tools=[])), "method.grpo.environment.tools", "at least 1 item"),
        (
            grpo(environment(tools=[{**ACTION, "name": "reset"}])),
            "method.grpo.environment.tools",
            "'reset' is reserved",
        ),
        (
            grpo(environment(tools=[ACTION, ACTION])),
            "method.grpo.environment.tools",
            "'increment' is given more than once",
        ),
        (
            grpo(environment(), tools=[tool(URL, name="increment")]),
            "method.grpo.environment",
            "tools[0].name: 'increment' is also one of the job's tools",
        ),
        (
            grpo(environment(tools=[{**ACTION, "parameters": {"type": "string"}}])),
            "method.grpo.environment.tools[0].parameters",
            "type 'object'",
        ),
        (grpo(environment(url="ftp://127.0.0.1/x")), "method.grpo.environment.url", "http://"),
        (grpo(environment(url=URL + "?k=1")), "method.grpo.environment.url", "no query"),
        (
            grpo(environment(timeout_seconds=0)),
            "method.grpo.environment.timeout_seconds",
            "greater than 0",
        ),
        (
            grpo(environment(), graders=[{**GRADER, "name": "environment"}]),
            "method.grpo",
            "'environment' is the environment's reward source",
        ),
    ],
)
def test_malformed_environments_are_refused_naming_the_field(client, method, param, fragment):
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=method)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == param, err
    assert fragment in err["message"], err
    assert "top-secret" not in resp.text
