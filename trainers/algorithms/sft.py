"""Supervised fine-tuning through TRL's ``SFTTrainer``.

TRL's own loss runs unchanged: ``SFTTrainer`` calls ``model(..., fused_lm_head=True)``
and ``PosttrainTrainerMixin`` has put posttrain's fused kernel behind that forward,
so the token loss ``-sum(log π(y_t)) / tokens``, the entropy and the token
accuracy come from the kernel without building logits.

Chat rows train on assistant turns only (``assistant_only_loss``; the chat
template must mark them with ``{% generation %}``, which the tiny model's does);
prompt/completion rows train on the completion only. ``loss_on_prompt`` turns
both off. Departures from OpenAI: ``weight`` on assistant turns is accepted but
not honoured (TRL has no per-turn weights), and the base learning rate is
posttrain's (2e-5 full, 2e-4 LoRA) times the multiplier.
"""

from __future__ import annotations

from typing import Any

from trl import SFTConfig, SFTTrainer

from trainers.base import PosttrainTrainerMixin
from trainers.data import build_dataset, read_rows, sft_record
from trainers.hparams import SupervisedHyperparameters
from trainers.plan import RunPlan
from trainers.rows import RowFormat
from trainers.runner import MethodDef, TrainData
from trainers.spec import SupervisedMethod


class PosttrainSFTTrainer(PosttrainTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer on posttrain's fused kernel (the mixin installs it)."""


def datasets(plan: RunPlan) -> TrainData:
    fmt, rows = read_rows(plan.training_path, SupervisedMethod.accepted_formats, "training_file")
    train = build_dataset([sft_record(fmt, r) for r in rows])
    evals = None
    if plan.validation_path:
        _, vrows = read_rows(plan.validation_path, (fmt,), "validation_file")
        evals = build_dataset([sft_record(fmt, r) for r in vrows])
    return TrainData(fmt, train, evals)


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
    datasets=datasets,
    config_fields=config_fields,
)
