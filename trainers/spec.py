"""The job specification: the one language the API, the worker and the trainer share.

A request body is validated into a ``JobSpec`` by the API, stored as JSON in the
job record, and parsed back by the training process. Pure pydantic: importing
this module never loads torch.

``method`` is a discriminated union on ``type``; each member holds its
hyperparameters (``trainers.hparams``, one shared base plus the method's own
fields) and the row formats it trains on. Names come from ``trainers.methods``.

Stored specs carry ``spec_version``. ``read_stored_spec`` upgrades older
versions, so a record written by an earlier release still parses; the API
additionally falls back to the raw JSON when a record cannot be parsed at all
(``stored_spec_view``), so GET and list never fail on an old record.

OpenAI compatibility: ``method.type`` and ``method.<type>.hyperparameters``
follow OpenAI's fine-tuning API. Fields OpenAI lacks are extensions in the same
style.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field, ValidationError, model_validator

from trainers.graders.spec import Grader, template_fields
from trainers.hparams import (
    BCOHyperparameters,
    DPOHyperparameters,
    EGPOHyperparameters,
    GRPOHyperparameters,
    OREOHyperparameters,
    ReinforcementHyperparameters,
    Strict,
    SupervisedHyperparameters,
)
from trainers.methods import GRPO_VARIANTS, METHOD_ALIASES, PLANNED_METHODS
from trainers.rows import RowFormat

__all__ = ["PLANNED_METHODS", "SPEC_VERSION", "JobSpec", "read_stored_spec"]

# 1: the first release (no spec_version field). 2: shared hyperparameter base, DPO, GRPO.
# 3: resources.gpus defaults to null (the worker's devices), processes, strategy, queue.
SPEC_VERSION = 3
# Module names that are an LM head in the model families transformers ships.
_HEAD_MODULES = frozenset({"lm_head", "embed_out", "output", "output_layer"})


class LoraSettings(Strict):
    """LoRA adapter settings, used when ``training_type == "lora"`` (peft ``LoraConfig``)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank. Default 16 (common SFT choice).")
    alpha: int = Field(
        32, ge=1, description="Scaling numerator; effective scale alpha/r. Default 2r."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; 'all-linear' = every linear but the head."
    )

    @model_validator(mode="after")
    def _no_head(self) -> LoraSettings:
        if isinstance(self.target_modules, list):
            heads = sorted(_HEAD_MODULES.intersection(self.target_modules))
            if heads:
                raise ValueError(
                    f"LoRA on the LM head ({', '.join(heads)}) is not supported: posttrain's fused "
                    "log-prob kernel reads the head's base weight; drop it from target_modules "
                    "(or train the head with training_type 'full')"
                )
        return self


# Distributed strategies of a multi-process job, each one of accelerate's own launch
# configurations (``workers.launch``): DDP, FSDP2, DeepSpeed ZeRO stage 2 or 3.
STRATEGIES = ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


class Resources(Strict):
    """What one job may use on its worker (extension).

    A job runs on a worker of ``queue`` (one queue per GPU class); every training
    process sees exactly that worker's devices (``CUDA_VISIBLE_DEVICES``). More than
    one process (``gpus`` > 1, or ``processes`` > 1 on CPU) runs under
    ``accelerate launch`` with ``strategy``.
    """

    gpus: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs, one training process each; 0 = CPU. Default (null): 1 on a GPU "
        "worker, 0 on a CPU-only worker.",
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Training processes of a CPU job (gloo); default 1. A GPU job runs one "
        "process per GPU.",
    )
    strategy: Literal[STRATEGIES] = Field(
        "ddp", description="How processes share the model: ddp, fsdp2, deepspeed_zero2/3."
    )
    queue: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Celery queue (GPU class) whose workers run the job; default = the "
        "API's POSTTRAIN_QUEUE.",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=512, description="torch threads; default = the worker's share of cores."
    )

    @model_validator(mode="after")
    def _check_processes(self) -> Resources:
        if self.gpus and self.processes is not None and self.processes != self.gpus:
            raise ValueError(
                f"processes ({self.processes}) must equal gpus ({self.gpus}): a GPU job runs "
                "one process per GPU; drop processes"
            )
        if self.gpus == 0 and self.strategy != "ddp":
            raise ValueError(
                f"strategy '{self.strategy}' needs GPUs (on CPU accelerate runs DDP over "
                "gloo); set gpus >= 1 or use 'ddp'"
            )
        return self


