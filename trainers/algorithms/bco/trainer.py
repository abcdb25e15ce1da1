"""Binary Classifier Optimization (Jung et al. 2024, arXiv 2404.04656) on transformers' Trainer.

TRL 1.16 has no BCO trainer (it was removed), so ``PosttrainBCOTrainer`` is ours;
the math is ``trainers.core.bco`` (formulas and worked example: ``docs/algorithms/bco.md``).
Each step, for a batch of (prompt, completion, thumbs-up label) rows:

1. lpθ and lpref: summed completion log-probs through the model's fused forward
   (``model(..., labels=..., fused_lm_head=True)``, posttrain's kernel, no logits);
   the reference under no-grad: a frozen copy of the base model (full training) or
   the policy with its LoRA adapter disabled.
2. r = β(lpθ − lpref); δ = running mean of every r (training updates it first, with
   the batch's rewards all-reduced across ranks; eval only reads it).
3. ℓ = −logσ(r−δ) (thumbs-up), −logσ(−(r−δ))·w(x) (thumbs-down); loss = mean.

UDM (``udm: true``): before the first step, prompts sampled from each class are
embedded (default: the reference's mean-pooled last hidden state; or a local
``udm_embedding_model``), a logistic-regression classifier is fitted once with 10%
held out, and every row's weight w(x) is precomputed from it (the reference and
the classifier are frozen, so it never changes). δ and the classifier are saved
with each checkpoint (``posttrain_bco_state.json``) and loaded on resume, not refitted.

Choices where TRL and the paper are silent or that depart from them:
- Paired rows are split into a thumbs-up and a thumbs-down row; the training rows
  are shuffled once with the job seed, then read in order (TRL: unshuffled,
  SequentialSampler) [our choice].
- Dropout is disabled in the policy (TRL's ``disable_dropout=True``), LoRA's too.
- ``trained_tokens`` counts prompt + completion tokens of every row the policy sees.
- Logged per step: loss, delta, rewards/chosen, rewards/rejected (count-weighted
  over the step's batches), rewards/margins = chosen − rejected, and with UDM
  udm/classifier_holdout_accuracy, udm_weight/min, udm_weight/max.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from trainers.algorithms.bco import data as bco_data
from trainers.algorithms.reference_trainer import ReferenceTrainer
from trainers.algorithms.tokens import PadCollator, pad_id
from trainers.contract.methods.bco import BCOHyperparameters
from trainers.core.bco import (
    PromptClassifier,
    RunningRewardMean,
    bco_loss,
    density_ratio_weights,
    sample_prompts,
)

STATE_FILE = "posttrain_bco_state.json"
# What a BCO step logs (with ``eval_`` at validation).
BCO_METRICS = ("loss", "delta", "rewards/chosen", "rewards/rejected", "rewards/margins")


UDM_HOLDOUT_FRACTION = 0.1  # rows of the UDM classifier's sample held out to score it


class PosttrainBCOTrainer(ReferenceTrainer):
    """BCO on posttrain's fused kernel; see the module docstring."""

    def __init__(self, *args, bco: BCOHyperparameters, **kwargs):
        self.bco = bco
        self.beta = bco.resolved_beta()
        self.running = RunningRewardMean(balanced=bco.balanced_delta)
        self.classifier: PromptClassifier | None = PromptClassifier() if bco.udm else None
        self._udm_weights: dict[str, torch.Tensor] = {}
        self._saved_classifier: dict[str, Any] | None = None  # a resumed run's classifier
        self._step_metrics: dict[str, dict[str, list[tuple[float, float]]]] = {
            "train": {},
            "eval": {},
        }
        super().__init__(*args, **kwargs)

    def tokenizer_for(self, tokenizer):
        return functools.partial(bco_data.tokenize_row, tokenizer, self.bco.max_seq_length)

    def collator_for(self, tokenizer) -> PadCollator:
        return PadCollator(pad_id(tokenizer), scalars={"label": bool, "row_index": int})

    # ------------------------------------------------------------------ UDM
    def _fit_or_load_udm(self, saved: dict[str, Any] | None) -> None:
        if self.classifier is None:
            return
        if saved is not None:
            self.classifier.load_state_dict(saved)
        else:
            self._fit_classifier()
        for split in ("train", "eval"):
            data = self.train_dataset if split == "train" else self.eval_dataset
            if data is not None:
                p = self.classifier.predict_proba(self._embed(split, list(range(len(data)))))
                self._udm_weights[split] = density_ratio_weights(
                    p,
                    min_ratio=self.bco.udm_min_density_ratio,
                    max_ratio=self.bco.udm_max_density_ratio,
                )

    def _fit_classifier(self) -> None:
        labels = self.train_dataset["label"]
        pos = [i for i, lab in enumerate(labels) if lab]
        neg = [i for i, lab in enumerate(labels) if not lab]
        picked, y = sample_prompts(pos, neg, self.bco.udm_prompt_sample_size, self.args.seed)
        emb = self._embed("train", picked)
        self.classifier.fit(emb, y, holdout_fraction=UDM_HOLDOUT_FRACTION, seed=self.args.seed)

    def _embed(self, split: str, indices: list[int]) -> torch.Tensor:
        if self.bco.udm_embedding_model:
            raw = self.raw_datasets[split]
            return bco_data.external_prompt_embeddings(
                self.bco.udm_embedding_model, [raw[i]["prompt"] for i in indices]
            )
        data = self.train_dataset if split == "train" else self.eval_dataset
        pad = self.data_collator.pad
        with self._reference(self.model) as ref:
            return bco_data.reference_prompt_embeddings(ref, data, indices, pad)

    # ------------------------------------------------------------------ loss
    def _completion_logps(self, model, inputs: dict) -> torch.Tensor:
        """[B] summed log-probs of the label tokens, through the fused forward."""
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        out = self.token_logprobs(model, batch)
        return (out.logp * out.mask).sum(-1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        policy = self._completion_logps(model, inputs)
        with torch.no_grad(), self._reference(model) as ref:
            reference = self._completion_logps(ref, inputs)
        labels = inputs["label"].bool()
        if training:
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda t: self.accelerator.reduce(t, "sum")  # noqa: E731
            delta = self.running.update(
                self.beta * (policy.detach() - reference), labels, all_reduce=reduce
            )
        else:
            delta = self.running.delta
        split = "train" if training else "eval"
        weights = None
        if self.classifier is not None:
            weights = self._udm_weights[split].to(policy.device)[inputs["row_index"]]
        loss, metrics = bco_loss(policy, reference, labels, delta, beta=self.beta, weights=weights)
        self.record(split, metrics)
        return (loss, {"rewards": metrics}) if return_outputs else loss

    # ------------------------------------------------------------------ metrics
    def record(self, split: str, metrics: dict[str, torch.Tensor]) -> None:
        """Rewards weighted by their class's row count; UDM weights only from rows with
        thumbs-down rows; the counts themselves are not logged."""
        store = self._step_metrics[split]
        n_pos, n_neg = float(metrics["count/chosen"]), float(metrics["count/rejected"])
        weights = {"rewards/chosen": n_pos, "rewards/rejected": n_neg}
        for key, value in metrics.items():
            if key.startswith("count/") or key == "udm_weight/mean":
                continue
            if key.startswith("udm_weight/") and n_neg == 0:
                continue
            store.setdefault(key, []).append((float(value), weights.get(key, 1.0)))

    def step_metrics(self, split: str) -> dict[str, float]:
        store, out = self._step_metrics[split], {}
        for key, pairs in store.items():
            if key == "udm_weight/min":
                out[key] = min(v for v, _ in pairs)
            elif key == "udm_weight/max":
                out[key] = max(v for v, _ in pairs)
            elif key == "delta":
                out[key] = pairs[-1][0]
            else:
                total = sum(w for _, w in pairs)
                if total > 0:
                    out[key] = sum(v * w for v, w in pairs) / total
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if self.classifier is not None and "holdout_accuracy" in self.classifier.report:
            out["udm/classifier_holdout_accuracy"] = self.classifier.report["holdout_accuracy"]
        store.clear()
        return out

    # ------------------------------------------------------------------ checkpoints
    state_file = STATE_FILE

    def extra_state(self) -> dict[str, Any]:
        return {
            "running": self.running.state_dict(),
            "classifier": self.classifier.state_dict() if self.classifier else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.running.load_state_dict(state["running"])
        self._saved_classifier = state.get("classifier")

    def on_train_start(self) -> None:
        """Fit the UDM classifier once, or take the resumed checkpoint's."""
        self._fit_or_load_udm(self._saved_classifier)
