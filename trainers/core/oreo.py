"""OREO's losses as pure torch building blocks: soft-Bellman residuals, value and policy losses.

Paper: Wang et al. 2024, "Offline Reinforcement Learning for LLM Multi-Step Reasoning"
(OREO, arXiv 2412.16145), eq. 8-10; formulas: ``docs/algorithms/oreo.md``.
Training-loop glue (models, optimisers, data) lives in the trainer, not here.

B trajectories are padded to T response tokens; ``mask`` [B,T] is 1 on a row's valid
response tokens (left, right or any padding). l_t = log πθ(a_t|s_t) − log πref(a_t|s_t),
R is the terminal reward of the trajectory (R_t = R for every t: no discount, V(s_T) = 0),
S_t = Σ_{i≥t} l_i the suffix sum, and a *state set* 𝒮 ⊆ valid tokens marks where the
residual is evaluated. For a state t ∈ 𝒮 with next state n(t) (T_b if none)::

    res_t = V(s_t) − R + β·( Σ_{t≤i<n(t)} l_i + sg[S_{n(t)}] )        (forward: V − R + β·S_t)
    loss  = (1/B) Σ_b (1/|𝒮_b|) Σ_{t∈𝒮_b} res_t²  [+ α·(1/B) Σ_b (1/T_b) Σ_t KL_t]

The three variants differ only in 𝒮 (registry ``OREO_VARIANTS``, one signature):

=========  ===========================  =================================  ========
variant    policy states 𝒮              gradient of L_π reaches            α paper
=========  ===========================  =================================  ========
token      every valid token (eq. 9)    l_t only (rest of suffix sg)        0.01
step       first token of each step     the step's own tokens' l            0.1
response   first valid token (eq. 10)   every l (no stop-gradient, DPO-ish) 0.3
=========  ===========================  =================================  ========

``value_loss`` (eq. 8) uses sg[l] and gradient into V; its states are every valid token,
or the step starts when ``step_ids`` is given (the authors' code trains the critic on the
policy's state set for step level, and on every token for token and response level).

Departures and choices (the paper and the authors' code are silent on these):
- Losses are computed in at least float32 (bf16 suffix sums over 2k tokens lose digits).
- Padded positions of ``values``/``logratio`` may hold anything (NaN included): they are
  replaced by 0 on entry, so they reach neither the loss nor the gradient.
- A row with no state contributes 0 and still counts in the 1/B (like ``grpo`` aggregation);
  gradient accumulation is the caller's (divide by the number of micro-batches).
- The KL term is always averaged over every valid token, whatever the variant (as in the
  code). The exact full-vocabulary KL (the scripts' ``--unbiased_kl``) comes from the fused
  log-prob kernel, not this module; ``kl=None`` falls back to ``sampled_kl_k3(logratio)``.
- Steps: a step ends right after a delimiter, which belongs to the step it ends; no empty
  trailing step (the code's ``split("\\n")`` adds one made of the appended " "+EOS when a
  response ends in "\\n"); tokens past the text join the last step. Default delimiters are
  GSM8K's ("\\n",), the unit the step-level beam search samples for both datasets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

import torch
from torch import nn

from trainers.core.types import Metrics, lookup, masked_mean, registration

OreoLossFn = Callable[..., tuple[torch.Tensor, Metrics]]

OREO_VARIANTS: dict[str, OreoLossFn] = {}
GSM8K_DELIMITERS: tuple[str, ...] = ("\n",)
MATH_DELIMITERS: tuple[str, ...] = ("\n", ". ", ".$ ")
DEFAULT_DELIMITERS = GSM8K_DELIMITERS


def register_oreo_variant(name: str) -> Callable[[OreoLossFn], OreoLossFn]:
    """Register ``fn(values, rewards, logratio, mask, *, beta, alpha, kl=None, step_ids=None)
    -> (policy loss, metrics)``."""
    return registration(OREO_VARIANTS, "OREO variant", name)


def get_oreo_variant(name: str) -> OreoLossFn:
    return lookup(OREO_VARIANTS, "OREO variant", name)


# ----------------------------------------------------------------------------- tensor helpers
def _check(values, rewards, logratio, mask, **optional: torch.Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B,T]; got shape {tuple(mask.shape)}")
    if rewards.shape != mask.shape[:1]:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected ({mask.shape[0]},)")
    for name, t in {"values": values, "logratio": logratio, **optional}.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(mask.shape)}")


def _clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x in at least float32, 0 on padding (junk there gets no gradient either)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def suffix_sums(logratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """S_t = Σ_{i≥t, m_i=1} l_i within each row; 0 on padding.

    Shapes: logratio l [B,T], mask [B,T] -> [B,T]. Example: [0.5, −0.2, 0.1] -> [0.4, −0.1, 0.1].
    """
    m = mask.bool()
    x = torch.where(m, logratio, torch.zeros((), dtype=logratio.dtype, device=logratio.device))
    return torch.where(m, x.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(x))


def _next_state(states: torch.Tensor) -> torch.Tensor:
    """[B,T] bool -> [B,T] long: index of the first state strictly after t, or T if none."""
    B, T = states.shape
    pos = torch.arange(T, device=states.device).expand(B, T)
    idx = torch.where(states, pos, T)
    after = torch.cat([idx[:, 1:], idx.new_full((B, 1), T)], dim=1)
    return after.flip(-1).cummin(-1).values.flip(-1)


def first_valid(mask: torch.Tensor) -> torch.Tensor:
    """[B,T] -> bool [B,T], True at each row's first valid token (the state s_0)."""
    m = mask.bool()
    return m & (m.long().cumsum(-1) == 1)


