"""Every registered method trains through a trainer that follows posttrain's rules."""

from __future__ import annotations

import pytest
from transformers import Trainer

from trainers import registry
from trainers.base import PosttrainTrainerMixin
from trainers.contract.methods import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_each_methods_trainer_uses_the_fused_logprob_base(method):
    cls = registry.resolve(method).trainer_class
    assert issubclass(cls, Trainer) and issubclass(cls, PosttrainTrainerMixin), cls
    # the mixin must come first so its __init__ runs before the TRL trainer's
    assert cls.__mro__.index(PosttrainTrainerMixin) < cls.__mro__.index(Trainer)
