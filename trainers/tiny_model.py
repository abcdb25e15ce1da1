"""A tiny, randomly initialised chat model built entirely offline.

Tests, the demo and CPU smoke runs need a model that loads with
``AutoTokenizer``/``AutoModelForCausalLM`` like any Hugging Face checkpoint,
but without network access and in well under a second. ``build_tiny_model``
writes one:

* a byte-level BPE tokenizer trained with the ``tokenizers`` library on the
  bundled text ``trainers/assets/corpus.txt`` (so it can encode any string,
  byte by byte if need be), wrapped as ``Qwen2Tokenizer``, the
  ``PreTrainedTokenizerFast`` subclass that ``AutoTokenizer`` insists on for a
  qwen2 checkpoint; special tokens ``<|pad|>``, ``<|end|>`` (eos) and the role
  markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, no bos;
* a chat template with one special marker per role, ``<|end|>`` closing every
  turn, and ``{% generation %}`` markers around the assistant's reply and its
  ``<|end|>``, which is what TRL's ``assistant_only_loss=True`` and
  ``return_assistant_tokens_mask=True`` rely on;
* a Qwen2 decoder (hidden 64, 2 layers, tied embeddings: ~0.13 M parameters)
  initialised from ``seed``, saved as safetensors with a generation config
  whose eos/pad ids match the tokenizer.

The same arguments always give byte-identical files, so a checkpoint hash can
be asserted in tests. The model knows nothing until trained: at the learning
rates a random model needs (1e-3..1e-2) it picks up ``demo_sft.jsonl`` within
a few seconds on one CPU thread.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values()]

# Each turn is "<|role|>content<|end|>", with no newlines, so a rendered prompt is
# always a token-exact prefix of the rendered prompt+reply (TRL checks this for
# prompt/completion data, and for the turns of a tool-calling episode). The assistant's
# content *and* its <|end|> sit inside {% generation %}: the model is trained to stop,
# and TRL does not warn that the end-of-turn token is left out of the loss mask.
#
# Tools (TRL's tool loop, RL jobs' ``tools``): with ``tools`` the conversation opens with
# a short system turn "tools: name(arg,arg) ..." (names and argument names only: the
# model is tiny and so is its context); an assistant's tool call is
# <tool_call>{"name": ..., "arguments": {...}}</tool_call> after its content, and a tool
# result is a system turn "tool: <result>". No new special tokens: the vocabulary, and
# with it every seed's weights, stay what they were.
_TOOLS_TURN = (
    "{%- if tools -%}{{- '<|system|>tools:' -}}"
    "{%- for tool in tools -%}{%- set fn = tool.function if tool.function is defined else tool -%}"
    "{%- set props = fn.parameters.properties if fn.parameters is defined"
    " and fn.parameters.properties is defined else {} -%}"
    "{{- ' ' + fn.name + '(' + (props | join(',')) + ')' -}}"
    "{%- endfor -%}{{- '<|end|>' -}}{%- endif -%}"
)
_TOOL_CALLS = (
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- set args = fn.arguments if fn.arguments is string else (fn.arguments | tojson) -%}"
    "{{- '<tool_call>{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' + args"
    " + '}</tool_call>' -}}"
    "{%- endfor -%}"
)
CHAT_TEMPLATE = (
    _TOOLS_TURN + "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set text = '' -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- text -}}" + _TOOL_CALLS + "{{- '<|end|>' -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'tool' -%}{{- '<|system|>tool: ' + text + '<|end|>' -}}"
    "{%- else -%}{{- '<|' + message['role'] + '|>' + text + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


# How a reply of this chat format is parsed back into a message: what follows the
# generation prompt, up to ``<|end|>``, is the content, and each <tool_call>...</tool_call>
# a tool call (TRL's tool loop and ``transformers serve`` both read it from the
# tokenizer). Without it, ``transformers serve`` falls back by model type (``qwen2``) to
# Qwen's ``<|im_start|>`` markers, finds no anchor, and hands the prompt back as part of
# the reply.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|end\|>", "content": "text"},
    },
}


def _corpus_lines() -> list[str]:
    """The bundled tokenizer training text, read as package data."""
    text = resources.files("trainers").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _train_bpe(vocab_size: int) -> Tokenizer:
    """Train byte-level BPE merges on the bundled corpus.

    The normaliser and pre-tokeniser are borrowed from ``Qwen2Tokenizer``:
    ``AutoTokenizer`` always loads a ``model_type: qwen2`` directory through
    that class, which rebuilds the pipeline (NFC, Qwen's split regex with one
    digit per piece, byte-level) around the saved vocab and merges. Training
    with anything else would make the loaded tokenizer split text differently
    from the one the merges were learned for.
    """
    reference = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = reference.normalizer
    tok.pre_tokenizer = reference.pre_tokenizer
    tok.decoder = reference.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """The chat tokenizer: trained BPE, special tokens and chat template.

    ``vocab_size`` is an upper bound: the small corpus yields fewer merges, so
    the real size is ``len(tokenizer)``, which the model config uses. The class
    is ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``) so that what is built
    here is exactly what ``AutoTokenizer`` loads back; ``unk_token=None`` stops
    it from adding its default ``<|endoftext|>`` beyond the model's vocabulary
    (byte-level BPE never needs an unknown token).
    """
    model = json.loads(_train_bpe(vocab_size).to_str())["model"]
    # Padding side "left": TRL's trainers pad their own batches and pass the side
    # explicitly (SFT's collator pads right whatever this says), so the default
    # only matters to callers that batch prompts through the tokenizer, i.e.
    # generation, where a decoder-only model needs every prompt to end at the
    # last position. Left therefore suits both.
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(pair) for pair in model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        padding_side="left",
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
        response_template=RESPONSE_TEMPLATE,
    )


def tiny_config(tokenizer: Qwen2Tokenizer, hidden_size: int, num_layers: int) -> Qwen2Config:
    """A Qwen2 config sized for CPU tests: 4 heads, 2 KV heads, tied embeddings.

    Weights are drawn with std ``hidden_size ** -0.5`` (0.125 at 64) rather than
    Qwen's 0.02, which suits widths near 1000+. At 0.02 and width 64 the tied
    embedding rows are so short that a random model's logits stay within about
    +-1, and LoRA on the linear layers alone cannot lower the SFT loss by more
    than ~15% because it can neither lengthen those rows nor the final norm.
    """
    return Qwen2Config(
        initializer_range=hidden_size**-0.5,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Write tokenizer, config, generation config and safetensors weights to ``out_dir``.

    The weights depend only on ``seed`` and the sizes; the global torch RNG is
    left as it was. Returns ``out_dir`` as a ``Path``.
    """
    if hidden_size % 8:
        # 4 attention heads, each with an even head dim for rotary embeddings
        raise ValueError(f"hidden_size must be a multiple of 8, got {hidden_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = tiny_config(tokenizer, hidden_size, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers.tiny_model DIR [--seed N]`` (what ``posttrain tiny-model`` runs)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainers.tiny_model", description=__doc__)
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"tiny model written to {build_tiny_model(args.dir, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
