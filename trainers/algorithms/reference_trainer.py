"""The base of posttrain's own trainers that score a policy against a frozen reference.

BCO and OREO are not in TRL, so they run on ``transformers.Trainer``. Both need the
same set-up, which lives here once: LoRA via peft (the reference is then the policy
with its adapter disabled) or a frozen reference copy for full training, with
posttrain's fused head installed on it; dropout off in the trained models (as TRL's
preference trainers do); the records tokenised by the method's ``tokenize(row, index)``
(which replaces a record's columns, or adds to them with ``keeps_columns``); the data
read in the order it was shuffled to by the method's row mapping; and a loss that is a
batch mean, scaled for accumulation by the Trainer rather than by ``num_items_in_batch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

from trainers.base import PosttrainTrainerMixin
from trainers.fused_head import install_fused_head


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def tokenized(dataset, tokenize: Callable[[dict, int], dict], keep_columns: bool):
    """``dataset`` mapped through ``tokenize(row, index)``; None stays None."""
    if dataset is None:
        return None
    return dataset.map(
        tokenize, with_indices=True, remove_columns=None if keep_columns else dataset.column_names
    )


class ReferenceTrainer(PosttrainTrainerMixin, Trainer):
    """A policy trained against a frozen reference; subclasses add the loss."""

    keeps_columns: ClassVar[bool] = False  # tokenize adds to a record instead of replacing it

    def __init__(
        self,
        model,
        args: TrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenize: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
        ref_model: torch.nn.Module | None = None,
        peft_config=None,
        **kwargs,
    ):
        if tokenize is not None:
            train_dataset = tokenized(train_dataset, tokenize, self.keeps_columns)
            eval_dataset = tokenized(eval_dataset, tokenize, self.keeps_columns)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
        elif ref_model is None:
            raise ValueError("full training needs a frozen ref_model (a copy of the base model)")
        disable_dropout(model)
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs
        )
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean: scale by accumulation
        self.ref_model = ref_model
        if ref_model is not None:
            install_fused_head(ref_model)
            ref_model.eval().requires_grad_(False).to(self.args.device)

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    @contextlib.contextmanager
    def _reference(self, model):
        """Yield the reference model: the frozen copy, or the policy with its adapter off."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        peft_model = self.accelerator.unwrap_model(model)
        with peft_model.disable_adapter():
            yield peft_model


def reference_kwargs(plan) -> dict[str, Any]:
    """The trainer argument for the reference model of ``plan``: for full training a frozen
    copy of the base model, loaded again from the job's model path (so a resumed run still
    compares against the base, not the checkpoint it resumes); for LoRA none (the policy
    with its adapter disabled)."""
    if plan.spec.training_type == "lora":
        return {}
    from trainers.models import load_causal_lm

    return {"ref_model": load_causal_lm(plan.spec.model)}
