"""Rollout planners (``docs/algorithms/xrpo.md``): how many samples each prompt gets.

TRL's GRPOTrainer gives every optimiser step N prompts and a budget of N·G rollouts.
Before generation the trainer asks a planner how to spend that budget; afterwards it
reports each prompt's rewards back. Once per step::

    allocs = planner.plan(prompt_keys, budget=N * G)        # one Allocation per prompt
    # repeat prompt i allocs[i].n times (ragged groups); if allocs[i].exemplars:
    #     prompt_i = format_seeded_prompt(prompt_i, allocs[i].exemplars)
    # ... generate, score ...
    planner.observe(key_i, question_i, rewards_i, completions_i)   # for each prompt
    log(planner.metrics())
    # checkpoint: planner.state_dict() (JSON); on resume: planner.load_state_dict(state)

``uniform`` is TRL's behaviour (G each). ``xrpo`` is XRPO (2510.06672, formulas [T]):
the hierarchical allocator S1 and in-context seeding S2. How posttrain departs from it:

* XRPO runs three generation phases inside one step; TRL generates once per step, so
  the phases are realised across visits. A prompt's first visit is phase 1 (n₀ each,
  default budget//N). On later visits its cumulative statistics (n seen, sample mean
  and std of all its rewards so far) drive Π_q = Δ̂_q + φ_q, with n_q = n seen + the
  rollouts given to it so far in this plan [our choice].
* Every revisited prompt gets at least ``n_min`` = 2 (a group of one has no variance,
  so no advantage) and at most ``n_max`` = 32; Σ n_q = budget exactly. The invariant
  (``docs/algorithms/xrpo.md``) n_q ≥ n₀ thus holds on first visits only: a revisit may
  get as few as n_min. The rest is
  handed out one rollout at a time to argmax Π_q, recomputed after each increment
  (a heap: only the incremented prompt's priority changes). Unvisited prompts take a
  leftover rollout only when no revisited prompt can (ties: fewest, then first).
* T in φ is the global step, counted as plan calls (first plan: T = 1) [our choice].
* The Student-t quantile is computed here (bisection on the regularised incomplete
  beta), since scipy is not a dependency.
* Seeding: a prompt whose rewards so far are all ≤ ``correct_threshold`` (default 0:
  binary rewards; raise it for graded rewards) gets K = 2 exemplars on its next visit.
  The paper retrieves them with an embedding model (Qwen3-Embedding-8B); none can be
  downloaded here, so similarity is TF-IDF cosine over word uni- and bigrams of the
  questions. The corpus keeps each solved prompt's shortest correct completion (a
  shorter one replaces it later), truncated to ``max_exemplar_chars``; exemplars never
  come from the prompt itself or from an identical question; the corpus is capped at
  ``max_corpus`` entries, oldest evicted first [our choice]. Rewards of seeded rollouts count
  towards the prompt's statistics like any other [our choice].
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainers.core.retrieval import LexicalIndex
from trainers.core.tdist import ci_half_width
from trainers.core.types import lookup, registration

Exemplar = tuple[str, str]  # (question, verified-correct solution)


@dataclass(frozen=True)
class Allocation:
    """One prompt's share of the step: ``n`` samples, generated after ``exemplars`` (maybe none)."""

    n: int
    exemplars: list[Exemplar] = field(default_factory=list)


