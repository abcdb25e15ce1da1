"""The job spec: defaults, aliases, and cross-field checks that say how to fix a request."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainers import registry
from trainers.contract.methods import METHODS
from trainers.contract.spec import JobSpec

BASE = {"model": "m", "training_file": "file-1"}


def test_method_defaults_to_supervised_with_auto_hyperparameters():
    spec = JobSpec.model_validate(BASE)
    hp = spec.method_hyperparameters()
    assert spec.method_type == "supervised"
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == ("auto", "auto", "auto")
    assert hp.resolved_epochs() == 3 and hp.resolved_batch_size(5) == 5
    assert hp.resolved_learning_rate(lora=False) == pytest.approx(2e-5)
    assert hp.resolved_learning_rate(lora=True) == pytest.approx(2e-4)


def test_sft_alias_and_its_config_key_map_to_supervised():
    spec = JobSpec.model_validate(
        {
            **BASE,
            "method": {
                "type": "sft",
                "sft": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 3}},
            },
        }
    )
    hp = spec.method_hyperparameters()
    assert spec.method_type == "supervised" and hp.n_epochs == 2
    assert hp.resolved_learning_rate(lora=False) == pytest.approx(6e-5)


def _packing(method: str, value) -> str:
    hp = {} if value is None else {"packing": value}
    spec = JobSpec.model_validate(
        {**BASE, "method": {"type": method, method: {"hyperparameters": hp}}}
    )
    return spec.method_hyperparameters().packing


@pytest.mark.parametrize("method", ["supervised", "dpo"])
def test_packing_defaults_to_auto_and_can_be_turned_off(method):
    assert _packing(method, None) == "auto"
    assert _packing(method, "off") == "off"
    assert _packing(method, "padding_free") == "padding_free"
    assert (_packing(method, False), _packing(method, True)) == ("off", "padding_free")
    with pytest.raises(ValidationError, match="packing"):
        _packing(method, "bfd")  # packing that changes the batches is not offered


def test_methods_that_do_not_pad_batches_have_no_packing_setting():
    with pytest.raises(ValidationError, match="packing"):
        JobSpec.model_validate(
            {**BASE, "method": {"type": "grpo", "grpo": {"hyperparameters": {"packing": "off"}}}}
        )


def test_absolute_learning_rate_overrides_multiplier():
    spec = JobSpec.model_validate(
        {
            **BASE,
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {"learning_rate": 5e-3, "learning_rate_multiplier": 10}
                },
            },
        }
    )
    assert spec.method_hyperparameters().resolved_learning_rate(lora=True) == 5e-3


def test_lora_settings_require_lora_training_type():
    with pytest.raises(ValidationError, match="set training_type to 'lora'"):
        JobSpec.model_validate({**BASE, "lora": {"r": 8}})
    spec = JobSpec.model_validate({**BASE, "training_type": "lora"})
    assert spec.lora is not None and spec.lora.r == 16


@pytest.mark.parametrize(
    "patch,fragment",
    [
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "n_epochs",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"bogus": 1}}}},
            "bogus",
        ),
        ({"suffix": "has spaces"}, "suffix"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "16 keys"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_requests_are_rejected_naming_the_problem(patch, fragment):
    with pytest.raises(ValidationError, match=fragment):
        JobSpec.model_validate({**BASE, **patch})


def test_spec_round_trips_through_json():
    spec = JobSpec.model_validate({**BASE, "training_type": "lora", "seed": 7})
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_registry_names_are_the_methods_the_spec_accepts():
    for name in METHODS:
        assert registry.resolve(name).trainer_class is not None
    spec_types = {m.model_fields["type"].annotation.__args__[0] for m in _method_models()}
    assert spec_types == set(METHODS)
    available = "available: supervised, dpo, bco, oreo, grpo, reinforcement, egpo"
    with pytest.raises(KeyError, match=available):
        registry.resolve("nonsense")


def _method_models():
    from typing import get_args

    from trainers.contract.spec import Method

    union = get_args(Method)[0]
    return get_args(union)


def test_lora_on_the_lm_head_is_refused_naming_the_fix():
    with pytest.raises(ValidationError, match="LoRA on the LM head"):
        JobSpec.model_validate(
            {**BASE, "training_type": "lora", "lora": {"target_modules": ["q_proj", "lm_head"]}}
        )


def test_dpo_defaults_follow_openai_and_trl():
    spec = JobSpec.model_validate({**BASE, "method": {"type": "dpo"}})
    hp = spec.method_hyperparameters()
    assert hp.resolved_beta() == 0.1 and hp.loss_types() == ["sigmoid"]
    assert hp.resolved_learning_rate(lora=False) == pytest.approx(1e-6)
    with pytest.raises(ValidationError, match="one weight per loss type"):
        JobSpec.model_validate(
            {
                **BASE,
                "method": {
                    "type": "dpo",
                    "dpo": {
                        "hyperparameters": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1]}
                    },
                },
            }
        )
    with pytest.raises(ValidationError, match="loss_type"):
        JobSpec.model_validate(
            {**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"loss_type": "nope"}}}}
        )


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_egpo_refuses_sharded_strategies(strategy):
    judge = {"type": "pattern_table", "classes": [{"name": "a", "pattern": "^a"}],
             "preferences": [[0.5, 0.9], [0.1, 0.5]]}  # fmt: skip
    egpo = {"type": "egpo", "egpo": {"hyperparameters": {"judge": judge}}}
    JobSpec.model_validate({**BASE, "method": egpo, "resources": {"gpus": 2}})  # ddp: fine
    with pytest.raises(ValidationError, match=f"strategy '{strategy}' is not supported for egpo"):
        JobSpec.model_validate(
            {**BASE, "method": egpo, "resources": {"gpus": 2, "strategy": strategy}}
        )


GRADER = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}",
          "reference": "x", "operation": "eq"}  # fmt: skip


def test_samples_default_to_four_rows_every_step_for_the_grpo_family_only():
    grpo = {"type": "grpo", "grpo": {"graders": [GRADER]}}
    rft = {"type": "reinforcement", "reinforcement": {"grader": GRADER}}
    assert JobSpec.model_validate({**BASE, "method": grpo}).sampling() == (1, 4)
    spec = JobSpec.model_validate(
        {**BASE, "method": rft, "sample_every_steps": 5, "sample_rows": 16}
    )
    assert spec.sampling() == (5, 16)
    off = JobSpec.model_validate({**BASE, "method": grpo, "sample_every_steps": 0})
    assert off.sampling() == (0, 0)
    for method in ({"type": "supervised"}, {"type": "dpo"}, {"type": "oreo"}):
        assert JobSpec.model_validate({**BASE, "method": method}).sampling() == (0, 0)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"sample_rows": 17}, "less than or equal to 16"),
        ({"sample_every_steps": -1}, "greater than or equal to 0"),
        ({"method": {"type": "dpo"}, "sample_every_steps": 2}, "method 'dpo' records no samples"),
        ({"method": {"type": "sft"}, "sample_rows": 2}, "method 'supervised' records no samples"),
    ],
)
def test_sample_settings_are_refused_naming_the_field(fields, fragment):
    body = {**BASE, "method": {"type": "grpo", "grpo": {"graders": [GRADER]}}, **fields}
    with pytest.raises(ValidationError) as exc:
        JobSpec.model_validate(body)
    (err,) = exc.value.errors()
    assert err["loc"] == (next(k for k in fields if k.startswith("sample")),)
    assert fragment in err["msg"]
