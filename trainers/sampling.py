"""Greedy replies from a saved checkpoint, for demos and smoke checks (not training).

``python -m trainers.sampling MODEL_DIR`` reads a JSON list of chat prompts (each a list
of messages) on stdin and prints a JSON list of replies: the demo runs it as a child
process, so the API's side of the demo never loads torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def greedy_replies(
    model_dir: Path, prompts: list[list[dict]], max_new_tokens: int = 24
) -> list[str]:
    """The model's greedy continuation of each chat prompt (a list of messages)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    replies = []
    for prompt in prompts:
        ids = tok.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        replies.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return replies


if __name__ == "__main__":
    print(json.dumps(greedy_replies(Path(sys.argv[1]), json.load(sys.stdin))))
