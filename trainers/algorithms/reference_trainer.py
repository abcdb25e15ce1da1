"""The base of posttrain's own trainers that score a policy against a frozen reference.

BCO and OREO are not in TRL, so they run on ``transformers.Trainer``. Both need the
same set-up, which lives here once: LoRA via peft (the reference is then the policy
with its adapter disabled) or a frozen reference copy for full training, with
posttrain's fused head installed on it; dropout off in the trained models (as TRL's
preference trainers do); the records tokenised by the subclass's ``tokenizer_for(tok)``
(a ``(row, index) -> dict`` that replaces a record's columns, or adds to them with
``keeps_columns``; the untokenised datasets stay in ``raw_datasets``) and batched by its
``collator_for(tok)``; the data
read in the order it was shuffled to by the method's row mapping; a loss that is a
batch mean, scaled for accumulation by the Trainer rather than by ``num_items_in_batch``;
an evaluation step that is the loss under no-grad; and the step metrics a loss records
(``record``) averaged into the Trainer's logs of that step or evaluation (``step_metrics``).
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
        processing_class=None,
        *,
        ref_model: torch.nn.Module | None = None,
        peft_config=None,
        **kwargs,
    ):
        self.raw_datasets = {"train": train_dataset, "eval": eval_dataset}
        tokenize = self.tokenizer_for(processing_class)
        if tokenize is not None:
            train_dataset = tokenized(train_dataset, tokenize, self.keeps_columns)
            eval_dataset = tokenized(eval_dataset, tokenize, self.keeps_columns)
        collator = self.collator_for(processing_class)
        if collator is not None:
            kwargs.setdefault("data_collator", collator)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
        elif ref_model is None:
            raise ValueError("full training needs a frozen ref_model (a copy of the base model)")
        disable_dropout(model)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean: scale by accumulation
        self._metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self.ref_model = ref_model
        if ref_model is not None:
            install_fused_head(ref_model)
            ref_model.eval().requires_grad_(False).to(self.args.device)

    # ------------------------------------------------------------------ data
    def tokenizer_for(self, tokenizer) -> Callable[[dict[str, Any], int], dict] | None:
        """The method's ``(row, index) -> dict`` tokenisation (None: datasets as given)."""
        return None

    def collator_for(self, tokenizer) -> Any:
        """The method's batch collator (None: the Trainer's default)."""
        return None

    # ------------------------------------------------------------------ metrics
    def record(self, split: str, metrics: dict[str, Any]) -> None:
        """Keep a micro-batch's metrics until the step (or evaluation) is logged."""
        for key, value in metrics.items():
            self._metrics[split].setdefault(key, []).append(float(value))

    def step_metrics(self, split: str) -> dict[str, float]:
        """The recorded metrics of ``split`` since the last log, averaged, then forgotten."""
        store = self._metrics[split]
        out = {k: sum(v) / len(v) for k, v in store.items() if v}
        store.clear()
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self.step_metrics("train")}
        elif "eval_loss" in logs:
            logs = {**logs, **{f"eval_{k}": v for k, v in self.step_metrics("eval").items()}}
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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
