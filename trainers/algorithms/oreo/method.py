"""OREO as a method: its rows, its config fields and its trainer's arguments.

Rows are scored trajectories: ``prompt``/``response``/``reward``, or ``messages``
whose last turn is the response. A message prompt stays a message list (the chat
template is applied at tokenisation); if any prompt is a message list, every plain
prompt becomes a user turn. With the ``step`` variant every response must hold a step
delimiter (the API checks this at creation; a file changed since is refused here, with
the same message). The training rows are shuffled once with the job seed.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from trainers.algorithms.oreo.trainer import PosttrainOREOTrainer
from trainers.algorithms.oreo.value import ValueModel
from trainers.algorithms.reference_trainer import reference_kwargs
from trainers.contract.methods.oreo import OREOHyperparameters, check_steps
from trainers.contract.plan import RunPlan
from trainers.contract.rows import ScoredChatRow
from trainers.records import as_messages
from trainers.runner import MethodDef, TrainData


def _split(row: Any) -> tuple[Any, str, float]:
    """(prompt, response text, reward): a ``messages`` row's last turn is its response."""
    if isinstance(row, ScoredChatRow):
        return row.messages[:-1], row.messages[-1].text(), row.reward
    return row.prompt, row.response, row.reward


def records(
    rows: list, hp: OREOHyperparameters | None = None, param: str = "training_file"
) -> list[dict[str, Any]]:
    """OREO's ``prompt``/``response``/``reward`` trajectories (see the module docstring)."""
    split = [_split(r) for r in rows]
    if hp is not None and hp.variant == "step":
        responses = ((line, response) for line, (_, response, _) in enumerate(split, start=1))
        check_steps(responses, hp.step_delimiters, param)
    text = all(isinstance(prompt, str) for prompt, _, _ in split)
    return [
        {
            "prompt": prompt if text else as_messages(prompt, "user"),
            "response": response,
            "reward": float(reward),
        }
        for prompt, response, reward in split
    ]


def config_fields(plan: RunPlan, hp: OREOHyperparameters, data: TrainData) -> dict[str, Any]:
    # the paper's Adam: betas (0.9, 0.95), grad-norm clip 1.0 (TrainingArguments' default)
    return {"remove_unused_columns": False, "adam_beta2": 0.95}


def trainer_kwargs(plan: RunPlan, model, data: TrainData) -> dict[str, Any]:
    from trainers.models import load_causal_lm

    return {
        "oreo": plan.spec.method_hyperparameters(),
        # the base model's backbone; a resumed run loads the checkpoint's weights into it
        "value_model": ValueModel.from_causal_lm(load_causal_lm(plan.spec.model)),
        **reference_kwargs(plan),
    }


METHOD = MethodDef(
    name="oreo",
    config_class=TrainingArguments,
    trainer_class=PosttrainOREOTrainer,
    records=records,
    config_fields=config_fields,
    trainer_kwargs=trainer_kwargs,
    shuffle=True,
)
