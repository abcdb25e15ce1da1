"""The trackers a job reports to: OpenAI's ``integrations`` list, and the server's side of it.

A job names its trackers in ``integrations`` (the field OpenAI's job API has): ``wandb``
(OpenAI's object: ``project``, ``name``, ``entity``, ``tags``) and posttrain's extensions
``tensorboard`` and ``mlflow``. The server decides how they run (``TrackerPolicy``, from
the worker's settings): W&B's mode (offline by default, since a training host may have no
network; ``online`` with the worker's own W&B credentials; ``disabled`` refuses the
integration), and which MLflow tracking servers a job may name; a job that names none logs
to an MLflow file store in its own output directory. Credentials never come from a job: a
tracking URI with a user name or password in it is refused.

Every tracker writes under ``trackers/{type}/`` of the job's output directory (W&B's
offline run directories, TensorBoard's event files, the MLflow file store and the run id a
resumed attempt continues), which the API serves as a tar. Pure pydantic: no tracker
library is imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

from trainers.contract.errors import JobError
from trainers.contract.hparams import Strict

INTEGRATION_TYPES = ("wandb", "tensorboard", "mlflow")
WANDB_MODES = ("offline", "online", "disabled")
MAX_INTEGRATIONS = len(INTEGRATION_TYPES)
DEFAULT_MLFLOW_EXPERIMENT = "posttrain"

# W&B refuses these characters in project and entity names.
_WANDB_NAME = r"^[^/\\#?%:]+$"
Tag = Annotated[str, Field(min_length=1, max_length=64)]


class WandbSettings(Strict):
    """OpenAI's W&B integration settings; the run's id is the job's id."""

    project: str = Field(
        min_length=1,
        max_length=128,
        pattern=_WANDB_NAME,
        description="The W&B project the run is created under.",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The run's display name; default the job id.",
    )
    entity: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=_WANDB_NAME,
        description="The W&B team or user; default the entity of the server's W&B credentials.",
    )
    tags: list[Tag] | None = Field(None, max_length=20, description="Tags of the run.")


class WandbIntegration(Strict):
    type: Literal["wandb"]
    wandb: WandbSettings


class TensorBoardSettings(Strict):
    """Nothing to set: the event files go to the job's ``trackers/tensorboard/``."""


class TensorBoardIntegration(Strict):
    type: Literal["tensorboard"]
    tensorboard: TensorBoardSettings = Field(default_factory=TensorBoardSettings)


class MlflowSettings(Strict):
    """posttrain's MLflow integration: one MLflow run per job."""

    experiment_name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description=f"The experiment; default '{DEFAULT_MLFLOW_EXPERIMENT}'.",
    )
    run_name: str | None = Field(
        None, min_length=1, max_length=256, description="The run's name; default the job id."
    )
    tracking_uri: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="A tracking server the server allows (POSTTRAIN_MLFLOW_TRACKING_URIS); "
        "default a file store in the job's output directory.",
    )
    tags: dict[Annotated[str, Field(min_length=1, max_length=250)], str] | None = Field(
        None, max_length=20, description="Tags of the run."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if not parts.scheme:
            raise ValueError("a tracking URI names its scheme (http://, https://...)")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "a tracking URI must not carry credentials; the server's workers hold them "
                "(MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)"
            )
        return value

    @field_validator("tags")
    @classmethod
    def _tag_values(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, tag in (value or {}).items():
            if len(tag) > 5000:
                raise ValueError(f"tag '{key}': values are at most 5000 characters")
        return value


class MlflowIntegration(Strict):
    type: Literal["mlflow"]
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)


Integration = Annotated[
    Union[WandbIntegration, TensorBoardIntegration, MlflowIntegration],  # noqa: UP007
    Field(discriminator="type"),
]


def check_unique(integrations: list | None) -> None:
    """Each tracker at most once (a job has one run per tracker)."""
    seen: set[str] = set()
    for item in integrations or ():
        if item.type in seen:
            raise ValueError(f"'{item.type}' is given twice; give each integration type once")
        seen.add(item.type)


class TrackerPolicy(BaseModel):
    """The server's side of a job's trackers, handed to the training process in its plan:
    the W&B mode and the MLflow tracking URIs jobs may name. No credentials: an online W&B
    run or a remote MLflow server authenticates with the worker's own environment."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    mlflow_tracking_uris: tuple[str, ...] = ()

    def mlflow_allowed(self, uri: str) -> bool:
        return _norm(uri) in {_norm(u) for u in self.mlflow_tracking_uris}

    def check(self, integrations: list | None) -> None:
        """Refuse what this server does not run: a ``JobError`` naming the field."""
        for i, item in enumerate(integrations or ()):
            if item.type == "wandb" and self.wandb_mode == "disabled":
                raise JobError(
                    "invalid_value",
                    "W&B is disabled on this server (POSTTRAIN_WANDB_MODE=disabled); drop "
                    "the wandb integration, or use tensorboard or mlflow",
                    f"integrations[{i}].type",
                )
            uri = item.mlflow.tracking_uri if item.type == "mlflow" else None
            if uri is not None and not self.mlflow_allowed(uri):
                raise JobError(
                    "invalid_value",
                    f"MLflow tracking URI '{uri}' is not one this server allows (its "
                    "POSTTRAIN_MLFLOW_TRACKING_URIS); drop tracking_uri to log to the "
                    "job's own MLflow store, downloadable from the job",
                    f"integrations[{i}].mlflow.tracking_uri",
                )


def parse_uri_list(value: str) -> tuple[str, ...]:
    """A comma-separated setting's URIs."""
    return tuple(u.strip() for u in value.split(",") if u.strip())


def _norm(uri: str) -> str:
    return uri.strip().rstrip("/")


def tracker_dir(output_dir: str | Path, kind: str) -> Path:
    """Where a job's tracker of ``kind`` writes, under its run's output directory."""
    if kind not in INTEGRATION_TYPES:
        raise ValueError(f"not an integration type: {kind!r}")
    return Path(output_dir) / "trackers" / kind
