"""Supervised fine-tuning: the request block and hyperparameters (torch side:
``trainers/algorithms/sft/``; formulas: ``docs/algorithms/sft.md``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from trainers.contract.hparams import PackedHyperparameters, Strict
from trainers.contract.methods.base import MethodModel
from trainers.contract.rows import RowFormat


class SupervisedHyperparameters(PackedHyperparameters):
    """SFT. Base learning rate 2e-5 (full) / 2e-4 (LoRA), common choices for SFT."""

    loss_on_prompt: bool = Field(
        False, description="Train on prompt/user tokens too; default trains on completions only."
    )


class SupervisedBlock(Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class SupervisedMethod(MethodModel):
    """Supervised fine-tuning with TRL's SFTTrainer (``type`` alias: ``sft``)."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (
        RowFormat.chat,
        RowFormat.prompt_completion,
    )
    algorithm: ClassVar[str] = "trainers.algorithms.sft.method"
    aliases: ClassVar[tuple[str, ...]] = ("sft",)

    type: Literal["supervised"]
    supervised: SupervisedBlock = Field(default_factory=SupervisedBlock)
