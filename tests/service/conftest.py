"""Service tests: the in-process API's data directory (``tmp_path``) holds a model.

Jobs may only name models under the model roots (``service/modelaccess.py``); the
default root is ``<data_dir>/models``. These tests never train, so the model is
just what job creation checks: a directory whose config.json names a model_type.
``"model": "tiny"`` resolves to it.
"""

from __future__ import annotations

import json

import pytest


@pytest.fixture(autouse=True)
def tiny_model_entry(tmp_path):
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return model


@pytest.fixture(autouse=True)
def reward_model_entry(tmp_path):
    """``"reward"``: a one-label sequence classifier as job creation reads one (config,
    weights and tokenizer files present; nothing is loaded)."""
    model = tmp_path / "models" / "reward"
    model.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]}
    (model / "config.json").write_text(json.dumps({**config, "num_labels": 1}))
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer.json").write_text("{}")
    return model
