"""EGPO: the request block, hyperparameters and creation checks (torch side:
``trainers/algorithms/egpo/``; formulas: ``docs/algorithms/egpo.md``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from trainers.contract.errors import JobError
from trainers.contract.hparams import CommonHyperparameters, RolloutEngine, Strict
from trainers.contract.judges.spec import Judge as JudgeField
from trainers.contract.judges.spec import judge_item_fields
from trainers.contract.judges.validate import validate_judge
from trainers.contract.methods.base import MethodModel
from trainers.contract.resources import Resources
from trainers.contract.rows import RowFormat


class EGPOHyperparameters(CommonHyperparameters, RolloutEngine):
    """EGPO (Zhou, Fazel & Du 2025, arXiv 2503.08942): online Nash preference optimisation
    with extragradient steps, judged by ``judge``. One iteration is two optimizer steps (a
    half step and a full step), so ``max_steps`` counts optimizer steps and must be even.

    ``batch_size`` counts prompts: each prompt gets y and y' (``temperature``, ``top_k``)
    and the opponent y'' (``opponent_temperature``, ``opponent_top_k``). Base learning rate
    5e-7 (the paper's code, full) / 5e-6 (LoRA); weight decay 0.01 (the paper's code). A
    tiny or randomly initialised model needs far larger rates (the tests use 1e-3..1e-2).
    """

    base_learning_rate: ClassVar[tuple[float, float]] = (5e-7, 5e-6)

    judge: JudgeField = Field(description="The pairwise judge that gives P(A ≻ B).")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    beta: float = Field(0.1, gt=0.0, le=100.0, description="KL coefficient to the reference.")
    temperature: float = Field(
        2.0, gt=0.0, le=10.0, description="Sampling temperature of y and y'."
    )
    top_k: int = Field(10, ge=0, description="Top-k sampling of y and y'; 0 = off.")
    opponent_temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Sampling temperature of the opponent y''."
    )
    opponent_top_k: int = Field(0, ge=0, description="Top-k sampling of y''; 0 = off.")
    max_new_tokens: int = Field(
        64, ge=1, le=32768, description="Tokens generated per completion at most."
    )
    normalize_logprobs: bool = Field(
        True,
        description="Length-normalised log-probs in h (summed up to and including EOS, "
        "divided by the token count), as the paper's code; false = summed (the theory's).",
    )
    extragradient: bool = Field(
        True,
        description="Half step + full step per iteration (EGPO); false = every step is a "
        "plain step on fresh samples (online IPO).",
    )

    @model_validator(mode="after")
    def _check_egpo(self) -> EGPOHyperparameters:
        if self.max_steps is not None and self.extragradient and self.max_steps % 2:
            raise ValueError(
                f"max_steps ({self.max_steps}) must be even: one EGPO iteration is a half step "
                f"and a full step; try {self.max_steps + 1}"
            )
        if self.max_new_tokens >= self.max_seq_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below max_seq_length "
                f"({self.max_seq_length}), which also holds the prompt"
            )
        return self


class EGPOBlock(Strict):
    """EGPO's block: its hyperparameters, the judge among them (required)."""

    hyperparameters: EGPOHyperparameters


class EGPOMethod(MethodModel):
    """EGPO: online Nash preference optimisation with extragradient steps; prompts only
    (``prompt`` or ``messages``, extra fields ignored), answers sampled and judged online."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.prompt_only,)
    algorithm: ClassVar[str] = "trainers.algorithms.egpo.method"

    type: Literal["egpo"]
    egpo: EGPOBlock

    def check_job(self, resources: Resources) -> None:
        if resources.strategy != "ddp":
            raise ValueError(
                f"resources.strategy '{resources.strategy}' is not supported for egpo: "
                "its extragradient snapshot copies each process's whole parameters and "
                "optimizer state, which sharded strategies split; use 'ddp'"
            )

    def check_request(self, *, validation_file: str | None, judges: Collection[str] = ()) -> None:
        """No validation pass, and a judge that passes the judges' creation checks
        (a model path that does not load, a bad pattern...)."""
        if validation_file is not None:
            raise JobError(
                "invalid_value",
                "method 'egpo' has no validation pass (its answers are sampled and judged "
                "online); drop validation_file",
                "validation_file",
            )
        base = f"{self.param}.judge"
        try:
            validate_judge(self.hyperparameters.judge, base)
        except ValueError as exc:
            param = getattr(exc, "param", None) or base
            raise JobError("invalid_value", f"{param}: {exc}", param) from None

    def item_fields(self) -> set[str]:
        """A grader judge reads the prompt's row too."""
        return judge_item_fields(self.hyperparameters.judge)
