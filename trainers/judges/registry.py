"""The judge registry: one ``Judge`` class per judge type, built by ``build_judge``.

``build_judge(spec, seed=..., device=...)`` returns an object whose
``prefer(prompts, a, b)`` gives P(a_i ≻ b_i) for each pair. The random A/B
order flip happens inside: each pair draws a coin from the judge's own seeded
generator; a flipped pair is judged as (b_i, a_i) and its answer p read as
1 - p. ``state_dict``/``load_state_dict`` carry that generator, so a resumed
run flips exactly as the uninterrupted one would have.

Prompts are strings or chat message lists (``[{"role", "content"}]``); the
optional ``items`` are the dataset rows, which grader judges' templates read
(``{{item.x}}``); without them a row is ``{"prompt": prompt}`` (or
``{"messages": prompt}`` for a message list).

Torch-free at import: only the model judges import torch, through
``trainers.judges.models``, when they first judge.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from trainers.contract.judges.spec import (
    OTHER_OUTPUT_FIELD,
    GraderJudge,
    JudgeSpec,
    PatternTableJudge,
    PreferenceModelJudge,
    RewardModelJudge,
    parse_judge,
    render_pair,
)

__all__ = ["JUDGES", "Judge", "build_judge", "prompt_text"]

Prompt = str | list[dict[str, Any]]
# A pattern search that takes longer than this counts as no match.
PATTERN_TIMEOUT_S = 1.0


def prompt_text(prompt: Prompt) -> str:
    """A prompt as text: itself, or its turns as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {_content(m)}" for m in prompt)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class Judge:
    """P(A ≻ B) for batches of pairs; subclasses implement ``probabilities``."""

    def __init__(self, spec: JudgeSpec, *, seed: int, device: Any = None):
        self.spec = spec
        self.device = device
        self._rng = random.Random(seed)

    def probabilities(
        self, prompts: list[Prompt], a: list[str], b: list[str], items: list[dict]
    ) -> list[float]:
        """P(a_i ≻ b_i) with A shown first: no flipping."""
        raise NotImplementedError

    def prefer(
        self,
        prompts: Sequence[Prompt],
        a: Sequence[str],
        b: Sequence[str],
        items: Sequence[dict] | None = None,
    ) -> list[float]:
        """P(a_i ≻ b_i) for every pair, each shown in a random order when ``flip_order``."""
        n = len(prompts)
        if len(a) != n or len(b) != n or (items is not None and len(items) != n):
            sizes = f"{n} prompts, {len(a)} a, {len(b)} b"
            raise ValueError(f"prefer needs one of each per pair, got {sizes}")
        rows = list(items) if items is not None else [_default_item(p) for p in prompts]
        if not self.spec.flip_order:
            return self.probabilities(list(prompts), list(a), list(b), rows)
        flips = [self._rng.random() < 0.5 for _ in range(n)]
        first = [y if f else x for x, y, f in zip(a, b, flips, strict=True)]
        second = [x if f else y for x, y, f in zip(a, b, flips, strict=True)]
        shown = self.probabilities(list(prompts), first, second, rows)
        return [1.0 - p if f else p for p, f in zip(shown, flips, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """The flip generator's state, JSON-serialisable."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))


def _default_item(prompt: Prompt) -> dict[str, Any]:
    return {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}


class PatternTableJudgeImpl(Judge):
    """Rules: P(A ≻ B) = preferences[class(A)][class(B)]."""

    spec: PatternTableJudge

    def __init__(self, spec: PatternTableJudge, *, seed: int, device: Any = None):
        import regex

        super().__init__(spec, seed=seed, device=device)
        self._patterns = [regex.compile(c.pattern) for c in spec.classes]

    def class_index(self, text: str) -> int:
        """The index of ``text``'s class: the first pattern that matches, else ``other``."""
        stripped = text.strip()
        for i, pattern in enumerate(self._patterns):
            try:
                if pattern.search(stripped, timeout=PATTERN_TIMEOUT_S):
                    return i
            except TimeoutError:
                continue
        return len(self._patterns)

    def classify(self, texts: Sequence[str]) -> list[str]:
        """Each text's class name (for metrics such as the style mix)."""
        names = self.spec.class_names
        return [names[self.class_index(t)] for t in texts]

    def probabilities(self, prompts, a, b, items):
        table = self.spec.preferences
        return [
            float(table[self.class_index(x)][self.class_index(y)])
            for x, y in zip(a, b, strict=True)
        ]


class GraderJudgeImpl(Judge):
    """A grader: Bradley–Terry over pointwise scores, or a pairwise score read as P(A ≻ B)."""

    spec: GraderJudge

    def probabilities(self, prompts, a, b, items):
        from trainers.contract.graders.scoring import grade_batch

        if self.spec.mode == "pairwise":
            rows = [{**row, OTHER_OUTPUT_FIELD: other} for row, other in zip(items, b, strict=True)]
            return [min(1.0, max(0.0, s)) for s in grade_batch(self.spec.grader, rows, a)]
        scores = grade_batch(self.spec.grader, items + items, a + b)
        n, scale = len(a), self.spec.scale
        return [_sigmoid((scores[i] - scores[n + i]) / scale) for i in range(n)]


class PreferenceModelJudgeImpl(Judge):
    """A pairwise classifier on ``template``: softmax(logits)[a_wins_label], or sigmoid."""

    spec: PreferenceModelJudge

    def probabilities(self, prompts, a, b, items):
        import torch

        from trainers.judges import models

        s = self.spec
        texts = [
            render_pair(s.template, prompt_text(p), x, y)
            for p, x, y in zip(prompts, a, b, strict=True)
        ]
        out = models.logits(
            s.model, models.choose_device(self.device), texts, s.batch_size, s.max_length, True
        )
        if out.shape[-1] == 1:
            return torch.sigmoid(out[:, 0]).tolist()
        return torch.softmax(out, dim=-1)[:, s.a_wins_label].tolist()


class RewardModelJudgeImpl(Judge):
    """Bradley–Terry over a reward model's scores: sigmoid((r_A - r_B) / temperature)."""

    spec: RewardModelJudge

    def rewards(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        """The reward model's score of each (prompt, response)."""
        from trainers.judges import models

        s = self.spec
        device = models.choose_device(self.device)
        tok, _ = models.load_classifier(s.model, device)
        texts = [_scored_text(tok, p, r) for p, r in zip(prompts, responses, strict=True)]
        special = not tok.chat_template
        return models.logits(s.model, device, texts, s.batch_size, s.max_length, special)[
            :, 0
        ].tolist()

    def probabilities(self, prompts, a, b, items):
        scores = self.rewards(prompts + prompts, a + b)
        n, t = len(a), self.spec.temperature
        return [_sigmoid((scores[i] - scores[n + i]) / t) for i in range(n)]


def _scored_text(tok: Any, prompt: Prompt, response: str) -> str:
    """(prompt, response) as the reward model reads it: its chat template, else two lines."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    turns = [*head, {"role": "assistant", "content": response}]
    if tok.chat_template:
        return tok.apply_chat_template(turns, tokenize=False)
    return f"{prompt_text(prompt)}\n{response}"


JUDGES: dict[str, type[Judge]] = {
    "preference_model": PreferenceModelJudgeImpl,
    "reward_model": RewardModelJudgeImpl,
    "grader": GraderJudgeImpl,
    "pattern_table": PatternTableJudgeImpl,
}


def build_judge(spec: JudgeSpec | dict[str, Any], *, seed: int, device: Any = None) -> Judge:
    """The judge for ``spec`` (parsed or JSON); model judges load their model on first use."""
    parsed = parse_judge(spec)
    return JUDGES[parsed.type](parsed, seed=seed, device=device)
