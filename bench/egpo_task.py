"""The non-transitive task EGPO's end-to-end test and benchmarks share.

Three answer styles by the completion's first non-blank character: ``a`` (a letter
a-s, either case), ``b`` (a letter t-z) and ``c`` (anything else: digits, punctuation,
other bytes, an empty answer). The three cover every text, so the game has no dominated
style; a ``pattern_table`` judge (two patterns, ``c`` its no-match class) prefers them
in a cycle, a ≻ b ≻ c ≻ a, at ``STRENGTH``.

Because the judge sees only the style, the style mix per prompt is all training can
change, and the game reduces exactly to the tabular 3-cycle of
``docs/algorithms/egpo.md`` per prompt: the
regularised equilibrium over sequences, π*(y) ∝ π_ref(y)·exp(P(y ≻ π*)/β), puts on each
style c the mass π*(c) ∝ π_ref(c)·exp(P(c ≻ π*)/β), with π_ref(c) the base model's
style mix for that prompt (``equilibrium``).

Measurement is exact, not sampled: a completion's style is fixed by its first token
unless that token decodes to nothing after stripping (blank, a skipped special token),
so ``style_probabilities`` sums the policy's next-token probabilities (temperature 1,
no top-k: how the opponent y'' is drawn) per style, following blank first tokens one
token further. Win-rates against the base (``win_rate``) are the exact expectation of
the judge's table under both policies, pairs on the same prompt.
"""

from __future__ import annotations

from typing import Any

STRENGTH = 0.9
# a ≻ b ≻ c ≻ a: P[i][j] = P(style i ≻ style j)
_S, _W = STRENGTH, round(1 - STRENGTH, 10)
JUDGE = {
    "type": "pattern_table",
    "classes": [
        {"name": "a", "pattern": "^[a-sA-S]"},
        {"name": "b", "pattern": "^[t-zT-Z]"},
    ],
    "other": "c",
    "preferences": [
        [0.5, _S, _W],
        [_W, 0.5, _S],
        [_S, _W, 0.5],
    ],
}
CLASSES = ("a", "b", "c")
P = JUDGE["preferences"]
BETA = 0.2
PROMPTS = 128
# The end-to-end test's training settings (the curve benchmark reuses them): every step
# sees every prompt once, y and y' are drawn like y'' (temperature 1, no top-k) so every
# first token can be sampled, one token is the whole answer (the style is its first
# character; a longer answer only adds tokens that h sums and the target ignores), and
# the learning rate decays to 0 so the last iterations settle instead of wandering.
HYPERPARAMETERS: dict[str, Any] = {
    "judge": JUDGE,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "linear",
    "batch_size": PROMPTS,
    "max_steps": 100,
    "max_new_tokens": 1,
    "max_seq_length": 64,
    "temperature": 1.0,
    "top_k": 0,
    "beta": BETA,
    "normalize_logprobs": False,  # the sequence-level objective the equilibrium is defined for
}


def prompt_rows(n: int) -> list[dict]:
    topics = ("goats", "rivers", "bread", "winter", "letters", "mountains", "lamps", "boats")
    return [
        {"messages": [{"role": "user", "content": f"Tell me about {topics[i % 8]}, part {i}."}]}
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- exact measures
def style_probabilities(model_dir, n_prompts: int | None = None, depth: int | None = None):
    """[n_prompts, 3] float64: each training prompt's exact style mix under the policy
    saved in ``model_dir`` (evaluated in float64; RoPE makes left padding harmless).

    ``depth`` (default: the task's ``max_new_tokens``) is how many tokens a completion may
    have: a blank first token is followed one more token while depth allows; a completion
    that stays blank (or ends at EOS) is style ``c``, as the judge reads an empty text.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.algorithms.egpo.rollout import eos_ids_of
    from trainers.algorithms.tokens import prompt_ids as prompt_token_ids
    from trainers.judges.registry import build_judge

    depth = depth or HYPERPARAMETERS["max_new_tokens"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    judge = build_judge(JUDGE, seed=0)
    eos = eos_ids_of(tok, model)
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(len(tok))]
    style = torch.tensor([judge.class_index(t) for t in texts])
    blank = torch.tensor([not t.strip() and i not in eos for i, t in enumerate(texts)])
    onehot = torch.nn.functional.one_hot(style, len(CLASSES)).double()  # [V, 3]
    empty = len(CLASSES) - 1  # what the judge makes of an empty completion
    assert judge.class_index("") == empty

    @torch.no_grad()
    def mix_after(seqs: list[list[int]], left: int) -> torch.Tensor:
        """[len(seqs), 3]: the style mix of completions continuing each sequence."""
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # left padding, as the sampler does
            ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].double()
        probs = torch.softmax(logits, -1)  # [n, V]
        out = probs[:, ~blank] @ onehot[~blank]
        go_on = blank.nonzero().flatten().tolist()
        if left > 1:
            nxt = mix_after([[*s, t] for s in seqs for t in go_on], left - 1)
            out += (probs[:, go_on, None] * nxt.view(len(seqs), len(go_on), -1)).sum(1)
        else:
            out[:, empty] += probs[:, blank].sum(-1)
        return out

    rows = prompt_rows(n_prompts or PROMPTS)
    return mix_after([prompt_token_ids(tok, r["messages"]) for r in rows], depth)


def equilibrium(reference, beta: float = BETA, iterations: int = 4000):
    """[n, 3]: the regularised equilibrium's style mix for each row of ``reference``.

    Extragradient (mirror-prox) iterations from θ_ref, all rows at once (column-wise:
    ``mirror_prox_step`` multiplies P by the opponent), checked with the fixed-point
    residual of ``trainers.core.egpo``.
    """
    import torch

    from trainers.core.egpo import equilibrium_residual, mirror_prox_step

    ref = torch.as_tensor(reference, dtype=torch.float64).clamp(min=1e-12).log().T  # [3, n]
    table = torch.tensor(P, dtype=torch.float64)
    eta = min(1.0, 0.5 / beta)
    theta = ref.clone()
    for _ in range(iterations):
        half = mirror_prox_step(theta, ref, table, theta.softmax(0), eta=eta, beta=beta)
        theta = mirror_prox_step(theta, ref, table, half.softmax(0), eta=eta, beta=beta)
    for t, r in zip(theta.T, ref.T, strict=True):
        assert equilibrium_residual(t, r, table, beta=beta) < 1e-9
    return theta.softmax(0).T


def win_rate(policy, base) -> float:
    """Mean over prompts of the exact judged P(policy ≻ base) on that prompt."""
    import torch

    table = torch.tensor(P, dtype=torch.float64)
    return float(torch.einsum("ni,ij,nj->n", policy, table, base).mean())


def tv(p, q) -> float:
    """Mean over prompts of the total-variation distance between two style mixes."""
    return float(0.5 * (p - q).abs().sum(-1).mean())


def mean_mix(p) -> list[float]:
    return [round(float(x), 3) for x in p.mean(0)]


def sample_styles(model_dir, n_per_prompt: int, prompts: int | None = None, seed: int = 0):
    """Styles of sampled completions (temperature 1, no top-k), to check the exact mix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.algorithms.egpo.rollout import TransformersSampler
    from trainers.algorithms.tokens import prompt_ids as prompt_token_ids
    from trainers.judges.registry import build_judge

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = [prompt_token_ids(tok, r["messages"]) for r in prompt_rows(prompts or PROMPTS)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = TransformersSampler(tok, HYPERPARAMETERS["max_new_tokens"]).sample(
            model, ids, n_per_prompt, 1.0, 0
        )
    texts = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    return build_judge(JUDGE, seed=0).classify(texts)
