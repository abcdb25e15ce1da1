"""Supervised fine-tuning through TRL's ``SFTTrainer``.

The token loss comes from posttrain's fused kernel (``PosttrainSFTTrainer``):
``-sum(log π(y_t)) / tokens`` over the trained positions, computed from the last
hidden state and the LM head weight without building logits. Entropy and token
accuracy are logged like TRL does.

Chat rows train on assistant turns only (``assistant_only_loss``; the chat
template must mark them with ``{% generation %}``, which the tiny model's does);
prompt/completion rows train on the completion only. ``loss_on_prompt`` turns
both off. Departures from OpenAI: ``weight`` on assistant turns is accepted but
not honoured (TRL has no per-turn weights), and the base learning rate is
posttrain's (2e-5 full, 2e-4 LoRA) times the multiplier.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from trainers.base import PosttrainTrainerMixin
from trainers.callbacks import ReportingCallback
from trainers.checkpoints import resumable_checkpoint
from trainers.data import build_dataset, read_rows, sft_record
from trainers.formats import RowFormat
from trainers.models import load_causal_lm, load_tokenizer, lora_config, pick_device_dtype
from trainers.plan import RunPlan
from trainers.reporting import PauseRequest, Reporter
from trainers.spec import SupervisedHyperparameters, SupervisedMethod


class PosttrainSFTTrainer(PosttrainTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with the token loss from posttrain's fused kernel."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        res = self.token_logprobs(model, inputs, return_entropy=True)
        n_valid = res.mask.sum()
        denom = n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -res.logp.sum() / torch.as_tensor(denom).to(res.logp.device)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._log_token_metrics(mode, inputs, res, n_valid)
        return (loss, None) if return_outputs else loss

    def _log_token_metrics(self, mode, inputs, res, n_valid) -> None:
        gather = self.accelerator.gather_for_metrics
        total = gather(n_valid).sum()
        ent = gather(res.entropy.detach().sum()).sum()
        hits = gather(res.top1.sum()).sum()
        self._metrics[mode]["entropy"].append((ent / total).item() if total > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(
            (hits / total).item() if total > 0 else 0.0
        )
        if mode == "train":
            seen = inputs.get("attention_mask", inputs["input_ids"])
            self._total_train_tokens += gather((seen != 0).sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _datasets(plan: RunPlan) -> tuple[RowFormat, Any, Any]:
    fmt, rows = read_rows(plan.training_path, SupervisedMethod.accepted_formats, "training_file")
    train = build_dataset([sft_record(f, r) for f, r in rows])
    evals = None
    if plan.validation_path:
        _, vrows = read_rows(plan.validation_path, {fmt}, "validation_file")
        evals = build_dataset([sft_record(f, r) for f, r in vrows])
    return fmt, train, evals


def sft_config(
    plan: RunPlan, hp: SupervisedHyperparameters, fmt: RowFormat, rows: int, has_eval: bool
):
    from trl import SFTConfig

    device, dtype = pick_device_dtype()
    spec, every = plan.spec, plan.checkpoint_every_steps
    return SFTConfig(
        output_dir=str(plan.output_dir),
        seed=spec.seed,
        data_seed=spec.seed,
        num_train_epochs=hp.resolved_epochs(),
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.resolved_batch_size(rows),
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.resolved_learning_rate(spec.training_type == "lora"),
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        max_length=hp.max_seq_length,
        assistant_only_loss=fmt == RowFormat.chat and not hp.loss_on_prompt,
        completion_only_loss=fmt == RowFormat.prompt_completion and not hp.loss_on_prompt,
        logging_steps=1,
        save_strategy="steps",
        save_steps=every,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=every if has_eval else None,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=str(dtype) == "torch.bfloat16",
        gradient_checkpointing=device == "cuda",
        dataloader_num_workers=0,
    )


def train(plan: RunPlan, reporter: Reporter, pause: PauseRequest | None = None) -> dict[str, Any]:
    spec = plan.spec
    hp = spec.method.supervised.hyperparameters
    tokenizer = load_tokenizer(spec.model)
    fmt, train_ds, eval_ds = _datasets(plan)
    reporter.event(
        f"Loaded {len(train_ds)} training rows ({fmt} format)"
        + (f" and {len(eval_ds)} validation rows" if eval_ds is not None else "")
    )
    model = load_causal_lm(spec.model)
    callback = ReportingCallback(plan, reporter, pause)
    trainer = PosttrainSFTTrainer(
        model=model,
        args=sft_config(plan, hp, fmt, len(train_ds), eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(spec.lora) if spec.training_type == "lora" else None,
        callbacks=[callback],
    )
    resume = resumable_checkpoint(plan.output_dir)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final = plan.output_dir / f"checkpoint-{trainer.state.global_step}"
    return {
        "trained_tokens": callback.trained_tokens,
        "checkpoint": plan.relative(final),
        "paused": callback.paused_at is not None,
    }
