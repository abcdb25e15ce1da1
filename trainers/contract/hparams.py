"""Hyperparameters every method shares; each method's own live in its contract module.

OpenAI's fine-tuning API names three hyperparameters per method (``n_epochs``,
``batch_size``, ``learning_rate_multiplier``, each a value or ``"auto"``); DPO
adds ``beta``. posttrain accepts those exactly and adds extensions in the same
style. The learning rate a job trains at is the method's base rate (which
differs for full and LoRA training) times ``learning_rate_multiplier``, unless
an absolute ``learning_rate`` is given.

``batch_size`` is the global micro-batch: the job's training processes split it
evenly (``trainers.runner.per_process_batch``). One optimizer step sees
``batch_size x gradient_accumulation_steps`` rows (a DPO row is one pair), on any
process count.

Each method's hyperparameters (``trainers/contract/methods/<name>.py``) extend
``CommonHyperparameters`` with only its own fields and its base learning rate, and
carry the resolution of its ``"auto"`` values: the trainer reads the same object the
API validated, so no second copy of the fields exists on the torch side.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Auto = Literal["auto"]
# Upper bounds of the common settings (README, "Limits"). The API refuses larger values
# with a 400; they are far past any useful run, and keep a typo from queueing a job that
# would never end or overflow a counter.
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 4096
MAX_STEPS = 1_000_000
MAX_LR_MULTIPLIER = 100.0
MAX_LEARNING_RATE = 1.0  # the effective rate: base x multiplier, or learning_rate
Epochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]
Multiplier = Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommonHyperparameters(Strict):
    """Fields every method has. Subclasses set ``base_learning_rate`` (full, LoRA)."""

    base_learning_rate: ClassVar[tuple[float, float]] = (2e-5, 2e-4)

    n_epochs: Epochs | Auto = Field("auto", description="Passes over the training file; auto = 3.")
    batch_size: BatchSize | Auto = Field(
        "auto",
        description="Rows per micro-batch, split over the job's processes; auto = min(8, rows "
        "in the file). An optimizer step sees batch_size x gradient_accumulation_steps rows.",
    )
    learning_rate_multiplier: Multiplier | Auto = Field(
        "auto", description="Scales the method's base learning rate; auto = 1.0."
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=MAX_LEARNING_RATE,
        description="Absolute learning rate (extension); beats the multiplier.",
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
        None,
        ge=1,
        le=MAX_STEPS,
        description="Stop after this many optimizer steps (overrides n_epochs).",
    )
    max_seq_length: int = Field(
        1024, ge=8, le=131072, description="Tokens per row (prompt + answer); longer rows are cut."
    )
    gradient_checkpointing: bool | Auto = Field(
        "auto",
        description="Keep only each layer's inputs in the forward and recompute the rest in "
        "the backward: less activation memory for about one more forward per step; the "
        "result is the same. auto = on when the job trains on GPUs, off on CPU.",
    )

    def resolved_epochs(self) -> int:
        return 3 if self.n_epochs == "auto" else self.n_epochs

    def resolved_batch_size(self, rows: int) -> int:
        return max(1, min(8, rows)) if self.batch_size == "auto" else self.batch_size

    def resolved_gradient_checkpointing(self, device: str) -> bool:
        if self.gradient_checkpointing == "auto":
            return device == "cuda"
        return self.gradient_checkpointing

    def resolved_learning_rate(self, lora: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        mult = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        return self.base_learning_rate[1 if lora else 0] * mult

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v: float | str) -> float | str:
        if isinstance(v, str):
            return v
        if not math.isfinite(v):
            raise ValueError("learning_rate_multiplier must be a finite number or 'auto'")
        rate = max(cls.base_learning_rate) * v
        if rate > MAX_LEARNING_RATE:
            raise ValueError(
                f"learning_rate_multiplier {v:g} makes the learning rate {rate:g}, above "
                f"{MAX_LEARNING_RATE:g}"
            )
        return v


PackingMode = Literal["auto", "padding_free", "off"]


class PackedHyperparameters(CommonHyperparameters):
    """Methods whose trainer scores padded batches through the fused forward (SFT, DPO):
    those batches can run padding-free (``trainers/packing.py``)."""

    packing: PackingMode = Field(
        "auto",
        description="Run each micro-batch's rows as one packed row with no padding (same rows, "
        "same loss, less compute): padding_free, or off for padded batches; auto = padding_free "
        "where the model's attention keeps packed rows apart exactly (sdpa, eager, "
        "flash-attention), else off. true/false mean padding_free/off.",
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_bool(cls, v: object) -> object:
        if isinstance(v, bool):
            return "padding_free" if v else "off"
        return v


class RolloutEngine(Strict):
    """Where an online method samples: transformers ``generate``, or vLLM through TRL."""

    rollout_engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto = vLLM on a GPU worker that has it, else transformers."
    )
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM in the training process, or a server the worker starts."
    )

    @property
    def wants_vllm_server(self) -> bool:
        """The worker starts a vLLM server for the run (``workers.vllm_server``)."""
        return self.rollout_engine == "vllm" and self.vllm_mode == "server"

    @property
    def needs_engine(self) -> str | None:
        """What the job's worker must have (one of ``ROLLOUT_ENGINES``; None: nothing):
        ``vllm-server`` its vLLM command, ``vllm`` vLLM importable by its runs."""
        if self.rollout_engine != "vllm":
            return None
        return "vllm-server" if self.vllm_mode == "server" else "vllm"


# What a worker advertises it can sample with (``workers.vllm_server.rollout_engines``),
# and what a job that needs one is told when no live worker of its queue has it.
ROLLOUT_ENGINES = {
    "vllm-server": "cannot start a vLLM server (its POSTTRAIN_VLLM_COMMAND is not installed)",
    "vllm": "has no vLLM installed for its runs (the gpu extra)",
}