def step_starts(mask: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B,T], True at each step's first token: a row's first valid token and every valid
    token whose step id differs from the previous *valid* token's (padding is skipped).

    step_ids: [B,T] int, any values on padding; e.g. ``token_step_ids`` of each row.
    Example: mask [0,1,1,1,1], ids [9,0,0,1,1] -> [F,T,F,T,F].
    """
    m = mask.bool()
    B, T = m.shape
    pos = torch.arange(T, device=m.device).expand(B, T)
    last_valid = torch.where(m, pos, -1).cummax(-1).values
    prev = torch.cat([last_valid.new_full((B, 1), -1), last_valid[:, :-1]], dim=1)
    prev_id = step_ids.gather(1, prev.clamp(min=0))
    return m & ((prev < 0) | (step_ids != prev_id))


# ----------------------------------------------------------------------------- residuals
def bellman_residuals(
    values: torch.Tensor,
    rewards: torch.Tensor,
    logratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    states: torch.Tensor | None = None,
) -> torch.Tensor:
    """res_t = V_t − R + β·(Σ_{t≤i<n(t)} l_i + sg[S_{n(t)}]) at the states, 0 elsewhere.

    values [B,T] V(s_t); rewards [B] R; logratio [B,T] l; mask [B,T]; states [B,T] bool
    (default: every valid token; must lie inside mask). n(t) is the next state after t.
    Nothing is detached here beyond sg[S_{n(t)}]: callers detach V or l. -> [B,T].
    Worked example (β=0.1, R=1, l=[0.5,−0.2,0.1], V=[0.6,0.7,0.95]): [−0.36, −0.31, −0.04].
    """
    _check(values, rewards, logratio, mask, states=states)
    m = mask.bool()
    st = m if states is None else states.bool() & m
    v, lr = _clean(values, m), _clean(logratio, m)
    s = torch.cat([suffix_sums(lr, m), lr.new_zeros(lr.shape[0], 1)], dim=1)  # S_T = 0
    s_next = s.gather(1, _next_state(st))
    own = s[:, :-1] - s_next  # Σ of l over [t, n(t)): the only part that keeps its gradient
    res = v - rewards.to(v.dtype)[:, None] + beta * (own + s_next.detach())
    return torch.where(st, res, torch.zeros_like(res))


def _row_mean(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b (1/|where_b|) Σ_t x_t, x already 0 off ``where``. [B,T] -> scalar."""
    return (x.sum(-1) / where.sum(-1).clamp(min=1).to(x.dtype)).mean()


def sampled_kl_k3(logratio: torch.Tensor) -> torch.Tensor:
    """Sampled-token k3 estimate of KL(πθ‖πref): exp(−l) + l − 1 (≥ 0, 0 iff l = 0).

    Shapes: [B,T] -> [B,T]; ∂/∂l = 1 − exp(−l). The scripts use the exact full-vocabulary
    KL instead, which the fused log-prob kernel computes (pass it as ``kl``).
    Equals ``trainers.core.objectives.k3_kl(logps, ref_logps)``.
    """
    return torch.exp(-logratio) + logratio - 1


