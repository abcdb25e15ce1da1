"""OREO: the request block, hyperparameters and the step check (torch side:
``trainers/algorithms/oreo/``; formulas: ``docs/algorithms/oreo.md``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from trainers.contract.errors import JobError
from trainers.contract.hparams import Auto, CommonHyperparameters, Strict
from trainers.contract.methods.base import MethodModel
from trainers.contract.rows import RowFormat

# Where the soft-Bellman residual is evaluated (the keys of trainers.core.oreo's registry).
OREO_VARIANT_NAMES: tuple[str, ...] = ("token", "step", "response")


# |reward_scale| or |reward_offset| beyond this is the first suspect when a run diverges.
BIG_REWARD_TRANSFORM = 10.0


class OREOHyperparameters(CommonHyperparameters):
    """OREO (Wang et al. 2024, arXiv 2412.16145): a policy and a separate value model trained
    on scored trajectories with the soft-Bellman residual. Base learning rate 5e-6 (the
    paper's) / 5e-5 (LoRA); cosine schedule with 3% warmup for both models (the scripts')."""

    base_learning_rate: ClassVar[tuple[float, float]] = (5e-6, 5e-5)

    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule of both the policy and the value model."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps of warmup.")
    beta: float = Field(0.03, gt=0.0, description="Scale of the log-ratio in the residual.")
    alpha: float | Auto = Field(
        "auto",
        description="Weight of the full-vocabulary KL(pi || pi_ref) term; "
        "auto = 0.01 (token), 0.1 (step), 0.3 (response).",
    )
    variant: Literal[OREO_VARIANT_NAMES] = Field(  # type: ignore[valid-type]
        "token", description="Where the residual is evaluated: every token, each step, s_0."
    )
    step_delimiters: list[str] = Field(
        default_factory=lambda: ["\n"],
        min_length=1,
        description="Strings that end a step (variant 'step'); MATH used ['\\n', '. ', '.$ '].",
    )
    value_learning_rate: float | Auto = Field(
        "auto", description="Learning rate of the value model; auto = the policy's."
    )
    reward_scale: float = Field(
        1.0, ge=-1000.0, le=1000.0, description="R = reward * reward_scale + reward_offset."
    )
    reward_offset: float = Field(0.0, ge=-1000.0, le=1000.0, description="See reward_scale.")

    _ALPHA: ClassVar[dict[str, float]] = {"token": 0.01, "step": 0.1, "response": 0.3}

    def resolved_alpha(self) -> float:
        return self._ALPHA[self.variant] if self.alpha == "auto" else self.alpha

    def resolved_value_learning_rate(self, policy_lr: float) -> float:
        return policy_lr if self.value_learning_rate == "auto" else self.value_learning_rate

    @model_validator(mode="after")
    def _check_oreo(self) -> OREOHyperparameters:
        if isinstance(self.alpha, float) and self.alpha < 0:
            raise ValueError("alpha must be >= 0 or 'auto'")
        if isinstance(self.value_learning_rate, float) and not 0 < self.value_learning_rate <= 1:
            raise ValueError("value_learning_rate must be in (0, 1] or 'auto'")
        if not all(self.step_delimiters):
            raise ValueError("step_delimiters must not hold an empty string")
        return self


class OREOBlock(Strict):
    hyperparameters: OREOHyperparameters = Field(default_factory=OREOHyperparameters)


def response_of(row: Any) -> str:
    """A scored row's response: its ``response``, or the last turn of its ``messages``."""
    return row.response if hasattr(row, "response") else row.messages[-1].text()


def check_steps(
    responses: Iterable[tuple[int, str]], delimiters: Sequence[str], param: str
) -> None:
    """The step variant splits every response at ``delimiters``: the first (line,
    response) holding none of them is a ``JobError`` naming its line."""
    for line, response in responses:
        if not any(d in response for d in delimiters):
            raise JobError(
                "invalid_training_file",
                f"{param}: line {line}: the response has no step delimiter "
                f"({', '.join(repr(d) for d in delimiters)}); variant 'step' splits each "
                "response into steps at step_delimiters: add them, or use variant 'token'",
                param,
            )


class OREOMethod(MethodModel):
    """OREO: a policy and a value model from scored trajectories (prompt, response, reward)."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.scored,)
    algorithm: ClassVar[str] = "trainers.algorithms.oreo.method"

    type: Literal["oreo"]
    oreo: OREOBlock = Field(default_factory=OREOBlock)

    def scans_rows(self) -> bool:
        return self.hyperparameters.variant == "step"

    def divergence_hint(self) -> tuple[str, str]:
        hp = self.hyperparameters
        big = {"reward_scale": hp.reward_scale, "reward_offset": hp.reward_offset}
        field, value = max(big.items(), key=lambda kv: abs(kv[1]))
        if abs(value) <= BIG_REWARD_TRANSFORM:
            return super().divergence_hint()
        return (
            f"OREO's target is R = reward x {hp.reward_scale:g} + {hp.reward_offset:g}, and "
            f"the value loss is its square: {field} = {value:g} makes it explode. Keep R "
            f"within about +-{BIG_REWARD_TRANSFORM:g} (or lower the learning rate)",
            f"{self.param}.{field}",
        )

    def check_rows(self, rows: Iterable[tuple[int, Any]], param: str) -> None:
        responses = ((line, response_of(row)) for line, row in rows)
        check_steps(responses, self.hyperparameters.step_delimiters, param)
