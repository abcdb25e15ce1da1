"""Step-level beam search with an OREO checkpoint's policy and value model (paper §4.4).

Usage::

    python -m trainers.algorithms.oreo.search --checkpoint DIR --prompt "..." \\
        [--beam 3 --max-steps 8 --delimiter "\\n" --max-step-tokens 32 \\
         --max-new-tokens 128 --seed 0]

``DIR`` is an OREO ``checkpoint-N`` (the policy, or its LoRA adapter, plus
``value_model/``). The prompt is used as given (apply the chat template yourself).
Keep B partial answers; extend each with B sampled next steps (temperature 1, a step
stops after the delimiter, EOS, or ``--max-step-tokens``) → B² candidates; score each
by V at the last token of its prefix (the training-time convention, not the authors'
scripts' one token early); candidates that emitted EOS go to a finished pool, the top B
of the rest by V are kept; stop after ``--max-steps`` steps, once an answer reaches
``--max-new-tokens`` (or the model's context), or when none is left. The answer is the
finished candidate with the highest V (or the best unfinished one if nothing finished).
Prints the decoded answer (the response only). Each step samples a beam's B steps in one
``generate`` call and scores all B² candidates in one batched value forward. The paper
uses B up to 7 and up to 20 steps; the defaults here are bounded for a quick answer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.algorithms.oreo.value import VALUE_DIR, ValueModel


@dataclass
class Beam:
    ids: list[int]  # the response so far
    value: float
    finished: bool = False


def load(checkpoint: str | Path):
    """(policy, value model, tokenizer) from an OREO checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(checkpoint)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        policy = AutoPeftModelForCausalLM.from_pretrained(str(folder)).merge_and_unload()
    else:
        policy = AutoModelForCausalLM.from_pretrained(str(folder))
    return policy.eval(), ValueModel.load(folder / VALUE_DIR).eval(), tok


class _StopAfter:
    """A stopping criterion: a row is done once its new text holds ``delimiter``."""

    def __init__(self, tok, delimiter: str, start: int):
        self.tok, self.delimiter, self.start = tok, delimiter, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([self.delimiter in t for t in texts], device=input_ids.device)


@torch.no_grad()
def sample_steps(
    policy, tok, ids: list[int], delimiter: str, max_tokens: int, n: int
) -> list[tuple[list[int], bool]]:
    """``n`` sampled next steps (temperature 1) after ``ids``: (new ids, ended with EOS).
    A step ends at the delimiter (kept), EOS (kept) or ``max_tokens``."""
    from transformers import StoppingCriteriaList

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = policy.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_tokens,
        num_return_sequences=n,
        stopping_criteria=StoppingCriteriaList([_StopAfter(tok, delimiter, len(ids))]),
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad,
    )
    steps = []
    for row in out[:, len(ids) :].tolist():
        if tok.eos_token_id in row:
            steps.append((row[: row.index(tok.eos_token_id) + 1], True))
            continue
        while row and row[-1] == pad:
            row.pop()
        steps.append((_cut_at(tok, row, delimiter), False))
    return steps


def _cut_at(tok, new: list[int], delimiter: str) -> list[int]:
    """The shortest prefix of ``new`` whose text holds ``delimiter`` (all of it if none)."""
    for k in range(1, len(new) + 1):
        if delimiter in tok.decode(new[:k], skip_special_tokens=True):
            return new[:k]
    return new


@torch.no_grad()
def prefix_values(value_model: ValueModel, prefixes: list[list[int]], pad_id: int) -> list[float]:
    """V at the last token of each prefix, in one right-padded forward."""
    width = max(len(p) for p in prefixes)
    ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prefixes])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prefixes])
    values = value_model(ids, mask)
    return [float(values[i, len(p) - 1]) for i, p in enumerate(prefixes)]


def beam_search(policy, value_model, tok, prompt: str, **settings) -> str:
    """The decoded best answer (see the module docstring)."""
    return tok.decode(
        search(policy, value_model, tok, prompt, **settings).ids, skip_special_tokens=True
    )


def search(
    policy, value_model, tok, prompt: str, *, beam: int = 3, max_steps: int = 8,
    delimiter: str = "\n", max_step_tokens: int = 32, max_new_tokens: int = 128,
) -> Beam:  # fmt: skip
    """The best answer's beam (its response ids and value)."""
    prompt_ids = list(tok(prompt)["input_ids"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    context = getattr(policy.config, "max_position_embeddings", None) or 1 << 30
    budget = min(max_new_tokens, context - len(prompt_ids))
    beams = [Beam([], prefix_values(value_model, [prompt_ids], pad)[0])]
    finished: list[Beam] = []
    for _ in range(max_steps):
        grown = []
        for b in beams:
            room = min(max_step_tokens, budget - len(b.ids))
            for new, eos in sample_steps(policy, tok, prompt_ids + b.ids, delimiter, room, beam):
                ids = b.ids + new
                grown.append((ids, eos or not new or len(ids) >= budget))
        values = prefix_values(value_model, [prompt_ids + ids for ids, _ in grown], pad)
        candidates = [Beam(ids, v, done) for (ids, done), v in zip(grown, values, strict=True)]
        finished += [c for c in candidates if c.finished]
        beams = sorted((c for c in candidates if not c.finished), key=lambda c: -c.value)[:beam]
        if not beams:
            break
    return max(finished or beams, key=lambda c: c.value)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--delimiter", default="\n")
    ap.add_argument("--max-step-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="the answer's token budget")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    delimiter = args.delimiter.encode().decode("unicode_escape")  # "\\n" on a shell -> "\n"
    torch.manual_seed(args.seed)
    policy, value_model, tok = load(args.checkpoint)
    answer = beam_search(
        policy, value_model, tok, args.prompt, beam=args.beam, max_steps=args.max_steps,
        delimiter=delimiter, max_step_tokens=args.max_step_tokens,
        max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    print(answer)
    return answer


if __name__ == "__main__":
    main()
