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
disabled. Its log-probs are computed on the fly each step (no precompute pass). With ``packing``
auto/padding_free (the default) the policy's and the reference's fused forwards run the
batch's sequences as one packed row (``trainers.packing``; TRL 1.16's own
``padding_free`` is disabled for DPO): same sequences, same log-probs, no padding.

Data: every preference row shape (OpenAI's ``input``/``preferred_output``/
``non_preferred_output``, TRL's ``prompt``/``chosen``/``rejected``, implicit-prompt
``chosen``/``rejected`` conversations) becomes TRL's explicit-prompt example
(``record``); a file is all plain text, or all conversational if any row holds a
message list (a dataset column has one type). OpenAI ``tools`` on a row's ``input``
are not passed to the chat template.

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
from trainers.contract.methods.dpo import DPOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.records import all_text, as_messages, preference_triple
from trainers.runner import MethodDef, TrainData

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


def record(row: Any, conversational: bool | None = None) -> dict[str, Any]:
    """TRL's explicit-prompt preference example from any preference row shape.

    ``conversational=True`` turns plain-string fields into one user (prompt) or assistant
    (answer) turn; ``None`` keeps the row's own types."""
    prompt, chosen, rejected = preference_triple(row)
    if conversational is None:
        conversational = not all(isinstance(v, str) for v in (prompt, chosen, rejected))
    if not conversational:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": as_messages(prompt, "user"),
        "chosen": as_messages(chosen, "assistant"),
        "rejected": as_messages(rejected, "assistant"),
    }


def records(rows: list, hp: DPOHyperparameters | None = None, param: str = "") -> list:
    """``record`` for a whole file: all plain text, or all conversational if any row
    holds a message list."""
    rows = list(rows)
    mixed = [record(r) for r in rows]
    if all_text(mixed, ["prompt", "chosen"]):
        return mixed
    return [record(r, conversational=True) for r in rows]


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
    records=records,
    config_fields=config_fields,
)
