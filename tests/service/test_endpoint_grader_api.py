"""The ``endpoint`` grader through the API: the outbound allow-list refuses its URL with a
400 naming the field (jobs and /graders alike) unless the server allows the network; its
header values stay in the job's secrets key, out of the record, GET, the list and events;
/graders/validate echoes them redacted; /graders/run calls the loopback endpoint and
reads its score; an eval's criteria refuse it."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.loopback import Handler, serving
from tests.service.test_api import create_job, error_of, upload
from tests.service.test_tools_api import settings_for
from workers.store import JobStore

SECRET = "Bearer grader-top-secret"
PROMPT = {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}
RUN = "/v1/fine_tuning/alpha/graders/run"
VALIDATE = "/v1/fine_tuning/alpha/graders/validate"


class _Scorer(Handler):
    auth: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.auth.append(self.headers["authorization"])
        if self.path == "/fail":
            status, reply = 500, b"boom"
        else:
            right = body["sample"]["output_text"].strip() == body["item"]["answer"]
            status, reply = 200, json.dumps({"score": 1.0 if right else 0.1}).encode()
        self.reply(status, reply)


@pytest.fixture(scope="module")
def scorer():
    with serving(_Scorer) as url:
        yield url


def endpoint(url: str, **fields) -> dict:
    return {
        "type": "endpoint",
        "name": "remote",
        "url": url,
        "headers": {"Authorization": SECRET},
        **fields,
    }


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = settings_for(tmp_path, unit_redis_url, tool_allowed_networks="127.0.0.0/8")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def strict(tmp_path, redis_client, unit_redis_url):
    with TestClient(create_app(settings_for(tmp_path, unit_redis_url))) as c:
        yield c


def test_header_values_are_kept_out_of_what_shows_a_job(client, redis_client):
    fid = upload(client, [PROMPT]).json()["id"]
    method = {"type": "grpo", "grpo": {"graders": [endpoint("http://127.0.0.1:9/score")]}}
    resp = create_job(client, fid, method=method)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["method"]["grpo"]["graders"][0]["headers"] == {"Authorization": "[redacted]"}
    shown = [
        resp.text,
        client.get(f"/v1/fine_tuning/jobs/{job['id']}").text,
        client.get("/v1/fine_tuning/jobs").text,
        client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").text,
        json.dumps(redis_client.hgetall(f"test:job:{job['id']}")),
    ]
    assert not any("top-secret" in text for text in shown)
    secrets = JobStore(redis_client, "test:").tool_secrets(job["id"])
    assert secrets == {"grader_headers": {"0": {"Authorization": SECRET}}}


@pytest.mark.parametrize(
    ("method", "param"),
    [
        (
            {"type": "grpo", "grpo": {"graders": [endpoint("http://127.0.0.1:9/")]}},
            "method.grpo.graders[0].url",
        ),
        (
            {"type": "reinforcement", "reinforcement": {"grader": endpoint("http://10.1.2.3/")}},
            "method.reinforcement.grader.url",
        ),
        (
            {
                "type": "grpo",
                "grpo": {
                    "graders": [
                        {
                            "type": "multi",
                            "name": "m",
                            "graders": {"r": endpoint("http://127.0.0.1:9/")},
                            "calculate_output": "r",
                        }
                    ]
                },
            },
            "method.grpo.graders[0].graders.r.url",
        ),
    ],
)
def test_a_private_endpoint_is_refused_unless_the_server_allows_it(strict, method, param):
    fid = upload(strict, [PROMPT]).json()["id"]
    resp = create_job(strict, fid, method=method)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == param and err["code"] == "invalid_url"
    assert "POSTTRAIN_TOOL_ALLOWED_NETWORKS" in err["message"]
    assert "top-secret" not in resp.text


def test_graders_validate_checks_the_policy_and_redacts_headers(client, strict):
    refused = strict.post(VALIDATE, json={"grader": endpoint("http://127.0.0.1:9/")})
    assert refused.status_code == 400 and error_of(refused)["param"] == "grader.url"
    resp = client.post(VALIDATE, json={"grader": endpoint("http://127.0.0.1:9/")})
    assert resp.status_code == 200, resp.text
    assert resp.json()["grader"]["headers"] == {"Authorization": "[redacted]"}
    assert "top-secret" not in resp.text


def test_graders_run_reads_the_endpoints_score(client, scorer):
    _Scorer.auth.clear()
    body = {"grader": endpoint(f"{scorer}/score"), "model_sample": " 4", "item": PROMPT}
    resp = client.post(RUN, json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["reward"] == 1.0 and _Scorer.auth == [SECRET]
    body["model_sample"] = "5"
    assert client.post(RUN, json=body).json()["reward"] == 0.1


def test_graders_run_reports_a_failing_endpoint_without_its_url_or_secret(client, scorer):
    grader = endpoint(f"{scorer}/fail", retries=1, timeout_seconds=2)
    resp = client.post(RUN, json={"grader": grader, "model_sample": "4", "item": PROMPT})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["reward"] == 0.0 and answer["metadata"]["errors"]["other_error"]
    detail = answer["metadata"]["errors"]["details"]["other_error"]
    assert "answered 500" in detail
    assert "/fail" not in resp.text and "top-secret" not in resp.text


def test_an_eval_refuses_an_endpoint_criterion(client):
    source = {
        "type": "custom",
        "item_schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "include_sample_schema": True,
    }
    body = {"data_source_config": source, "testing_criteria": [endpoint("http://127.0.0.1:9/")]}
    resp = client.post("/v1/evals", json=body)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == "testing_criteria[0]" and "endpoint grader" in err["message"]
