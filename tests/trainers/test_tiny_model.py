"""The offline tiny model: loads with Auto* classes, chat template, masks, determinism."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from trainers.tiny_model import build_tiny_model, build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to Alice."},
    {"role": "assistant", "content": "Hello, Alice!"},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
]


def demo_rows() -> list[dict]:
    text = resources.files("trainers").joinpath("assets/demo_sft.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_directory_loads_with_auto_classes(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert model.config.model_type == "qwen2"
    assert (model_dir / "model.safetensors").is_file()
    # AutoTokenizer loads a qwen2 directory through Qwen2Tokenizer, which must
    # not add tokens of its own: every id the tokenizer can emit has an embedding.
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.tie_word_embeddings
    ids = tokenizer("The sky is blue.", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_special_tokens_and_generation_config(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert tokenizer.tokenize(marker) == [marker]
    assert tokenizer.padding_side == "left"


def test_chat_template_renders_turns(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|system|>You are a helpful assistant.<|end|>"
        "<|user|>Say hello to Alice.<|end|>"
        "<|assistant|>Hello, Alice!<|end|>"
        "<|user|>What is 12 + 7?<|end|>"
        "<|assistant|>12 + 7 = 19.<|end|>"
    )
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|user|>Say hello to Alice.<|end|><|assistant|>")
    assert text.startswith(prompt)


def test_prompt_tokens_are_a_prefix_of_the_conversation(tokenizer):
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(CONVERSATION[:3], return_dict=True)["input_ids"]
    assert list(full[: len(prompt)]) == list(prompt)


def _masked_text(tokenizer, messages) -> tuple[str, list[int]]:
    out = tokenizer.apply_chat_template(
        messages, return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]), mask


def test_assistant_mask_marks_exactly_the_assistant_tokens(tokenizer):
    text, mask = _masked_text(tokenizer, CONVERSATION)
    assert text == "Hello, Alice!<|end|>12 + 7 = 19.<|end|>"
    # two separate spans, one per assistant turn, each ending on eos
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(starts) == 2


@pytest.mark.parametrize("row", demo_rows()[:16], ids=lambda r: r["messages"][-2]["content"])
def test_assistant_mask_on_demo_rows(tokenizer, row):
    text, _ = _masked_text(tokenizer, row["messages"])
    assert text == row["messages"][-1]["content"] + "<|end|>"


def test_unknown_role_is_rejected(tokenizer):
    with pytest.raises(Exception, match="unsupported role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_demo_dataset_shape():
    rows = demo_rows()
    assert 48 <= len(rows) <= 64
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])


def test_tokenizer_round_trips_text(tokenizer):
    texts = [m["content"] for row in demo_rows() for m in row["messages"]]
    texts += ["12 + 7 = 19", "  two  spaces\tand a tab\n", "Zoë's café costs 3€ 日本"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_loaded_tokenizer_matches_the_one_built(tokenizer):
    built = build_tokenizer()
    text = resources.files("trainers").joinpath("assets/corpus.txt").read_text("utf-8")[:4000]
    assert built(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert built.get_vocab() == tokenizer.get_vocab()


def test_greedy_generation_runs_and_respects_limits(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert 1 <= out.shape[1] - prompt["input_ids"].shape[1] <= 5


def test_same_seed_gives_identical_files_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    a = build_tiny_model(tmp_path / "a", seed=7)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_model(tmp_path / "b", seed=7)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_different_seed_gives_different_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=0))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=1))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert not torch.equal(sa["model.embed_tokens.weight"], sb["model.embed_tokens.weight"])
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], sb["model.layers.0.self_attn.q_proj.weight"]
    )


def test_sizes_are_configurable(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, vocab_size=600)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.config.intermediate_size == 64
    assert len(tokenizer) == model.config.vocab_size <= 600


def test_hidden_size_must_suit_four_rotary_heads(tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tiny_model(tmp_path / "m", hidden_size=36)
