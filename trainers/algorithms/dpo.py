"""Direct preference optimisation through TRL's ``DPOTrainer``.

TRL's own loss runs unchanged. ``DPOTrainer`` scores the chosen and the rejected
answer of every pair in one concatenated batch with ``model(..., fused_lm_head=True)``
(per-token log-probs without ``[tokens x vocab]`` logits), and
``PosttrainTrainerMixin`` puts posttrain's fused kernel behind that forward. With
``loss_type: ["sigmoid"]`` the loss is the paper's
``-log σ(β·[(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])``,
summed log-probs over answer tokens, averaged over pairs.

The reference model π_ref is what TRL 1.16 builds when ``ref_model`` is None:
for full training a second, frozen copy of the base model, loaded again from the
job's model path (so a resumed run compares against the base, not against the
checkpoint it resumes); for LoRA no copy at all, the policy with its adapter
disabled. Its log-probs are computed on the fly each step (no precompute pass).

Data: every preference row shape (OpenAI's ``input``/``preferred_output``/
``non_preferred_output``, TRL's ``prompt``/``chosen``/``rejected``, implicit-prompt
``chosen``/``rejected`` conversations) becomes TRL's explicit-prompt example
(``trainers.data.dpo_record``). OpenAI ``tools`` on a row's ``input`` are not
passed to the chat template.

Departures from OpenAI/TRL:

* TRL 1.16 has no ``rpo_alpha``: RPO (DPO plus an NLL term on the chosen answer)
  is ``loss_type: ["sigmoid", "sft"]`` with ``loss_weights: [1.0, alpha]``.
* The base learning rate is 1e-6 full (TRL's default) / 5e-6 LoRA, times
  ``learning_rate_multiplier`` (OpenAI does not publish its own).
* ``trained_tokens`` counts every non-padding token the policy forward sees:
  prompt + chosen and prompt + rejected, so a prompt counts twice per pair.
"""

from __future__ import annotations

from typing import Any

from trl import DPOConfig, DPOTrainer

from trainers.base import PosttrainTrainerMixin
from trainers.data import build_dataset, dpo_records, read_rows
from trainers.hparams import DPOHyperparameters
from trainers.plan import RunPlan
from trainers.runner import MethodDef, TrainData
from trainers.spec import DPOMethod

# TRL keys (as logged per step, and with ``eval_`` at validation) that a DPO run reports.
DPO_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "entropy",
)


class PosttrainDPOTrainer(PosttrainTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer on posttrain's fused kernel (the mixin installs it)."""


def datasets(plan: RunPlan) -> TrainData:
    fmt, rows = read_rows(plan.training_path, DPOMethod.accepted_formats, "training_file")
    train = build_dataset(dpo_records(rows))
    evals = None
    if plan.validation_path:
        _, vrows = read_rows(plan.validation_path, (fmt,), "validation_file")
        evals = build_dataset(dpo_records(vrows))
    return TrainData(fmt, train, evals)


def config_fields(plan: RunPlan, hp: DPOHyperparameters, data: TrainData) -> dict[str, Any]:
    types = hp.loss_types()  # exo_pair without label_smoothing is refused by the spec
    return {
        "max_length": hp.max_seq_length,
        "beta": hp.resolved_beta(),
        "loss_type": types,
        "loss_weights": list(hp.loss_weights) if hp.loss_weights else [1.0] * len(types),
        "label_smoothing": hp.label_smoothing,
    }


METHOD = MethodDef(
    name="dpo",
    config_class=DPOConfig,
    trainer_class=PosttrainDPOTrainer,
    datasets=datasets,
    config_fields=config_fields,
)
