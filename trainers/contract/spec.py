"""The job specification: the one language the API, the worker and the trainer share.

A request body is validated into a ``JobSpec`` by the API, stored as JSON in the
job record, and parsed back by the training process. Pure pydantic: importing
this module never loads torch.

``method`` is a discriminated union on ``type``; each member holds its
hyperparameters (one shared base, ``trainers.contract.hparams``, plus the method's
own fields) and the row formats it trains on. The members are the list of methods
(``trainers.contract.methods``): each method's contract module defines its own.

Stored specs carry ``spec_version``. ``read_stored_spec`` upgrades older
versions, so a record written by an earlier release still parses; the API
additionally falls back to the raw JSON when a record cannot be parsed at all
(``stored_spec_view``), so GET and list never fail on an old record.

OpenAI compatibility: ``method.type`` and ``method.<type>.hyperparameters``
follow OpenAI's fine-tuning API. Fields OpenAI lacks are extensions in the same
style.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from trainers.contract.hparams import CommonHyperparameters, Strict
from trainers.contract.integrations import MAX_INTEGRATIONS, Integration, check_unique
from trainers.contract.jsonnum import NumberError, loads
from trainers.contract.messages import MAX_SAMPLE_ROWS
from trainers.contract.methods import (
    DEFAULT_METHOD,
    METHOD_ALIASES,
    METHOD_MODELS,
    PLANNED_METHODS,
)
from trainers.contract.resources import LoraSettings, Resources
from trainers.contract.sizes import MAX_SPEC_BYTES, at_most

__all__ = ["PLANNED_METHODS", "SPEC_VERSION", "CheckpointEval", "JobSpec", "read_stored_spec"]

# A job of a method that records samples (``records_samples``) reports this many of a
# rollout batch's completions at most every this many steps, unless it says otherwise.
DEFAULT_SAMPLE_EVERY_STEPS = 1
DEFAULT_SAMPLE_ROWS = 4

# 1: the first release (no spec_version field). 2: shared hyperparameter base, DPO, GRPO.
# 3: resources.gpus defaults to null (the worker's devices), processes, strategy, queue.
SPEC_VERSION = 3
Method = Annotated[
    Union[METHOD_MODELS],  # noqa: UP007  (the members are the list of methods)
    Field(discriminator="type"),
]


def legacy_method(hyperparameters: Any) -> dict[str, Any]:
    """OpenAI's deprecated top-level ``hyperparameters`` as the default method's block."""
    return {"type": DEFAULT_METHOD, DEFAULT_METHOD: {"hyperparameters": hyperparameters}}


def normalize_method(raw: Any) -> Any:
    """Apply aliases (``sft`` → ``supervised``) and the default method, before validation."""
    if raw is None:
        return {"type": DEFAULT_METHOD}
    if isinstance(raw, dict):
        raw = dict(raw)
        kind = raw.get("type")
        alias = METHOD_ALIASES.get(kind) if isinstance(kind, str) else None
        if alias:
            raw["type"] = alias
            for name, target in METHOD_ALIASES.items():
                if name in raw and target not in raw:
                    raw[target] = raw.pop(name)
    return raw


class CheckpointEval(Strict):
    """An eval run on each checkpoint of the job (the final one included): the worker
    creates a run of ``eval_id`` per checkpoint with this ``completions`` data source and
    the checkpoint as its ``model``. The API checks it at creation as it checks a run
    (``service.routes.evalruns.check_job_eval``); the training process ignores it."""

    eval_id: str = Field(min_length=1, max_length=64, pattern=r"^eval_[A-Za-z0-9]+$")
    data_source: dict[str, Any] = Field(
        description="A completions data source without 'model': {'type': 'completions', "
        "'source': ..., 'input_messages': ..., 'sampling_params': ...}."
    )


class JobSpec(Strict):
    """Everything a training process needs to run one job (files by id)."""

    spec_version: int = Field(SPEC_VERSION, description="Schema version of a stored spec.")
    model: str = Field(min_length=1, max_length=512, description="HF model id or local path.")
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(None, min_length=1, max_length=128)
    method: Method
    seed: int = Field(
        42, ge=0, le=2**31 - 1, description="Seeds data order and init of new weights."
    )
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    training_type: Literal["full", "lora"] = Field(
        "full", description="'full' fine-tunes every weight; 'lora' trains a peft adapter."
    )
    lora: LoraSettings | None = None
    resources: Resources = Field(default_factory=Resources)
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Checkpoint interval in steps; default from the worker settings.",
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Checkpoints kept besides the final one (the newest N); 0 = keep all; "
        "default from the worker settings.",
    )
    metadata: dict[str, str] | None = None
    eval: CheckpointEval | None = Field(
        None, description="Extension: an eval run on each checkpoint (CheckpointEval)."
    )
    sample_every_steps: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Extension, methods that sample while training (GRPO family): record a "
        f"sample of the rollouts at most every N steps; 0 = none; default "
        f"{DEFAULT_SAMPLE_EVERY_STEPS}.",
    )
    sample_rows: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLE_ROWS,
        description="Extension: completions per recorded sample (the rollout batch's "
        f"first ones, so a prompt's completions come together); default {DEFAULT_SAMPLE_ROWS}.",
    )

    integrations: list[Integration] | None = Field(
        None,
        max_length=MAX_INTEGRATIONS,
        description="Trackers the run reports to: OpenAI's wandb object, and the extensions "
        "tensorboard and mlflow (trainers.contract.integrations).",
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        at_most(MAX_SPEC_BYTES, "the job spec")(data)
        if isinstance(data, dict):
            data = dict(data)
            data["method"] = normalize_method(data.get("method"))
        return data

    @field_validator("integrations")
    @classmethod
    def _one_run_per_tracker(cls, value: list | None) -> list | None:
        check_unique(value)
        return value

    @field_validator("sample_every_steps", "sample_rows")
    @classmethod
    def _sampling_method(cls, value: int | None, info: ValidationInfo) -> int | None:
        method = info.data.get("method")
        if value is not None and method is not None and not method.records_samples:
            sampling = ", ".join(m.type_name() for m in METHOD_MODELS if m.records_samples)
            raise ValueError(
                f"method '{method.type}' records no samples (only {sampling} jobs do, whose "
                f"graders score the completions they sample); drop {info.field_name}"
            )
        return value

    def sampling(self) -> tuple[int, int]:
        """(every N steps, rows) of the job's samples; (0, 0) when it records none."""
        if not self.method.records_samples:
            return 0, 0
        every = self.sample_every_steps
        every = DEFAULT_SAMPLE_EVERY_STEPS if every is None else every
        return every, (self.sample_rows or DEFAULT_SAMPLE_ROWS) if every else 0

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.lora is not None and self.training_type != "lora":
            raise ValueError(
                "'lora' settings were given but training_type is 'full'; "
                "set training_type to 'lora' or drop 'lora'"
            )
        if self.training_type == "lora" and self.lora is None:
            self.lora = LoraSettings()
        self.method.check_job(self.resources)
        if self.metadata is not None:
            if len(self.metadata) > 16:
                raise ValueError("metadata holds at most 16 keys")
            for k, v in self.metadata.items():
                if len(k) > 64 or len(v) > 512:
                    raise ValueError(f"metadata key '{k[:64]}': keys <= 64 chars, values <= 512")
        return self

    @property
    def method_type(self) -> str:
        return self.method.type

    def method_hyperparameters(self) -> CommonHyperparameters:
        return self.method.hyperparameters


