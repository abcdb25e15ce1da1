"""A job's ``integrations`` through the API: OpenAI's wandb object and posttrain's tensorboard
and mlflow extensions, refused with a 400 naming the field when malformed or when the
server does not run them, shown on the job object, and the trackers' run directories
served as a tar (``GET /v1/fine_tuning/jobs/{id}/integrations/{type}/content``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import ApiSettings
from tests.service.test_api import CHAT, create_job, error_of, upload

ALLOWED = "http://mlflow.internal:5000"
WANDB = {
    "type": "wandb",
    "wandb": {"project": "my-project", "name": "run-1", "entity": "team", "tags": ["a", "b"]},
}


@pytest.fixture
def settings(tmp_path, redis_client, unit_redis_url):
    return ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        key_prefix="test:",
        queue="posttrain.test-integrations",
        mlflow_tracking_uris=f"{ALLOWED}, https://other.example",
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_openai_sdk_creates_a_job_with_integrations_and_reads_them_back(client):
    sdk = openai.OpenAI(
        api_key="unused", base_url="http://testserver/v1", http_client=client, max_retries=0
    )
    fid = upload(client, [CHAT]).json()["id"]
    mlflow = {"type": "mlflow", "mlflow": {"experiment_name": "e", "tracking_uri": ALLOWED + "/"}}
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=fid,
        integrations=[WANDB],
        extra_body={"integrations": [WANDB, {"type": "tensorboard"}, mlflow]},
    )
    again = sdk.fine_tuning.jobs.retrieve(job.id)
    assert again.integrations[0].type == "wandb"
    assert again.integrations[0].wandb.project == "my-project"
    assert again.integrations[0].wandb.tags == ["a", "b"]
    raw = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["integrations"]
    assert raw == [
        WANDB,
        {"type": "tensorboard", "tensorboard": {}},
        {
            "type": "mlflow",
            "mlflow": {
                "experiment_name": "e",
                "run_name": None,
                "tracking_uri": ALLOWED + "/",
                "tags": None,
            },
        },
    ]
    # the SDK's own shape, without posttrain's extensions
    plain = sdk.fine_tuning.jobs.create(model="tiny", training_file=fid, integrations=[WANDB])
    assert [i.wandb.name for i in sdk.fine_tuning.jobs.retrieve(plain.id).integrations] == ["run-1"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"][0]["integrations"] == [WANDB]


@pytest.mark.parametrize(
    ("integrations", "param", "fragment"),
    [
        ([{"type": "wandb"}], "integrations[0].wandb", "Field required"),
        ([{"type": "wandb", "wandb": {"project": ""}}], "integrations[0].wandb.project", ""),
        ([{"type": "wandb", "wandb": {"project": "a/b"}}], "integrations[0].wandb.project", ""),
        (
            [{"type": "wandb", "wandb": {"project": "p", "tags": "x"}}],
            "integrations[0].wandb.tags",
            "",
        ),
        (  # no credentials in a job: the server holds them
            [{"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}],
            "integrations[0].wandb.api_key",
            "Extra inputs",
        ),
        ([{"type": "tensorboard"}, {"type": "comet"}], "integrations[1].type", "'comet'"),
        ([{"wandb": {"project": "p"}}], "integrations[0].type", ""),
        ([{"type": "tensorboard"}, {"type": "tensorboard"}], "integrations", "twice"),
        ("wandb", "integrations", ""),
        (
            [{"type": "mlflow", "mlflow": {"tracking_uri": "https://u:pw@mlflow.example"}}],
            "integrations[0].mlflow.tracking_uri",
            "credentials",
        ),
        (
            [{"type": "mlflow", "mlflow": {"tracking_uri": "http://elsewhere.example:5000"}}],
            "integrations[0].mlflow.tracking_uri",
            "not one this server allows",
        ),
        (  # a job may not write its MLflow store to a path of the server's choosing
            [{"type": "tensorboard"}, {"type": "mlflow", "mlflow": {"tracking_uri": "file:///"}}],
            "integrations[1].mlflow.tracking_uri",
            "not one this server allows",
        ),
    ],
)
def test_bad_integrations_are_400s_naming_the_field(client, integrations, param, fragment):
    fid = upload(client, [CHAT]).json()["id"]
    resp = create_job(client, fid, integrations=integrations)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == param and fragment in err["message"], err
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_server_with_wandb_disabled_refuses_the_wandb_integration(settings):
    settings.wandb_mode = "disabled"
    with TestClient(create_app(settings)) as client:
        fid = upload(client, [CHAT]).json()["id"]
        err = error_of(create_job(client, fid, integrations=[{"type": "tensorboard"}, WANDB]))
        assert err["param"] == "integrations[1].type" and "disabled" in err["message"]
        assert create_job(client, fid, integrations=[{"type": "tensorboard"}]).status_code == 200


def _tar_names(resp) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        return sorted(tar.getnames())


def test_a_trackers_run_directory_downloads_as_a_tar(client, settings):
    fid = upload(client, [CHAT]).json()["id"]
    job = create_job(client, fid, integrations=[{"type": "tensorboard"}]).json()["id"]
    url = f"/v1/fine_tuning/jobs/{job}/integrations"
    resp = client.get(f"{url}/comet/content")
    assert resp.status_code == 404 and "no integration type 'comet'" in error_of(resp)["message"]
    resp = client.get(f"{url}/wandb/content")
    assert resp.status_code == 404 and error_of(resp)["message"].endswith(
        "has no wandb integration"
    )
    resp = client.get(f"{url}/tensorboard/content")
    assert resp.status_code == 404 and "no tensorboard run yet" in error_of(resp)["message"]

    run = Path(settings.data_dir) / "jobs" / job / "output" / "trackers" / "tensorboard"
    (run / "sub").mkdir(parents=True)
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"event bytes")
    (run / "sub" / "events.out.tfevents.2.host.1.0").write_bytes(b"more")
    (run / "escape").symlink_to(Path(settings.data_dir) / "files")  # never followed
    (run / "empty").mkdir()  # kept: an MLflow store's runs need their empty artifacts/
    resp = client.get(f"{url}/tensorboard/content")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-tar"
    assert f'filename="{job}-tensorboard.tar"' in resp.headers["content-disposition"]
    assert _tar_names(resp) == [
        f"{job}-tensorboard/empty",
        f"{job}-tensorboard/events.out.tfevents.1.host.1.0",
        f"{job}-tensorboard/sub/events.out.tfevents.2.host.1.0",
    ]


def test_the_servers_tracker_settings_become_the_policy_a_run_gets(tmp_path):
    policy = ApiSettings(
        data_dir=tmp_path, wandb_mode="online", mlflow_tracking_uris=" http://a:5000/ ,https://b"
    ).tracker_policy()
    assert policy.wandb_mode == "online"
    assert policy.mlflow_allowed("http://a:5000") and policy.mlflow_allowed("https://b/")
    assert not policy.mlflow_allowed("http://a:5001")
    with pytest.raises(ValueError, match="not a URI"):
        ApiSettings(data_dir=tmp_path, mlflow_tracking_uris="mlflow.internal")
    with pytest.raises(ValueError, match="wandb_mode"):
        ApiSettings(data_dir=tmp_path, wandb_mode="loud")
