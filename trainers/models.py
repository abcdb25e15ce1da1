"""Loading the base model and tokenizer for a job, with errors a user can act on."""

from __future__ import annotations

from typing import Any

from trainers.contract.errors import JobError
from trainers.contract.resources import LoraSettings


def pick_device_dtype() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return "cuda", torch.bfloat16 if bf16 else torch.float16
    return "cpu", torch.float32


def use_vllm(engine: str, param: str) -> bool:
    """Whether a method's rollouts go through vLLM: ``engine`` is its ``rollout_engine``
    (auto, transformers or vllm) and ``param`` the field named when vllm is unavailable."""
    if engine == "transformers":
        return False
    import importlib.util

    import torch

    available = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    if engine == "vllm" and not available:
        raise JobError(
            "rollout_engine_unavailable",
            "rollout_engine 'vllm' needs a GPU worker with vLLM installed (the 'gpu' extra)",
            param,
        )
    return available


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise JobError(
            "model_load_failed", f"tokenizer for model '{name}' could not be loaded: {exc}", "model"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise JobError(
            "model_load_failed",
            f"model '{name}' has no chat template; chat-format "
            "data needs one (use prompt/completion rows instead)",
            "model",
        )
    return tok


def load_causal_lm(name: str):
    from transformers import AutoModelForCausalLM

    _, dtype = pick_device_dtype()
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as exc:
        raise JobError(
            "model_load_failed", f"model '{name}' could not be loaded: {exc}", "model"
        ) from exc


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
