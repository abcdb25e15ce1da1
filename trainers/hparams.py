"""Hyperparameters: one shared base every method extends with only its own fields.

OpenAI's fine-tuning API names three hyperparameters per method (``n_epochs``,
``batch_size``, ``learning_rate_multiplier``, each a value or ``"auto"``); DPO
adds ``beta``. posttrain accepts those exactly and adds extensions in the same
style. The learning rate a job trains at is the method's base rate (which
differs for full and LoRA training) times ``learning_rate_multiplier``, unless
an absolute ``learning_rate`` is given.

``batch_size`` is the number of rows in one forward/backward micro-batch on each
training process. One optimizer step sees ``batch_size x
gradient_accumulation_steps x processes`` rows (a DPO row is one pair).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.methods import DPO_LOSS_TYPES

Auto = Literal["auto"]
DPOLossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommonHyperparameters(Strict):
    """Fields every method has. Subclasses set ``base_learning_rate`` (full, LoRA)."""

    base_learning_rate: ClassVar[tuple[float, float]] = (2e-5, 2e-4)

    n_epochs: int | Auto = Field("auto", description="Passes over the training file; auto = 3.")
    batch_size: int | Auto = Field(
        "auto",
        description="Rows per micro-batch on each process; auto = min(8, rows in the file). "
        "An optimizer step sees batch_size x gradient_accumulation_steps x processes rows.",
    )
    learning_rate_multiplier: float | Auto = Field(
        "auto", description="Scales the method's base learning rate; auto = 1.0."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1.0, description="Absolute learning rate (extension); beats the multiplier."
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule over the run."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps of warmup.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides n_epochs)."
    )
    max_seq_length: int = Field(
        1024, ge=8, le=131072, description="Tokens per row (prompt + answer); longer rows are cut."
    )

    def resolved_epochs(self) -> int:
        return 3 if self.n_epochs == "auto" else self.n_epochs

    def resolved_batch_size(self, rows: int) -> int:
        return max(1, min(8, rows)) if self.batch_size == "auto" else self.batch_size

    def resolved_learning_rate(self, lora: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        mult = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        return self.base_learning_rate[1 if lora else 0] * mult

    @model_validator(mode="after")
    def _check_common(self) -> CommonHyperparameters:
        if isinstance(self.n_epochs, int) and self.n_epochs < 1:
            raise ValueError("n_epochs must be >= 1 or 'auto'")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 or 'auto'")
        mult = self.learning_rate_multiplier
        if isinstance(mult, float) and mult <= 0:
            raise ValueError("learning_rate_multiplier must be > 0 or 'auto'")
        return self


class SupervisedHyperparameters(CommonHyperparameters):
    """SFT. Base learning rate 2e-5 (full) / 2e-4 (LoRA), common choices for SFT."""

    loss_on_prompt: bool = Field(
        False, description="Train on prompt/user tokens too; default trains on completions only."
    )


class DPOHyperparameters(CommonHyperparameters):
    """DPO on TRL's DPOTrainer. Base learning rate 1e-6 (TRL's default, full) / 5e-6 (LoRA:
    an adapter needs larger steps for the same change)."""

    base_learning_rate: ClassVar[tuple[float, float]] = (1e-6, 5e-6)

    beta: float | Auto = Field(
        "auto", description="Strength of the pull toward the reference model; auto = 0.1."
    )
    loss_type: DPOLossType | list[DPOLossType] = Field(
        "sigmoid",
        description="TRL loss type, or a list combined with loss_weights "
        "(e.g. ['sigmoid', 'sft'] is RPO).",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight per loss_type entry; default 1.0 each."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Probability a label is flipped (robust) or EXO's epsilon."
    )

    def resolved_beta(self) -> float:
        return 0.1 if self.beta == "auto" else self.beta

    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _check_dpo(self) -> DPOHyperparameters:
        if isinstance(self.beta, float) and self.beta <= 0:
            raise ValueError("beta must be > 0 or 'auto'")
        types = self.loss_types()
        if not types:
            raise ValueError("loss_type must name at least one loss")
        if "exo_pair" in types and self.label_smoothing == 0.0:
            raise ValueError(
                "loss_type 'exo_pair' needs label_smoothing > 0 (its epsilon; the EXO paper "
                "uses 1e-3)"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has "
                f"{len(types)}; give one weight per loss type"
            )
        return self