class StoredSpecError(ValueError):
    """A stored spec that no migration can turn into a valid ``JobSpec``."""


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a stored spec of any earlier version to ``SPEC_VERSION``."""
    version = int(data.get("spec_version", 1))
    if version > SPEC_VERSION:
        raise StoredSpecError(f"spec_version {version} is newer than this release ({SPEC_VERSION})")
    # 1 -> 2: only the version field is new; every v1 field kept its name and meaning.
    if version < 3:
        # 2 -> 3: resources.gpus was stored as its default 1 and never read; a stored 1 is
        # the new default (null: 1 on a GPU worker, CPU on a CPU-only one), so an old job
        # does not start demanding a GPU.
        resources = data.get("resources")
        if isinstance(resources, dict) and resources.get("gpus") == 1:
            data = {**data, "resources": {**resources, "gpus": None}}
    return {**data, "spec_version": SPEC_VERSION}


def read_stored_spec(text: str) -> JobSpec:
    """Parse a spec as stored in a job record, upgrading older versions. NaN and
    Infinity (which an earlier release could store) make it unreadable."""
    try:
        data = loads(text)
        if not isinstance(data, dict):
            raise ValueError("a stored job spec is a JSON object")
        return JobSpec.model_validate(_upgrade(data))
    except (ValueError, NumberError, ValidationError, RecursionError) as exc:
        raise StoredSpecError(f"stored job spec cannot be read: {exc}") from exc


def stored_spec_view(text: str) -> dict[str, Any]:
    """The stored spec as a plain dict with every field the API shows, even when it no
    longer validates (a method this release dropped, a field it renamed)."""
    try:
        return read_stored_spec(text).model_dump(mode="json")
    except StoredSpecError:
        pass
    try:  # non-finite numbers become null, so the view is always valid JSON
        raw = loads(text, nonfinite="null")
    except (ValueError, RecursionError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    metadata = raw.get("metadata")
    integrations = raw.get("integrations")
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        metadata = None
    return {
        "model": str(raw.get("model", "")),
        "training_file": str(raw.get("training_file", "")),
        "validation_file": _str_or_none(raw.get("validation_file")),
        "method": method,
        "seed": raw.get("seed") if isinstance(raw.get("seed"), int) else None,
        "suffix": _str_or_none(raw.get("suffix")),
        "training_type": str(raw.get("training_type", "full")),
        "resources": raw.get("resources") if isinstance(raw.get("resources"), dict) else {},
        "metadata": metadata,
        "integrations": integrations if isinstance(integrations, list) else None,
    }


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
