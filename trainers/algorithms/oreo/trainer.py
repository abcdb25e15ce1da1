"""OREO (Wang et al. 2024, arXiv 2412.16145) on transformers' Trainer: a policy and a value model.

TRL has no OREO trainer, so ``PosttrainOREOTrainer`` is ours; the math is
``trainers.core.oreo`` and the exact KL ``trainers.kernels.kl.token_kl`` (formulas and
worked example: ``docs/algorithms/oreo.md``). Models: the policy πθ (trainable), a frozen
reference πref (a reloaded copy of the base, or the policy with its LoRA adapter
disabled) and a SEPARATE value model V_φ = a copy of the base model's backbone + a
zero-initialised ``ValueHead``, with its own AdamW (betas 0.9/0.95, no weight decay,
grad-norm clip 1.0) and scheduler (the job's schedule and warmup). Per micro-batch
(``training_step``), as in the authors' loop:

1. no-grad: the policy's and the reference's token log-probs through the fused
   forward (``fused_lm_head=True``, no logits) → l_t = log πθ − log πref;
2. the critic's V at every state s_t (the last token of the prefix);
3. L_V (eq. 8), backward, clip, critic step + scheduler step;
4. the policy forward with gradients: L_π (eq. 9 / step / eq. 10 per ``variant``) with
   the PRE-update V of step 2 (detached) + α·KL; the Trainer backpropagates it and its
   optimizer steps the policy.

KL: the exact full-vocabulary KL(πθ‖πref) per response token. TRL's fused forward does
not return hidden states (it drops ``output_hidden_states``), so a forward hook on the
backbone captures its last hidden state during the SAME fused forward (DDP-safe: the
policy's head weight is a parameter of that forward); the reference's is captured the
same way in its no-grad forward. ``token_kl`` does not apply a logit scale or soft-cap:
for a model with either, the sampled k3 estimator is used instead (``kl_exact`` False).

Checkpoints: ``checkpoint-N/`` is the normal HF policy checkpoint (or LoRA adapter);
``checkpoint-N/value_model/`` holds the critic backbone (``save_pretrained``),
``value_head.safetensors`` and ``critic_state.pt`` (its optimizer and scheduler);
resuming restores both models and both optimizers.

Choices/departures: the value model is always a full copy of the base model (the paper
uses a LoRA critic on 7B); the critic steps once per micro-batch, so with gradient
accumulation its scheduler runs over max_steps × accumulation micro-steps; rows are
shuffled once with the job seed, then read in order (as BCO); dropout is off in the
policy and the critic. Logged per step: loss (L_π + α·KL), value_loss, policy_loss, kl,
residual_mean, value/start (mean V(s_0)), value/end (mean V at the last state).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from trainers.algorithms.oreo import data as oreo_data
from trainers.algorithms.oreo.value import CRITIC_STATE, VALUE_DIR, ValueModel
from trainers.algorithms.reference_trainer import ReferenceTrainer, disable_dropout
from trainers.algorithms.tokens import PadCollator, pad_id
from trainers.contract.methods.oreo import OREOHyperparameters
from trainers.core.oreo import get_oreo_variant, value_loss
from trainers.fused_head import unwrap_model
from trainers.kernels.kl import token_kl

OREO_METRICS = (
    "loss",
    "value_loss",
    "policy_loss",
    "kl",
    "residual_mean",
    "value/start",
    "value/end",
)


# The critic's AdamW: the paper's betas, no weight decay, grad-norm clip 1.0.
CRITIC_BETAS = (0.9, 0.95)
CRITIC_MAX_GRAD_NORM = 1.0


@contextlib.contextmanager
def capture_hidden(model: torch.nn.Module):
    """Yield a dict whose ``"h"`` is the backbone's last hidden state [B,L,H] after a forward."""
    box: dict[str, torch.Tensor] = {}

    def hook(module, args, out):
        box["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = unwrap_model(model).base_model.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _plain_head(model: torch.nn.Module) -> bool:
    """True when the LM head's logits are hidden @ W.T (+ b): no logit scale, no soft-cap."""
    cfg = unwrap_model(model).config.get_text_config()
    scale = [
        getattr(cfg, k, None) for k in ("logit_scale", "output_multiplier", "lm_head_multiplier")
    ]
    return (
        getattr(cfg, "final_logit_softcapping", None) is None
        and all(s in (None, 1, 1.0) for s in scale)
        and getattr(cfg, "logits_scaling", None) in (None, 1, 1.0)
    )


class PosttrainOREOTrainer(ReferenceTrainer):
    """OREO on posttrain's fused kernel; see the module docstring."""

    def __init__(self, *args, oreo: OREOHyperparameters, value_model: ValueModel, **kwargs):
        disable_dropout(value_model)
        self.oreo = oreo
        self.alpha = oreo.resolved_alpha()
        self.loss_fn = get_oreo_variant(oreo.variant)
        super().__init__(*args, **kwargs)
        self.kl_exact = _plain_head(self.model)
        self.value_model = value_model.to(self.args.device)
        self.critic_optimizer: torch.optim.Optimizer | None = None
        self.critic_scheduler = None
        self._critic_state: dict[str, Any] | None = None
        self._stash: dict[str, torch.Tensor] = {}

    def tokenizer_for(self, tokenizer):
        delimiters = tuple(self.oreo.step_delimiters)
        return functools.partial(
            oreo_data.tokenize_row, tokenizer, self.oreo.max_seq_length, delimiters
        )

    def collator_for(self, tokenizer) -> PadCollator:
        return PadCollator(
            pad_id(tokenizer), extra_pads={"step_ids": -1}, scalars={"reward": float}
        )

    # ------------------------------------------------------------------ models
    def _ensure_critic(self) -> None:
        if self.critic_optimizer is not None:
            return
        lr = self.oreo.resolved_value_learning_rate(self.args.learning_rate)
        params = [p for p in self.value_model.parameters() if p.requires_grad]
        self.critic_optimizer = torch.optim.AdamW(
            params, lr=lr, betas=CRITIC_BETAS, weight_decay=0.0
        )
        steps = max(self.state.max_steps, 1) * self.args.gradient_accumulation_steps
        self.critic_scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            self.critic_optimizer,
            num_warmup_steps=self.args.get_warmup_steps(steps),
            num_training_steps=steps,
        )
        if self._critic_state is not None:
            self.critic_optimizer.load_state_dict(self._critic_state["optimizer"])
            self.critic_scheduler.load_state_dict(self._critic_state["scheduler"])
            self._critic_state = None

    # ------------------------------------------------------------------ forwards
    def _forward(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp [B,L-1], mask [B,L-1], last hidden state [B,L-1,H]) through the fused forward."""
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        with capture_hidden(model) as box:
            out = self.token_logprobs(model, batch)
        return out.logp, out.mask, box["h"][:, :-1]

    def _values(self, inputs: dict) -> torch.Tensor:
        """V(s_t) [B,L-1]: V at position p scores the prefix ending at p, the state of label p+1."""
        return self.value_model(inputs["input_ids"], inputs["attention_mask"])[:, :-1]

    def _rewards(self, inputs: dict) -> torch.Tensor:
        return inputs["reward"].float() * self.oreo.reward_scale + self.oreo.reward_offset

    def _step_ids(self, inputs: dict) -> torch.Tensor | None:
        return inputs["step_ids"][:, 1:] if self.oreo.variant == "step" else None

    def _kl(self, model, hidden, ref_hidden, ref_model, mask, logratio) -> torch.Tensor:
        if not self.kl_exact:
            return torch.exp(-logratio) + logratio - 1
        head = unwrap_model(model).get_output_embeddings()
        ref_head = unwrap_model(ref_model).get_output_embeddings()
        kl = token_kl(
            hidden[mask],
            head.weight,
            ref_hidden[mask].detach(),
            ref_head.weight.detach(),
            bias=head.bias,
            ref_bias=None if ref_head.bias is None else ref_head.bias.detach(),
        )
        return torch.zeros(mask.shape, dtype=kl.dtype, device=kl.device).masked_scatter(mask, kl)

    # ------------------------------------------------------------------ the step
    def _critic_update(self, model, inputs: dict) -> None:
        """Steps 1-3 of the loop; stashes what step 4 needs (the pre-update V, the reference)."""
        self._ensure_critic()
        with torch.no_grad():
            logp, mask, _ = self._forward(model, inputs)
            with self._reference(model) as ref:
                ref_logp, _, ref_hidden = self._forward(ref, inputs)
        self.value_model.train()
        values = self._values(inputs)
        rewards, step_ids = self._rewards(inputs), self._step_ids(inputs)
        loss, metrics = value_loss(
            values, rewards, logp - ref_logp, mask, beta=self.oreo.beta, step_ids=step_ids
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), CRITIC_MAX_GRAD_NORM)
        self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.critic_scheduler.step()
        self._stash = {"values": values.detach(), "ref_logp": ref_logp, "ref_hidden": ref_hidden}
        self.record(
            "train", {"value_loss": metrics["value_loss"], **self._edge_values(values, mask)}
        )

    @staticmethod
    def _edge_values(values: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        v = values.detach().float()
        first = mask.long().argmax(-1)
        last = mask.shape[1] - 1 - mask.long().flip(-1).argmax(-1)
        rows = torch.arange(v.shape[0], device=v.device)
        return {"value/start": v[rows, first].mean(), "value/end": v[rows, last].mean()}

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._critic_update(model, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stash, self._stash = self._stash, {}
        logp, mask, hidden = self._forward(model, inputs)
        if stash:
            values, ref_logp, ref_hidden = stash["values"], stash["ref_logp"], stash["ref_hidden"]
            split = "train"
        else:  # evaluation: no critic update, V from the current critic
            split = "eval"
            with torch.no_grad():
                values = self._values(inputs)
                with self._reference(model) as ref:
                    ref_logp, _, ref_hidden = self._forward(ref, inputs)
        logratio = logp - ref_logp
        with self._reference(model) as ref:
            kl = self._kl(model, hidden, ref_hidden, ref, mask, logratio)
        loss, metrics = self.loss_fn(
            values,
            self._rewards(inputs),
            logratio,
            mask,
            beta=self.oreo.beta,
            alpha=self.alpha,
            kl=kl,
            step_ids=self._step_ids(inputs),
        )
        self.record(split, metrics)
        return (loss, {"metrics": metrics}) if return_outputs else loss

    # ------------------------------------------------------------------ checkpoints
    def save_extra(self, folder: Path) -> None:
        """The value model and the critic's optimizer and scheduler, in ``value_model/``."""
        self.value_model.save(folder / VALUE_DIR)
        if self.critic_optimizer is not None:
            torch.save(
                {
                    "optimizer": self.critic_optimizer.state_dict(),
                    "scheduler": self.critic_scheduler.state_dict(),
                },
                folder / VALUE_DIR / CRITIC_STATE,
            )

    def load_extra(self, folder: Path) -> None:
        folder = folder / VALUE_DIR
        if folder.is_dir():
            self.value_model.load_weights(folder)
            state = folder / CRITIC_STATE
            if state.is_file():
                self._critic_state = torch.load(state, weights_only=False)
            self.critic_optimizer = None
