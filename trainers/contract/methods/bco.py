"""Binary classifier optimisation: the request block and hyperparameters (torch side:
``trainers/algorithms/bco/``; formulas: ``docs/algorithms/bco.md``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from trainers.contract.hparams import Auto, CommonHyperparameters, Strict
from trainers.contract.methods.base import MethodModel
from trainers.contract.rows import RowFormat


class BCOHyperparameters(CommonHyperparameters):
    """BCO (binary classifier optimisation) on posttrain's trainer. Base learning rate 1e-6
    (TRL's BCO example) / 5e-6 (LoRA); warmup defaults to TRL's example's 10%."""

    base_learning_rate: ClassVar[tuple[float, float]] = (1e-6, 5e-6)

    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps of warmup.")
    beta: float | Auto = Field(
        "auto", description="Scale of the implicit reward beta*(log pi - log pi_ref); auto = 0.1."
    )
    balanced_delta: bool = Field(
        False,
        description="Reward shift delta = half the sum of the two classes' running means, "
        "instead of the running mean of every reward (TRL's).",
    )
    udm: bool = Field(
        False, description="Underlying distribution matching: reweight thumbs-down rows."
    )
    udm_prompt_sample_size: int = Field(
        1024, ge=2, le=100_000, description="Prompts per class the UDM classifier is fitted on."
    )
    udm_min_density_ratio: float = Field(0.5, gt=0.0, description="Lower clip of the weights.")
    udm_max_density_ratio: float = Field(10.0, gt=0.0, description="Upper clip of the weights.")
    udm_embedding_model: str | None = Field(
        None,
        description="Local sentence-embedding model path for UDM; default = the reference "
        "model's mean-pooled last hidden state.",
    )

    def resolved_beta(self) -> float:
        return 0.1 if self.beta == "auto" else self.beta

    @model_validator(mode="after")
    def _check_bco(self) -> BCOHyperparameters:
        if isinstance(self.beta, float) and self.beta <= 0:
            raise ValueError("beta must be > 0 or 'auto'")
        if self.udm_min_density_ratio >= self.udm_max_density_ratio:
            raise ValueError("udm_min_density_ratio must be below udm_max_density_ratio")
        return self


class BCOBlock(Strict):
    hyperparameters: BCOHyperparameters = Field(default_factory=BCOHyperparameters)


class BCOMethod(MethodModel):
    """Binary classifier optimisation: thumbs-up/down rows (paired rows are split)."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (
        RowFormat.unpaired_preference,
        RowFormat.preference,
    )
    algorithm: ClassVar[str] = "trainers.algorithms.bco.method"

    type: Literal["bco"]
    bco: BCOBlock = Field(default_factory=BCOBlock)
