"""Direct preference optimisation: the request block and hyperparameters (torch side:
``trainers/algorithms/dpo/``; formulas: ``docs/algorithms/dpo.md``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from trainers.contract.hparams import Auto, PackedHyperparameters, Strict
from trainers.contract.methods.base import MethodModel
from trainers.contract.rows import RowFormat

# TRL 1.16 DPOConfig.loss_type values (several may be combined with loss_weights);
# tests/trainers/contract/test_methods.py compares them with the branches TRL's loss implements.
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
DPOLossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]


class DPOHyperparameters(PackedHyperparameters):
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


class DPOBlock(Strict):
    hyperparameters: DPOHyperparameters = Field(default_factory=DPOHyperparameters)


class DPOMethod(MethodModel):
    """Direct preference optimisation with TRL's DPOTrainer."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.preference,)
    algorithm: ClassVar[str] = "trainers.algorithms.dpo.method"

    type: Literal["dpo"]
    dpo: DPOBlock = Field(default_factory=DPOBlock)