class RolloutPlanner:
    """Base planner: subclasses implement ``plan``; the rest defaults to a stateless no-op."""

    name: str = ""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def plan(self, prompt_keys: list[str], budget: int) -> list[Allocation]:
        raise NotImplementedError

    def observe(
        self, prompt_key: str, question_text: str, rewards: list[float], completions: list[str]
    ) -> None:
        """Record one prompt's scored rollouts from the step just planned."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def metrics(self) -> dict[str, float]:
        """Numbers to log for the last plan (``rollout/...``)."""
        return dict(self._last)


PLANNERS: dict[str, type[RolloutPlanner]] = {}


def register_planner(name: str) -> Callable[[type[RolloutPlanner]], type[RolloutPlanner]]:
    def decorator(cls: type[RolloutPlanner]) -> type[RolloutPlanner]:
        cls.name = name
        return registration(PLANNERS, "rollout planner", name)(cls)

    return decorator


def get_planner(name: str) -> type[RolloutPlanner]:
    """The planner class registered as ``name`` (KeyError listing the names); build it with
    its own hyperparameters."""
    return lookup(PLANNERS, "rollout planner", name)


def _allocation_metrics(counts: list[int], seeded: int) -> dict[str, float]:
    return {
        "rollout/n_min": float(min(counts)),
        "rollout/n_mean": sum(counts) / len(counts),
        "rollout/n_max": float(max(counts)),
        "rollout/seeded_prompts": float(seeded),
    }


@register_planner("uniform")
class UniformPlanner(RolloutPlanner):
    """TRL's GRPO sampling: every prompt gets budget // N samples, no context."""

    def plan(self, prompt_keys: list[str], budget: int) -> list[Allocation]:
        n_prompts = len(prompt_keys)
        if n_prompts == 0 or budget < n_prompts or budget % n_prompts:
            raise ValueError(
                f"uniform planner needs a budget that is a positive multiple of the {n_prompts} "
                f"prompts, got {budget}"
            )
        n = budget // n_prompts
        self._last = _allocation_metrics([n] * n_prompts, 0)
        return [Allocation(n) for _ in prompt_keys]


def xrpo_priority(
    std: float, n: int, step: int, alpha: float = 0.05, lam: float = 0.1, sqrt_bonus: bool = True
) -> tuple[float, float, float]:
    """XRPO allocator priority (Δ̂, φ, Π) of a prompt holding n rollouts with reward std s.

    Paper: XRPO (2510.06672) S1 [T]. Formula:
        Δ̂ = h(n) − h(n+1)  (s held fixed; 0 when s = 0 or n < 2)
        φ = λ·sqrt(ln(1+T)/n)   (``sqrt_bonus=False``: λ·ln(1+T)/n, a second transcription)
        Π = Δ̂ + φ
    """
    delta = (
        ci_half_width(std, n, alpha) - ci_half_width(std, n + 1, alpha)
        if std > 0 and n >= 2
        else 0.0
    )
    ratio = math.log1p(step) / n
    phi = lam * (math.sqrt(ratio) if sqrt_bonus else ratio)
    return delta, phi, delta + phi


def format_seeded_prompt(prompt: str | list[dict], exemplars: Sequence[Exemplar]) -> Any:
    """``prompt`` with ``exemplars`` before it; unchanged when there are none.

    A string prompt gets a prefix block ("Example k:\\nProblem: …\\nSolution: …");
    a chat prompt (list of messages) gets one earlier user/assistant turn pair per
    exemplar, after any leading system messages, in the content style of its first
    non-system message (plain string, or a list of ``{"type": "text"}`` parts).
    """
    if not exemplars:
        return prompt
    if isinstance(prompt, str):
        blocks = [
            f"Example {i}:\nProblem: {q}\nSolution: {s}" for i, (q, s) in enumerate(exemplars, 1)
        ]
        return "\n\n".join([*blocks, prompt])
    messages = list(prompt)
    first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    as_parts = first < len(messages) and isinstance(messages[first].get("content"), list)

    def content(text: str) -> Any:
        return [{"type": "text", "text": text}] if as_parts else text

    turns = [
        {"role": role, "content": content(text)}
        for q, s in exemplars
        for role, text in (("user", q), ("assistant", s))
    ]
    return messages[:first] + turns + messages[first:]


