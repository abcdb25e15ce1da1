"""OpenAI's reinforcement fine-tuning method, run as GRPO with the request's one grader.

Its hyperparameters are OpenAI's (``compute_multiplier``, ``reasoning_effort``) on top
of every GRPO field; ``variant`` (an extension) picks the GRPO preset. The torch side is
GRPO's (``trainers/algorithms/grpo/``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from trainers.contract.graders.spec import Grader
from trainers.contract.hparams import Auto
from trainers.contract.methods.grpo import (
    GradedBlock,
    GradedMethod,
    GRPOHyperparameters,
    GRPOVariant,
)


class ReinforcementHyperparameters(GRPOHyperparameters):
    """OpenAI's reinforcement fine-tuning hyperparameters, run as GRPO (every GRPO field is
    accepted too). ``compute_multiplier`` scales the completions sampled per prompt;
    ``reasoning_effort`` is passed to the chat template (templates that ignore it, ignore
    it); ``eval_interval``/``eval_samples`` are GRPO's own."""

    compute_multiplier: float | Auto = Field(
        "auto", description="Scales num_generations (rounded, at least 2); auto = 1.0."
    )
    reasoning_effort: Literal["auto", "default", "low", "medium", "high"] = Field(
        "auto", description="Passed to the chat template as reasoning_effort; auto = not passed."
    )

    def chat_template_kwargs(self) -> dict[str, Any] | None:
        effort = self.reasoning_effort
        return None if effort == "auto" else {"reasoning_effort": effort}

    def generations(self) -> int:
        mult = 1.0 if self.compute_multiplier == "auto" else self.compute_multiplier
        return max(2, round(self.num_generations * mult))

    @model_validator(mode="before")
    @classmethod
    def _positive_multiplier(cls, data: Any) -> Any:
        mult = data.get("compute_multiplier") if isinstance(data, dict) else None
        if isinstance(mult, (int, float)) and not isinstance(mult, bool) and not mult > 0:
            raise ValueError("compute_multiplier must be > 0 or 'auto'")
        return data


class ReinforcementBlock(GradedBlock):
    """OpenAI's reinforcement method: one grader and its hyperparameters (plus GRPO's)."""

    grader: Grader
    hyperparameters: ReinforcementHyperparameters = Field(
        default_factory=ReinforcementHyperparameters
    )
    variant: GRPOVariant = Field("grpo", description="Extension: the GRPO preset to run.")

    def grader_list(self) -> list:
        return [self.grader]

    def graders_with_params(self, base: str) -> list[tuple[Any, str]]:
        return [(self.grader, f"{base}.grader")]

    def with_graders(self, graders: list) -> dict[str, Any]:
        return {"grader": graders[0]}


class ReinforcementMethod(GradedMethod):
    """OpenAI's reinforcement fine-tuning, run as GRPO with the request's grader."""

    type: Literal["reinforcement"]
    reinforcement: ReinforcementBlock