# ----------------------------------------------------------------------------- losses
def value_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    logratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Critic loss, eq. 8: L_V = (1/B) Σ_b (1/|𝒮_b|) Σ_{t∈𝒮_b} (V(s_t) − R + β·S_t)².

    values [B,T] (differentiable), rewards [B], logratio [B,T] (detached here), mask [B,T],
    step_ids [B,T] or None: 𝒮 is every valid token, or the step starts when step_ids is given.
    ∂L_V/∂V_t = 2·res_t/(B·|𝒮_b|). Zero head and πθ = πref (step 0): L_V = mean R².
    """
    _check(values, rewards, logratio, mask, step_ids=step_ids)
    m = mask.bool()
    states = m if step_ids is None else step_starts(m, step_ids)
    res = bellman_residuals(values, rewards, logratio.detach(), m, beta=beta, states=states)
    loss = _row_mean(res.square(), states)
    v, some = _clean(values, m).detach(), states.any()
    return loss, {
        "value_loss": loss.detach(),
        "residual_mean": masked_mean(res.detach(), states),
        "value_mean": masked_mean(v, states),
        "value_max": torch.where(some, v.masked_fill(~states, float("-inf")).max(), 0.0),
        "value_min": torch.where(some, v.masked_fill(~states, float("inf")).min(), 0.0),
    }


def _policy_loss_at(
    states: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    logratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    kl: torch.Tensor | None,
) -> tuple[torch.Tensor, Metrics]:
    """Shared body of the variants: mean-square residual at ``states`` (sg[V]) + α·KL."""
    m = mask.bool()
    res = bellman_residuals(values.detach(), rewards, logratio, m, beta=beta, states=states)
    bellman = _row_mean(res.square(), states)
    if kl is None:
        kl = sampled_kl_k3(_clean(logratio, m))
    kl_mean = _row_mean(_clean(kl, m), m)
    loss = bellman + alpha * kl_mean if alpha else bellman
    metrics = {
        "policy_loss": bellman.detach(),
        "kl": kl_mean.detach(),
        "residual_mean": masked_mean(res.detach(), states),
    }
    return loss, metrics


def _no_step_ids(variant: str, step_ids: torch.Tensor | None) -> None:
    if step_ids is not None:
        raise ValueError(f"step_ids were given to the '{variant}' variant; use variant 'step'")


@register_oreo_variant("token")
def policy_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    logratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    kl: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level policy loss, eq. 9 (the default):

    L_π = (1/B) Σ_b [ (1/T_b) Σ_t (sg[V_t] − R + β·l_t + β·sg[Σ_{i>t} l_i])² + α·(1/T_b) Σ_t KL_t ]

    values [B,T] (detached here), rewards [B], logratio [B,T] (differentiable), mask [B,T],
    kl [B,T] per-token KL(πθ‖πref) or None (-> ``sampled_kl_k3(logratio)``), step_ids must
    be None. Forward without KL equals ``value_loss``; ∂L_π/∂l_t = 2β·res_t/(B·T_b).
    """
    _check(values, rewards, logratio, mask, kl=kl)
    _no_step_ids("token", step_ids)
    m = mask.bool()
    return _policy_loss_at(m, values, rewards, logratio, m, beta=beta, alpha=alpha, kl=kl)


