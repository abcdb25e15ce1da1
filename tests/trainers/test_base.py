"""Every registered method trains through a trainer that follows posttrain's rules."""

from __future__ import annotations

import importlib
import inspect

import pytest
from transformers import Trainer

from trainers import registry
from trainers.base import PosttrainTrainerMixin


@pytest.mark.parametrize("method", registry.available_methods())
def test_each_methods_trainer_uses_the_fused_logprob_base(method):
    module = importlib.import_module(registry.TRAINERS[method].split(":")[0])
    trainers = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, Trainer) and c.__module__ == module.__name__
    ]
    assert trainers, f"{module.__name__} defines no Trainer subclass"
    for cls in trainers:
        assert issubclass(cls, PosttrainTrainerMixin), cls
        # the mixin must come first so its __init__ installs the logits guard
        assert cls.__mro__.index(PosttrainTrainerMixin) < cls.__mro__.index(Trainer)
