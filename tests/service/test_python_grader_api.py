"""The ``python`` grader through the API: on a server with ``POSTTRAIN_PYTHON_GRADER``
off, a job or a /graders call holding one (alone or in a multi grader) is a 400 naming
that grader and saying why; with it on (``bwrap``), the job is accepted and
/graders/run answers the reward the source computes, from its sandbox, in OpenAI's
shape. /graders/run with the sandbox on is skipped where bwrap does not work."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.test_api import create_job, error_of, upload
from tests.service.test_tools_api import settings_for
from trainers.contract.sandbox import SandboxPolicy, probe

PROMPT = {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}
RUN = "/v1/fine_tuning/alpha/graders/run"
VALIDATE = "/v1/fine_tuning/alpha/graders/validate"
SOURCE = (
    "def grade(sample, item):\n"
    "    said = sample['output_text'].strip()\n"
    "    return 1.0 if said == item['answer'] else len(said) / 10\n"
)
GRADER = {"type": "python", "name": "py", "source": SOURCE}
WHY = probe(SandboxPolicy(mode="bwrap"))  # the settings' defaults, the sandbox on
MULTI = {
    "type": "multi",
    "name": "combo",
    "graders": {"exact": GRADER},
    "calculate_output": "2 * exact",
}


@pytest.fixture
def off(tmp_path, redis_client, unit_redis_url):
    with TestClient(create_app(settings_for(tmp_path, unit_redis_url))) as c:
        yield c


@pytest.fixture
def on(tmp_path, redis_client, unit_redis_url):
    settings = settings_for(tmp_path, unit_redis_url, python_grader="bwrap")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    "grader,param",
    [(GRADER, "method.grpo.graders[0]"), (MULTI, "method.grpo.graders[0].graders.exact")],
)
def test_a_job_with_a_python_grader_is_refused_where_the_server_has_it_off(off, grader, param):
    fid = upload(off, [PROMPT]).json()["id"]
    resp = create_job(off, fid, method={"type": "grpo", "grpo": {"graders": [grader]}})
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == param and err["code"] == "unsupported_grader"
    assert err["message"] == (
        f"{param}: the python grader needs the bubblewrap sandbox on the workers, and this "
        "server has it off (POSTTRAIN_PYTHON_GRADER=off); use another grader type or an "
        "endpoint grader calling your own scoring service"
    )


def test_a_multi_grader_on_graders_validate_is_refused_naming_the_sub_grader(off):
    resp = off.post(VALIDATE, json={"grader": MULTI})
    assert resp.status_code == 400 and error_of(resp)["param"] == "grader.graders.exact"


def test_a_job_with_a_python_grader_is_accepted_where_the_server_has_it_on(on):
    fid = upload(on, [PROMPT]).json()["id"]
    method = {"type": "reinforcement", "reinforcement": {"grader": GRADER}}
    resp = create_job(on, fid, method=method)
    assert resp.status_code == 200, resp.text
    assert resp.json()["method"]["reinforcement"]["grader"]["source"] == SOURCE
    assert on.post(VALIDATE, json={"grader": GRADER}).json() == {"grader": GRADER}


def test_a_bad_source_is_a_400_naming_the_source(on):
    bad = {**GRADER, "source": "def score(sample, item):\n    return 1\n"}
    resp = on.post(VALIDATE, json={"grader": bad})
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "grader.source" and "must define 'def grade" in err["message"]


@pytest.mark.skipif(bool(WHY), reason=f"no working bubblewrap sandbox: {WHY}")
@pytest.mark.parametrize("sample,expected", [("4", 1.0), ("five", 0.4)])
def test_graders_run_answers_the_reward_the_source_computes(on, sample, expected):
    body = {"grader": GRADER, "model_sample": sample, "item": {"answer": "4"}}
    resp = on.post(RUN, json=body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["reward"] == pytest.approx(expected)
    assert answer["metadata"]["type"] == "python" and answer["metadata"]["errors"]["details"] == {}
    bad = {**body, "grader": {**GRADER, "source": "def grade(sample, item):\n    return 'x'\n"}}
    errors = on.post(RUN, json=bad).json()["metadata"]["errors"]
    assert errors["python_grader_runtime_error"] is True
    assert "grade returned str, not a number" in errors["details"]["python_grader_runtime_error"]
