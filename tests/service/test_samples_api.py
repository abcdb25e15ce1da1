"""GET /v1/fine_tuning/jobs/{id}/samples (extension): an RL job's sampled rollouts, and the
job fields that set how many are recorded."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from tests.service.test_api import create_job, error_of, upload
from workers.store import JobStatus

GRADER = {
    "type": "string_check",
    "name": "says_answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}
GRPO = {"type": "grpo", "grpo": {"graders": [GRADER]}}
PROMPT = {"prompt": "Who?", "answer": "Heidi"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture
def client(tmp_path, redis_client, unit_redis_url):
    settings = ApiSettings(
        redis_url=unit_redis_url, data_dir=tmp_path, key_prefix="test:", queue="posttrain.test-s"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _row(i: int) -> dict:
    return {
        "prompt": "<|user|>Who?<|end|><|assistant|>",
        "completion": f"Heidi {i}" if i % 2 else f"nobody {i}",
        "reward": float(i % 2),
        "rewards": {"says_answer": float(i % 2)},
        "advantage": 1.0 if i % 2 else -1.0,
        "group": 0,
        "completion_tokens": 2,
        "truncated": False,
    }


def _rl_job(client) -> str:
    fid = upload(client, [PROMPT]).json()["id"]
    resp = create_job(client, fid, method=GRPO, sample_rows=2)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _ids(page: dict) -> list[str]:
    return [s["id"] for s in page["data"]]


def test_samples_page_oldest_first_by_cursor_and_step(client):
    job = _rl_job(client)
    store = client.app.state.jobs
    store.set_fields(job, status=str(JobStatus.running))
    for step in (1, 2, 3):
        store.add_samples(job, step, [_row(0), _row(1)])
    url = f"/v1/fine_tuning/jobs/{job}/samples"
    first = client.get(url, params={"limit": 3}).json()
    assert first["object"] == "list" and first["has_more"]
    assert _ids(first) == ["ftsample-1-1", "ftsample-1-2", "ftsample-2-1"]
    assert (first["first_id"], first["last_id"]) == ("ftsample-1-1", "ftsample-2-1")
    one = first["data"][1]
    assert one == {
        "id": "ftsample-1-2",
        "object": "fine_tuning.job.sample",
        "created_at": one["created_at"],
        "step": 1,
        **_row(1),
        "tool_calls": None,  # a job without tools
    }
    rest = client.get(url, params={"after": first["last_id"]}).json()
    assert _ids(rest) == ["ftsample-2-2", "ftsample-3-1", "ftsample-3-2"] and not rest["has_more"]
    step = client.get(url, params={"step": 2}).json()
    assert [s["step"] for s in step["data"]] == [2, 2] and not step["has_more"]
    assert client.get(url, params={"step": 9}).json()["data"] == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"after": "ftevent-1-1"}, "after"),
        ({"after": "ftsample-1"}, "after"),
        ({"limit": 101}, "limit"),
        ({"step": -1}, "step"),
    ],
)
def test_bad_sample_queries_are_400s_naming_the_parameter(client, params, param):
    job = _rl_job(client)
    resp = client.get(f"/v1/fine_tuning/jobs/{job}/samples", params=params)
    assert resp.status_code == 400 and error_of(resp)["param"] == param, resp.text


def test_a_job_that_records_no_samples_answers_an_empty_list_and_unknown_jobs_404(client):
    fid = upload(client, [CHAT]).json()["id"]
    job = create_job(client, fid).json()["id"]
    page = client.get(f"/v1/fine_tuning/jobs/{job}/samples").json()
    assert page == {"object": "list", "data": [], "has_more": False, "first_id": None,
                    "last_id": None}  # fmt: skip
    resp = client.get("/v1/fine_tuning/jobs/ftjob-nope/samples")
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"method": GRPO, "sample_rows": 17}, "sample_rows", "less than or equal to 16"),
        ({"method": GRPO, "sample_every_steps": "2"}, "sample_every_steps", "integer"),
        ({"sample_every_steps": 1}, "sample_every_steps", "'supervised' records no samples"),
        ({"method": {"type": "dpo"}, "sample_rows": 4}, "sample_rows", "only grpo, reinforcement"),
    ],
)
def test_sample_settings_are_checked_at_creation(client, fields, param, fragment):
    fid = upload(client, [PROMPT]).json()["id"]
    err = error_of(create_job(client, fid, **fields))
    assert err["param"] == param and fragment in err["message"], err
    assert err["message"].startswith(f"{param}: ")
