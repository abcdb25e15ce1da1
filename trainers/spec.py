"""The job specification: the one language the API, the worker and the trainer share.

A request body is validated into a ``JobSpec`` by the API, stored as JSON in the
job record, and parsed back by the training process. Pure pydantic: importing
this module never loads torch.

``method`` is a discriminated union on ``type``. Each method's hyperparameters
carry their default and where the default comes from. Methods that are known to
posttrain but whose trainer has not landed yet are listed in ``PLANNED_METHODS``
so the API can say so instead of calling them unknown.

OpenAI compatibility: ``method.type`` and ``method.<type>.hyperparameters``
follow OpenAI's fine-tuning API ("auto" or a value for n_epochs, batch_size,
learning_rate_multiplier). Fields OpenAI lacks are extensions in the same style.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.formats import RowFormat

Auto = Literal["auto"]

# Known methods whose trainers arrive in later issues: the API answers
# "not available yet" for them rather than "unknown".
PLANNED_METHODS: tuple[str, ...] = ("dpo", "bco", "grpo", "reinforcement", "egpo", "oreo")
METHOD_ALIASES: dict[str, str] = {"sft": "supervised"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    """LoRA adapter settings, used when ``training_type == "lora"`` (peft ``LoraConfig``)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank. Default 16 (common SFT choice).")
    alpha: int = Field(
        32, ge=1, description="Scaling numerator; effective scale alpha/r. Default 2r."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; 'all-linear' = every linear but the head."
    )


class Resources(_Strict):
    """What one job may use on its worker (extension)."""

    gpus: int = Field(1, ge=0, le=64, description="GPUs for the job; 0 = CPU (tests, demo).")
    cpu_threads: int | None = Field(
        None, ge=1, le=512, description="torch threads; default = the worker's share of cores."
    )


class SupervisedHyperparameters(_Strict):
    """SFT hyperparameters. OpenAI's three fields first, then extensions."""

    n_epochs: int | Auto = Field("auto", description="Epochs; auto = 3 (OpenAI's usual choice).")
    batch_size: int | Auto = Field(
        "auto", description="Rows per optimizer step; auto = min(8, rows in the training file)."
    )
    learning_rate_multiplier: float | Auto = Field(
        "auto", description="Scales the base rate (2e-5 full, 2e-4 LoRA); auto = 1.0."
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="Absolute learning rate (extension); overrides the multiplier.",
    )
    max_seq_length: int = Field(1024, ge=8, le=131072, description="Rows are truncated to this.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps of LR warmup.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides n_epochs)."
    )
    loss_on_prompt: bool = Field(
        False, description="Train on prompt/user tokens too; default trains on completions only."
    )

    def resolved_epochs(self) -> int:
        return 3 if self.n_epochs == "auto" else self.n_epochs

    def resolved_batch_size(self, rows: int) -> int:
        return max(1, min(8, rows)) if self.batch_size == "auto" else self.batch_size

    def resolved_learning_rate(self, lora: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        mult = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        return (2e-4 if lora else 2e-5) * mult

    @model_validator(mode="after")
    def _check(self) -> SupervisedHyperparameters:
        if isinstance(self.n_epochs, int) and self.n_epochs < 1:
            raise ValueError("n_epochs must be >= 1 or 'auto'")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 or 'auto'")
        mult = self.learning_rate_multiplier
        if isinstance(mult, float) and mult <= 0:
            raise ValueError("learning_rate_multiplier must be > 0 or 'auto'")
        return self


class SupervisedConfig(_Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class SupervisedMethod(_Strict):
    """Supervised fine-tuning with TRL's SFTTrainer (``type`` alias: ``sft``)."""

    accepted_formats: ClassVar[frozenset[RowFormat]] = frozenset(
        {RowFormat.chat, RowFormat.prompt_completion}
    )
    type: Literal["supervised"]
    supervised: SupervisedConfig = Field(default_factory=SupervisedConfig)


# A discriminated union (one member until the next method lands; later ones add members).
Method = Annotated[Union[SupervisedMethod], Field(discriminator="type")]  # noqa: UP007


def normalize_method(raw: Any) -> Any:
    """Apply aliases (``sft`` → ``supervised``) and the default method, before validation."""
    if raw is None:
        return {"type": "supervised"}
    if isinstance(raw, dict):
        raw = dict(raw)
        alias = METHOD_ALIASES.get(raw.get("type"))
        if alias:
            raw["type"] = alias
            for name, target in METHOD_ALIASES.items():
                if name in raw and target not in raw:
                    raw[target] = raw.pop(name)
    return raw


class JobSpec(_Strict):
    """Everything a training process needs to run one job (files by id)."""

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
        None, ge=1, description="Checkpoint interval in steps; default from the worker settings."
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
