"""Supervised fine-tuning through TRL's ``SFTTrainer``.

TRL's own loss runs unchanged: ``SFTTrainer`` calls ``model(..., fused_lm_head=True)``
and ``PosttrainTrainerMixin`` has put posttrain's fused kernel behind that forward,
so the token loss ``-sum(log π(y_t)) / tokens``, the entropy and the token
accuracy come from the kernel without building logits.

Chat rows train on assistant turns only (``assistant_only_loss``; the chat
template must mark them with ``{% generation %}``, which the tiny model's does);
prompt/completion rows train on the completion only. ``loss_on_prompt`` turns
both off. With ``packing`` auto/padding_free (the default) the runner makes the fused
forward run each padded batch as one packed row (``trainers.packing``): same rows, same
per-token losses, no compute on padding. Departures from OpenAI: ``weight`` on assistant
turns is accepted but not honoured (TRL has no per-turn weights), and the base learning
rate is posttrain's (2e-5 full, 2e-4 LoRA) times the multiplier.
"""

from __future__ import annotations

from typing import Any

from trl import SFTConfig, SFTTrainer

from trainers.base import PosttrainTrainerMixin
from trainers.contract.methods.sft import SupervisedHyperparameters
from trainers.contract.plan import RunPlan
from trainers.contract.rows import ChatRow, RowFormat
from trainers.records import messages, text_or_messages
from trainers.runner import MethodDef, TrainData


class PosttrainSFTTrainer(PosttrainTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer on posttrain's fused kernel (the mixin installs it)."""


def record(row: Any) -> dict[str, Any]:
    """A chat row as TRL's ``messages``; a prompt/completion row as TRL's pair."""
    if isinstance(row, ChatRow):
        return {"messages": messages(row.messages)}
    return {"prompt": text_or_messages(row.prompt), "completion": text_or_messages(row.completion)}


def records(rows: list, hp: SupervisedHyperparameters | None = None, param: str = "") -> list:
    return [record(r) for r in rows]


def config_fields(plan: RunPlan, hp: SupervisedHyperparameters, data: TrainData) -> dict[str, Any]:
    return {
        "max_length": hp.max_seq_length,
        "assistant_only_loss": data.format == RowFormat.chat and not hp.loss_on_prompt,
        "completion_only_loss": data.format == RowFormat.prompt_completion
        and not hp.loss_on_prompt,
    }


METHOD = MethodDef(
    name="supervised",
    config_class=SFTConfig,
    trainer_class=PosttrainSFTTrainer,
    records=records,
    config_fields=config_fields,
)