@register_oreo_variant("step")
def step_policy_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    logratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    kl: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Step-level policy loss (code's ``--step_level``): the token-level loss with states at
    the step starts t_k and each step's own log-ratios in place of l_t:

    res_k = sg[V(s_{t_k})] − R + β·Σ_{t_k≤i<t_{k+1}} l_i + β·sg[S_{t_{k+1}}],
    L_π = (1/B) Σ_b [ (1/K_b) Σ_k res_k² + α·(1/T_b) Σ_t KL_t ].

    step_ids [B,T] (required): a step is a run of equal ids (see ``step_starts``).
    Example: steps {a0},{a1,a2} of the worked example: res = [−0.36, −0.31], loss 0.11285.
    """
    _check(values, rewards, logratio, mask, kl=kl, step_ids=step_ids)
    if step_ids is None:
        raise ValueError("the 'step' variant needs step_ids [B,T] (see token_step_ids)")
    m = mask.bool()
    states = step_starts(m, step_ids)
    return _policy_loss_at(states, values, rewards, logratio, m, beta=beta, alpha=alpha, kl=kl)


@register_oreo_variant("response")
def response_policy_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    logratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    kl: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Response-level policy loss, eq. 10: the residual at s_0 only, with no stop-gradient:

    L_π = (1/B) Σ_b [ (sg[V(s_0)] − R + β·Σ_t l_t)² + α·(1/T_b) Σ_t KL_t ]

    (DPO-like: every l_t gets 2β·res_0/B). step_ids must be None.
    Worked example: res_0 = −0.36 -> 0.1296.
    """
    _check(values, rewards, logratio, mask, kl=kl)
    _no_step_ids("response", step_ids)
    m = mask.bool()
    states = first_valid(m)
    return _policy_loss_at(states, values, rewards, logratio, m, beta=beta, alpha=alpha, kl=kl)


# ----------------------------------------------------------------------------- steps
def split_steps(text: str, delimiters: Sequence[str] = DEFAULT_DELIMITERS) -> list[tuple[int, int]]:
    """Split a response into steps: [(start_char, end_char)) spans covering ``text``.

    A step ends right after the first delimiter that ends it (the delimiter belongs to the
    step it closes, as in the authors' data code); the rest after the last delimiter is the
    last step; no empty step. Defaults: GSM8K's ("\\n",); ``MATH_DELIMITERS`` adds ". ", ".$ ".
    Example: "a\\nb. c" with MATH_DELIMITERS -> [(0, 2), (2, 5), (5, 6)].
    """
    delims = tuple(d for d in delimiters if d)
    if not delims:
        raise ValueError("delimiters must hold at least one non-empty string")
    spans: list[tuple[int, int]] = []
    start = 0
    for end in range(1, len(text) + 1):
        if text.endswith(delims, start, end):
            spans.append((start, end))
            start = end
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def token_step_ids(
    offsets: Sequence[tuple[int, int]], step_spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Step index of each response token, 0..K−1 in order (steps with no token are dropped).

    offsets: the tokenizer's (start, end) char offsets of the response tokens, relative to
    the response text (subtract len(prompt) from prompt+response offsets).
    A token belongs to the last step that starts before its end, i.e. a token containing a
    step's first character starts that step (the code's ``char_to_token``); tokens past the
    text (the appended " "+EOS) join the last step; an empty-offset token (a special token,
    offsets (0, 0)) joins the previous token's step.
    Example: offsets [(0,2),(2,3),(3,5),(5,5)], spans [(0,3),(3,5)] -> [0, 0, 1, 1].
    """
    starts = [s for s, _ in step_spans]
    raw: list[int] = []
    for begin, end in offsets:
        if end <= begin:
            raw.append(raw[-1] if raw else 0)
        else:
            raw.append(max(bisect_left(starts, end) - 1, 0))
    dense: dict[int, int] = {}
    return [dense.setdefault(k, len(dense)) for k in raw]


# ----------------------------------------------------------------------------- critic head
class ValueHead(nn.Module):
    """OREO's critic head: ``Linear(hidden → 1, bias=False)``, zero-initialised (V ≡ 0 at
    step 0, so L_V starts at mean R²). It sits on a full copy of the SFT model (or a LoRA
    of it on 7B); the backbone is the trainer's business.
    """

    def __init__(self, hidden_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> V [...] at every position."""
        return self.linear(hidden).squeeze(-1)

    def values_at_states(self, hidden: torch.Tensor, state_index: torch.Tensor) -> torch.Tensor:
        """V(s_t) read at the last token of each prefix s_t = (x, a_<t).

        hidden [B,T_full,H] the backbone's last hidden states over prompt+response;
        state_index [B,T] long, the position in T_full of the last token of s_t, i.e. one
        before response token t (the last prompt token for t = 0); padded positions may hold
        any index in [0, T_full). -> [B,T].
        This is the training-time convention. The authors' search scripts read index −1 of
        a value array that has already dropped its final position, which scores a prefix one
        token early; a beam search here should read V at the prefix's own last token.
        """
        if state_index.dim() != 2 or state_index.shape[0] != hidden.shape[0]:
            raise ValueError(f"state_index must be [B,T] with B={hidden.shape[0]}")
        idx = state_index.long()[..., None].expand(-1, -1, hidden.shape[-1])
        return self(hidden.gather(1, idx))