# ----------------------------------------------------------------- XRPO planner
@dataclass
class _PromptStats:
    """A prompt's rewards so far (Welford), its best reward, and its question while unsolved."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    best: float = -math.inf
    question: str | None = None

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n >= 2 else 0.0


@register_planner("xrpo")
class XrpoPlanner(RolloutPlanner):
    """XRPO's hierarchical allocator (S1) and in-context seeding (S2), across visits.

    Args (defaults: our choices unless a review quotes the paper):
        alpha: CI level of the half-width h(n) (0.05).
        lam: bonus weight λ of φ (0.1, third-party default).
        n0: rollouts per prompt on its first visit (None: budget // N).
        n_min, n_max: bounds on a revisited prompt's rollouts (2, 32).
        sqrt_bonus: φ = λ·sqrt(ln(1+T)/n) (True) or λ·ln(1+T)/n (False).
        num_exemplars: K exemplars for an unsolved prompt (2, reviews; 0 turns seeding off).
        correct_threshold: a reward above it is correct (0.0).
        max_exemplar_chars: stored solutions are cut to this many characters (2000).
        max_corpus: most (question, solution) pairs kept, oldest evicted (10000).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        lam: float = 0.1,
        n0: int | None = None,
        n_min: int = 2,
        n_max: int = 32,
        sqrt_bonus: bool = True,
        num_exemplars: int = 2,
        correct_threshold: float = 0.0,
        max_exemplar_chars: int = 2000,
        max_corpus: int = 10_000,
    ) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0 or lam < 0:
            raise ValueError(f"need 0 < alpha < 1 and lam >= 0, got alpha={alpha}, lam={lam}")
        if not 1 <= n_min <= n_max or (n0 is not None and not n_min <= n0 <= n_max):
            raise ValueError(f"need 1 <= n_min <= n0 <= n_max, got {n_min}, {n0}, {n_max}")
        if num_exemplars < 0 or max_exemplar_chars < 1 or max_corpus < 1:
            raise ValueError("num_exemplars must be >= 0, max_exemplar_chars and max_corpus >= 1")
        self.alpha, self.lam, self.n0, self.n_min, self.n_max = alpha, lam, n0, n_min, n_max
        self.sqrt_bonus, self.num_exemplars = sqrt_bonus, num_exemplars
        self.correct_threshold, self.max_exemplar_chars = correct_threshold, max_exemplar_chars
        self.max_corpus = max_corpus
        self._step = 0
        self._stats: dict[str, _PromptStats] = {}
        self._corpus: dict[str, Exemplar] = {}  # prompt key -> (question, solution), oldest first
        self._index = LexicalIndex()

    # -- allocation
    def priority(self, key: str, extra: int) -> float:
        """Π of a revisited prompt holding its n seen rollouts plus ``extra`` planned now."""
        st = self._stats[key]
        return xrpo_priority(
            st.std, st.n + extra, self._step, self.alpha, self.lam, self.sqrt_bonus
        )[2]

    def plan(self, prompt_keys: list[str], budget: int) -> list[Allocation]:
        n_prompts = len(prompt_keys)
        if n_prompts == 0:
            raise ValueError("xrpo planner needs at least one prompt")
        n0 = self.n0 if self.n0 is not None else min(budget // n_prompts, self.n_max)
        seen = [key in self._stats for key in prompt_keys]
        counts = [self.n_min if s else n0 for s in seen]
        if n0 < self.n_min or sum(counts) > budget or budget > n_prompts * self.n_max:
            raise ValueError(
                f"xrpo cannot spend a budget of {budget} over {n_prompts} prompts: it needs "
                f"n0={n0} per new prompt and n_min={self.n_min} per revisited one, and at most "
                f"n_max={self.n_max} each; change num_generations, n0, n_min or n_max"
            )
        self._step += 1
        self._fill(prompt_keys, seen, counts, budget - sum(counts))
        allocations = [
            Allocation(n, self._exemplars(key)) for key, n in zip(prompt_keys, counts, strict=True)
        ]
        self._last = _allocation_metrics(counts, sum(bool(a.exemplars) for a in allocations))
        self._last["rollout/new_prompts"] = float(n_prompts - sum(seen))
        return allocations

    def _fill(self, keys: list[str], seen: list[bool], counts: list[int], extra: int) -> None:
        """Hand ``extra`` rollouts out one at a time to argmax Π (in place)."""
        heap = [
            (-self.priority(k, c), i)
            for i, (k, c, s) in enumerate(zip(keys, counts, seen, strict=True))
            if s and c < self.n_max
        ]
        heapq.heapify(heap)
        while extra and heap:
            _, i = heapq.heappop(heap)
            counts[i] += 1
            extra -= 1
            if counts[i] < self.n_max:
                heapq.heappush(heap, (-self.priority(keys[i], counts[i]), i))
        while extra:  # revisited prompts are full: the rest goes to first visits, fewest first
            i = min(
                (i for i, s in enumerate(seen) if not s and counts[i] < self.n_max),
                key=lambda i: (counts[i], i),
            )
            counts[i] += 1
            extra -= 1

    # -- seeding
    def _exemplars(self, key: str) -> list[Exemplar]:
        st = self._stats.get(key)
        if self.num_exemplars == 0 or st is None or st.question is None or not self._corpus:
            return []
        question = st.question
        same = " ".join(question.split())
        scores = self._index.scores(question)
        recent_first = list(reversed(self._corpus))
        # Best score first; ties and the zero-score fill (no shared term): most recent first.
        candidates = itertools.chain(
            sorted((k for k in recent_first if k in scores), key=lambda k: -scores[k]),
            (k for k in recent_first if k not in scores),
        )
        usable = (
            k for k in candidates if k != key and " ".join(self._corpus[k][0].split()) != same
        )
        ranked = list(itertools.islice(usable, self.num_exemplars))
        return [self._corpus[k] for k in ranked]

    def observe(
        self, prompt_key: str, question_text: str, rewards: list[float], completions: list[str]
    ) -> None:
        if len(rewards) != len(completions):
            raise ValueError(f"{len(rewards)} rewards for {len(completions)} completions")
        pairs = [
            (float(r), c) for r, c in zip(rewards, completions, strict=True) if math.isfinite(r)
        ]
        if not pairs:  # TRL reports NaN where no reward function applies
            return
        st = self._stats.setdefault(prompt_key, _PromptStats())
        for r, _ in pairs:
            st.n += 1
            delta = r - st.mean
            st.mean += delta / st.n
            st.m2 += delta * (r - st.mean)
            st.best = max(st.best, r)
        solved = st.best > self.correct_threshold
        st.question = None if solved else question_text
        correct = [c for r, c in pairs if r > self.correct_threshold]
        if correct and self.num_exemplars:
            self._insert(prompt_key, question_text, min(correct, key=len))

    def _insert(self, key: str, question: str, solution: str) -> None:
        if len(solution) > self.max_exemplar_chars:
            solution = solution[: self.max_exemplar_chars] + "…"
        old = self._corpus.get(key)
        if old is not None and len(old[1]) <= len(solution):
            return
        if old is None:
            self._index.add(key, question)
        self._corpus[key] = (question, solution)
        while len(self._corpus) > self.max_corpus:
            oldest = next(iter(self._corpus))
            del self._corpus[oldest]
            self._index.remove(oldest)

    # -- state
    def metrics(self) -> dict[str, float]:
        return {
            **self._last,
            "rollout/corpus_size": float(len(self._corpus)),
            "rollout/step": float(self._step),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "prompts": {k: [s.n, s.mean, s.m2, s.best, s.question] for k, s in self._stats.items()},
            "corpus": [[k, q, s] for k, (q, s) in self._corpus.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        self._stats = {
            k: _PromptStats(int(n), mean, m2, best, q)
            for k, (n, mean, m2, best, q) in state["prompts"].items()
        }
        self._corpus, self._index = {}, LexicalIndex()
        for key, question, solution in state["corpus"]:
            self._corpus[key] = (question, solution)
            self._index.add(key, question)
