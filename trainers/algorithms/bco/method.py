"""BCO as a method: its rows, its config fields and its trainer's arguments.

Rows: OpenAI's and TRL's unpaired rows (``prompt``/``completion``/``label``) as they
are, and every preference row split in two: a thumbs-up row (its chosen answer)
followed by a thumbs-down row (its rejected answer), with the same prompt. The file
becomes all plain text, or all messages if any field of any row is a message list (a
plain prompt is then a user turn, a plain completion an assistant turn). The training
rows are shuffled once with the job seed; the trainer then reads them in order.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from trainers.algorithms.bco.trainer import PosttrainBCOTrainer
from trainers.algorithms.reference_trainer import reference_kwargs
from trainers.contract.methods.bco import BCOHyperparameters
from trainers.contract.plan import RunPlan
from trainers.contract.rows import OpenAIUnpairedRow, UnpairedPreferenceRow
from trainers.records import all_text, as_messages, preference_triple
from trainers.runner import MethodDef, TrainData


def _unpaired(row: Any) -> list[dict[str, Any]]:
    """One unpaired row -> [it]; one preference row -> [thumbs-up, thumbs-down]."""
    if isinstance(row, OpenAIUnpairedRow):
        return [{"prompt": row.input.messages, "completion": row.output, "label": row.label}]
    if isinstance(row, UnpairedPreferenceRow):
        return [{"prompt": row.prompt, "completion": row.completion, "label": row.label}]
    prompt, chosen, rejected = preference_triple(row)
    return [
        {"prompt": prompt, "completion": chosen, "label": True},
        {"prompt": prompt, "completion": rejected, "label": False},
    ]


def records(rows: list, hp: BCOHyperparameters | None = None, param: str = "") -> list[dict]:
    """BCO's ``prompt``/``completion``/``label`` records (see the module docstring)."""
    out = [rec for row in rows for rec in _unpaired(row)]
    if all_text(out, ["prompt", "completion"]):
        return out
    return [
        {
            "prompt": as_messages(r["prompt"], "user"),
            "completion": as_messages(r["completion"], "assistant"),
            "label": r["label"],
        }
        for r in out
    ]


def config_fields(plan: RunPlan, hp: BCOHyperparameters, data: TrainData) -> dict[str, Any]:
    return {"remove_unused_columns": False}


def trainer_kwargs(plan: RunPlan, model, data: TrainData) -> dict[str, Any]:
    return {"bco": plan.spec.method_hyperparameters(), **reference_kwargs(plan)}


METHOD = MethodDef(
    name="bco",
    config_class=TrainingArguments,
    trainer_class=PosttrainBCOTrainer,
    records=records,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
    shuffle=True,
)