class SupervisedConfig(Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class SupervisedMethod(Strict):
    """Supervised fine-tuning with TRL's SFTTrainer (``type`` alias: ``sft``)."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (
        RowFormat.chat,
        RowFormat.prompt_completion,
    )
    type: Literal["supervised"]
    supervised: SupervisedConfig = Field(default_factory=SupervisedConfig)


class DPOConfig(Strict):
    hyperparameters: DPOHyperparameters = Field(default_factory=DPOHyperparameters)


class DPOMethod(Strict):
    """Direct preference optimisation with TRL's DPOTrainer."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.preference,)
    type: Literal["dpo"]
    dpo: DPOConfig = Field(default_factory=DPOConfig)


class BCOConfig(Strict):
    hyperparameters: BCOHyperparameters = Field(default_factory=BCOHyperparameters)


class BCOMethod(Strict):
    """Binary classifier optimisation: thumbs-up/down rows (paired rows are split)."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (
        RowFormat.unpaired_preference,
        RowFormat.preference,
    )
    type: Literal["bco"]
    bco: BCOConfig = Field(default_factory=BCOConfig)


class OREOConfig(Strict):
    hyperparameters: OREOHyperparameters = Field(default_factory=OREOHyperparameters)


class OREOMethod(Strict):
    """OREO: a policy and a value model from scored trajectories (prompt, response, reward)."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.scored,)
    type: Literal["oreo"]
    oreo: OREOConfig = Field(default_factory=OREOConfig)


GRPOVariant = Literal[GRPO_VARIANTS]  # type: ignore[valid-type]


def _check_pieces(variant: str, hp: GRPOHyperparameters) -> None:
    from trainers.grpo_presets import resolve  # a sibling torch-free module

    resolve(variant, hp)


def _check_weights(hp: GRPOHyperparameters, n_graders: int) -> None:
    if hp.reward_weights is not None and len(hp.reward_weights) != n_graders:
        raise ValueError(
            f"reward_weights has {len(hp.reward_weights)} entries for {n_graders} graders; "
            "give one weight per grader"
        )


class GRPOConfig(Strict):
    variant: GRPOVariant = Field("grpo", description="Preset over the pieces; see the README.")
    graders: list[Grader] = Field(min_length=1, max_length=16, description="Reward sources.")
    hyperparameters: GRPOHyperparameters = Field(default_factory=GRPOHyperparameters)

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        _check_pieces(self.variant, self.hyperparameters)
        _check_weights(self.hyperparameters, len(self.graders))
        return self


class GRPOMethod(Strict):
    """The GRPO family on TRL's GRPOTrainer: ``variant`` plus ``hyperparameters``."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.prompt_only,)
    type: Literal["grpo"]
    grpo: GRPOConfig

    def graders(self) -> list:
        return list(self.grpo.graders)


class ReinforcementConfig(Strict):
    """OpenAI's reinforcement method: one grader and its hyperparameters (plus GRPO's)."""

    grader: Grader
    hyperparameters: ReinforcementHyperparameters = Field(
        default_factory=ReinforcementHyperparameters
    )
    variant: GRPOVariant = Field("grpo", description="Extension: the GRPO preset to run.")

    @model_validator(mode="after")
    def _check(self) -> ReinforcementConfig:
        _check_pieces(self.variant, self.hyperparameters)
        _check_weights(self.hyperparameters, 1)
        return self


class ReinforcementMethod(Strict):
    """OpenAI's reinforcement fine-tuning, run as GRPO with the request's grader."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.prompt_only,)
    type: Literal["reinforcement"]
    reinforcement: ReinforcementConfig

    def graders(self) -> list:
        return [self.reinforcement.grader]


class EGPOConfig(Strict):
    """EGPO's block: its hyperparameters, the judge among them (required)."""

    hyperparameters: EGPOHyperparameters


class EGPOMethod(Strict):
    """EGPO: online Nash preference optimisation with extragradient steps; prompts only
    (``prompt`` or ``messages``, extra fields ignored), answers sampled and judged online."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.prompt_only,)
    type: Literal["egpo"]
    egpo: EGPOConfig


def grader_fields(method) -> set[str]:
    """The dataset fields a job's graders read (``{{item.x}}``); empty for other methods."""
    graders = method.graders() if hasattr(method, "graders") else []
    return set().union(*(template_fields(g) for g in graders)) if graders else set()


Method = Annotated[
    Union[  # noqa: UP007
        SupervisedMethod,
        DPOMethod,
        BCOMethod,
        OREOMethod,
        GRPOMethod,
        ReinforcementMethod,
        EGPOMethod,
    ],
    Field(discriminator="type"),
]


def normalize_method(raw: Any) -> Any:
    """Apply aliases (``sft`` → ``supervised``) and the default method, before validation."""
    if raw is None:
        return {"type": "supervised"}
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


class JobSpec(Strict):
    """Everything a training process needs to run one job (files by id)."""

    spec_version: int = Field(SPEC_VERSION, description="Schema version of a stored spec.")
    model: str = Field(min_length=1, max_length=512, description="HF model id or local path.")
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
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

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            data["method"] = normalize_method(data.get("method"))
        return data

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.lora is not None and self.training_type != "lora":
            raise ValueError(
                "'lora' settings were given but training_type is 'full'; "
                "set training_type to 'lora' or drop 'lora'"
            )
        if self.training_type == "lora" and self.lora is None:
            self.lora = LoraSettings()
        if self.method.type == "egpo" and self.resources.strategy != "ddp":
            raise ValueError(
                f"resources.strategy '{self.resources.strategy}' is not supported for egpo: "
                "its extragradient snapshot copies each process's whole parameters and "
                "optimizer state, which sharded strategies split; use 'ddp'"
            )
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

    def method_hyperparameters(self) -> BaseModel:
        return getattr(self.method, self.method.type).hyperparameters


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


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _not_a_number(text: str) -> float:
    raise ValueError(f"{text} is not a number")


def _finite_or_none(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def read_stored_spec(text: str) -> JobSpec:
    """Parse a spec as stored in a job record, upgrading older versions. NaN and
    Infinity (which an earlier release could store) make it unreadable."""
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_not_a_number)
        if not isinstance(data, dict):
            raise ValueError("a stored job spec is a JSON object")
        return JobSpec.model_validate(_upgrade(data))
    except (ValueError, ValidationError, RecursionError) as exc:
        raise StoredSpecError(f"stored job spec cannot be read: {exc}") from exc


def stored_spec_view(text: str) -> dict[str, Any]:
    """The stored spec as a plain dict with every field the API shows, even when it no
    longer validates (a method this release dropped, a field it renamed)."""
    try:
        return read_stored_spec(text).model_dump(mode="json")
    except StoredSpecError:
        pass
    try:  # non-finite numbers become null, so the view is always valid JSON
        raw = json.loads(text, parse_float=_finite_or_none, parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    metadata = raw.get("metadata")
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
    }


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
