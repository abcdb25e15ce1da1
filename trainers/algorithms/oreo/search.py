"""Step-level beam search with an OREO checkpoint's policy and value model (paper §4.4).

Usage::

    python -m trainers.algorithms.oreo.search --checkpoint DIR --prompt "..." \\
        [--beam 3 --max-steps 20 --delimiter "\\n" --max-step-tokens 64 --seed 0]

``DIR`` is an OREO ``checkpoint-N`` (the policy, or its LoRA adapter, plus
``value_model/``). The prompt is used as given (apply the chat template yourself).
Keep B partial answers; extend each with B sampled next steps (temperature 1, a step
stops after the delimiter, EOS, or ``--max-step-tokens``) → B² candidates; score each
by V at the last token of its prefix (the training-time convention, not the authors'
scripts' one token early); candidates that emitted EOS go to a finished pool, the top B
of the rest by V are kept; stop after ``--max-steps`` steps or when none is left. The
answer is the finished candidate with the highest V (or the best unfinished one if
nothing finished). Prints the decoded answer (the response only). The paper uses B up
to 7; the script default is 3.
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


@torch.no_grad()
def sample_step(policy, tok, ids: list[int], delimiter: str, max_tokens: int) -> tuple[list, bool]:
    """One sampled step (temperature 1) after ``ids``: (new ids, ended with EOS)."""
    out = policy.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_tokens,
        stop_strings=[delimiter],
        tokenizer=tok,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    new = out[0, len(ids) :].tolist()
    if tok.eos_token_id in new:
        return new[: new.index(tok.eos_token_id) + 1], True
    return new, False


@torch.no_grad()
def prefix_value(value_model: ValueModel, ids: list[int]) -> float:
    """V at the last token of the prefix ``ids``."""
    return float(value_model(torch.tensor([ids]))[0, -1])


def beam_search(
    policy, value_model, tok, prompt: str, *, beam: int = 3, max_steps: int = 20,
    delimiter: str = "\n", max_step_tokens: int = 64,
) -> str:  # fmt: skip
    """The decoded best answer (see the module docstring)."""
    prompt_ids = list(tok(prompt)["input_ids"])
    beams, finished = [Beam([], prefix_value(value_model, prompt_ids))], []
    for _ in range(max_steps):
        candidates = []
        for b in beams:
            for _ in range(beam):
                new, eos = sample_step(policy, tok, prompt_ids + b.ids, delimiter, max_step_tokens)
                ids = b.ids + new
                v = prefix_value(value_model, prompt_ids + ids)
                candidates.append(Beam(ids, v, finished=eos or not new))
        finished += [c for c in candidates if c.finished]
        beams = sorted((c for c in candidates if not c.finished), key=lambda c: -c.value)[:beam]
        if not beams:
            break
    best = max(finished or beams, key=lambda c: c.value)
    return tok.decode(best.ids, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--delimiter", default="\n")
    ap.add_argument("--max-step-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    delimiter = args.delimiter.encode().decode("unicode_escape")  # "\\n" on a shell -> "\n"
    torch.manual_seed(args.seed)
    policy, value_model, tok = load(args.checkpoint)
    answer = beam_search(
        policy, value_model, tok, args.prompt, beam=args.beam, max_steps=args.max_steps,
        delimiter=delimiter, max_step_tokens=args.max_step_tokens,
    )  # fmt: skip
    print(answer)
    return answer


if __name__ == "__main__":
    main()
