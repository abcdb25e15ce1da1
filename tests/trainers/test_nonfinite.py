"""NonFiniteCallback on transformers' own TrainerState/TrainerControl: it trips on the
first non-finite training loss or gradient norm, and refuses a save of non-finite weights."""

from __future__ import annotations

import torch
from transformers import TrainerControl, TrainerState

from trainers.callbacks import NonFiniteCallback


def _step(cb, logs, step=5, save=False, model=None):
    state, control = TrainerState(global_step=step), TrainerControl(should_save=save)
    cb.on_log(None, state, control, logs=logs, model=model)
    return control


def test_finite_steps_pass_and_eval_metrics_are_not_training_signals():
    cb = NonFiniteCallback()
    control = _step(cb, {"loss": 1.0, "grad_norm": 0.5}, save=True, model=torch.nn.Linear(2, 2))
    assert control.should_save and not control.should_training_stop
    _step(cb, {"eval_loss": float("nan")})
    assert cb.step is None


def test_a_nan_grad_norm_stops_the_run_without_saving_that_step():
    cb = NonFiniteCallback()
    control = _step(cb, {"loss": 2.0, "grad_norm": float("nan")}, step=7, save=True)
    assert control.should_training_stop and not control.should_save
    assert cb.step == 7 and "grad_norm=nan" in cb.what
    later = TrainerControl(should_save=True)
    cb.on_step_end(None, TrainerState(global_step=8), later)
    assert not later.should_save and cb.step == 7  # the first bad step is the one named


def test_non_finite_weights_are_never_saved_even_with_a_finite_loss():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    cb = NonFiniteCallback()
    control = _step(cb, {"loss": 1.0, "grad_norm": 1.0}, step=3, save=True, model=model)
    assert not control.should_save and control.should_training_stop
    assert cb.what == "non-finite weights"
    model.weight.requires_grad_(False)  # a frozen base (LoRA) is not the run's to check
    control = _step(NonFiniteCallback(), {"loss": 1.0}, save=True, model=model)
    assert control.should_save and not control.should_training_stop
