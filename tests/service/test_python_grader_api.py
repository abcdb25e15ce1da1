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


# ---- in an eval's testing criteria

EVAL_SOURCE = {
    "type": "custom",
    "item_schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
    "include_sample_schema": True,
}
STRICT = (  # a KeyError for an item without an answer: the grader failed on that sample
    "def grade(sample, item):\n"
    "    said = sample['output_text'].strip()\n"
    "    return 1.0 if said == item['answer'] else len(said) / 10\n"
)


def _sdk(client, key="k1"):
    import openai

    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client,
                         max_retries=0)  # fmt: skip


def test_an_eval_with_a_python_criterion_is_refused_where_the_server_has_it_off(off):
    import openai

    criterion = {**GRADER, "pass_threshold": 0.5}
    with pytest.raises(openai.BadRequestError) as info:
        _sdk(off).evals.create(data_source_config=EVAL_SOURCE, testing_criteria=[criterion])
    err = info.value.body
    assert err["param"] == "testing_criteria[0]" and err["code"] == "unsupported_grader"
    assert "POSTTRAIN_PYTHON_GRADER=off" in err["message"]


@pytest.mark.skipif(bool(WHY), reason=f"no working bubblewrap sandbox: {WHY}")
def test_an_eval_run_grades_a_python_criterion_in_the_sandbox(on, tmp_path, unit_redis_url):
    """Each row's score is what the source computes, from the worker's sandbox; the
    criterion's pass_threshold decides pass/fail; a sample grade failed on is a fail
    with python_grader_runtime_error, not an errored row; a worker whose sandbox cannot
    run errs the rows with python_grader_server_error."""
    from workers.evaltasks import grade_run

    sdk = _sdk(on)
    ev = sdk.evals.create(
        data_source_config=EVAL_SOURCE,
        testing_criteria=[{**GRADER, "source": STRICT, "pass_threshold": 0.5}],
    )
    assert ev.testing_criteria[0].pass_threshold == 0.5
    content = [
        {"item": {"answer": "4"}, "sample": {"output_text": "4"}},
        {"item": {"answer": "4"}, "sample": {"output_text": "five"}},
        {"item": {}, "sample": {"output_text": "4"}},
        {"item": {"answer": "4"}, "sample": {"output_text": "123456"}},
    ]
    data_source = {"type": "jsonl", "source": {"type": "file_content", "content": content}}
    run = sdk.evals.runs.create(ev.id, data_source=data_source)
    state = on.app.state
    assert grade_run(run.id, state.eval_runs, state.files, state.settings) == "completed"
    listed = on.get(f"/v1/evals/{ev.id}/runs/{run.id}/output_items",
                    headers={"Authorization": "Bearer k1"}).json()["data"]  # fmt: skip
    results = [o["results"][0] for o in sorted(listed, key=lambda o: o["datasource_item_id"])]
    assert [r["score"] for r in results] == pytest.approx([1.0, 0.4, 0.0, 0.6])
    assert [r["passed"] for r in results] == [True, False, False, True]
    assert "KeyError" in results[2]["errors"]["python_grader_runtime_error"]
    assert [r.get("errors") for r in results[:2]] == [None, None]
    done = sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert done.result_counts.model_dump() == {
        "errored": 0, "failed": 2, "passed": 2, "total": 4}  # fmt: skip
    # a worker whose sandbox cannot start: every row errs, naming the server error
    broken = state.settings.model_copy(update={"python_grader_interpreter": "/nonexistent/py"})
    run = sdk.evals.runs.create(ev.id, data_source=data_source)
    assert grade_run(run.id, state.eval_runs, state.files, broken) == "completed"
    done = sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert done.result_counts.errored == 4


# ---- as EGPO's grader judge

EGPO = {
    "type": "egpo",
    "egpo": {"hyperparameters": {"judge": {"type": "grader", "grader": GRADER}}},
}


def test_an_egpo_job_judged_by_a_python_grader_follows_the_servers_sandbox(off, on):
    fid = upload(off, [{"messages": PROMPT["messages"]}]).json()["id"]
    resp = create_job(off, fid, method=EGPO)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "method.egpo.hyperparameters.judge.grader"
    assert "POSTTRAIN_PYTHON_GRADER=off" in err["message"]
    fid = upload(on, [{"messages": PROMPT["messages"]}]).json()["id"]
    resp = create_job(on, fid, method=EGPO)
    assert resp.status_code == 200, resp.text
    judge = resp.json()["method"]["egpo"]["hyperparameters"]["judge"]["grader"]
    assert judge["source"] == SOURCE and judge["type"] == "python"
