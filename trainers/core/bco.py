"""BCO's math as pure torch building blocks: implicit reward, running δ, loss, UDM weights.

Paper: Binary Classifier Optimization (Jung et al. 2024, arXiv 2404.04656); reference
code: TRL's removed ``BCOTrainer``. Formulas: ``docs/algorithms/bco.md``.
Each row is (prompt x, completion y, thumbs-up label); lp is the summed (not
length-averaged) completion log-prob::

    r      = β · (lpθ(x,y) − lpref(x,y))
    δ      = count-weighted running mean of every r seen in training, updated with the
             batch's rewards FIRST, then read; detached
    ℓ      = −logσ(r − δ)              label 1 (desirable)
    ℓ      = −logσ(−(r − δ)) · w(x)    label 0 (undesirable); w ≡ 1 without UDM
    w(x)   = clip(p / (1 − p + 1e-8), 0.5, 10),  p = P_clf(desirable | emb(x))
    loss   = mean of ℓ over all B rows

UDM (underlying distribution matching) fits a logistic-regression prompt classifier
once, before training, on prompts sampled from the desirable and undesirable subsets;
its odds reweight thumbs-down rows towards the thumbs-up prompt distribution.

A trainer step: ``r = implicit_rewards(...)``; ``δ = running.update(r, labels,
all_reduce=...)`` (training only; eval reads ``running.delta``); ``bco_loss(...)``.

Departures and choices:
- δ is kept in float64 Python floats (TRL: float32 tensors), so it is JSON-exact in
  checkpoints. The all-reduce sums a float64 [Σr, n] (balanced: [Σr₊, n₊, Σr₋, n₋])
  tensor; every rank must call ``update``, even with an empty batch.
- ``balanced=True`` [our option: the paper's possible δ = ½(E₊[r] + E₋[r])] keeps
  separate running means; until both classes have been seen, δ is the mean of the
  class seen so far (which is also TRL's δ then), and 0 before any reward.
- The classifier is our own torch logistic regression, the minimiser of sklearn's
  objective for ``LogisticRegression(class_weight="balanced")``: (1/n)Σ s_i·BCE_i +
  ‖w‖²/(2Cn), s_i = n/(2·n_class), intercept unpenalised; L-BFGS in float64 until
  max |∇| ≤ 1e-10 (sklearn: tol 1e-4). No feature scaling (neither does sklearn).
- By default 10% of the sampled prompts (stratified by class) are held out to report
  accuracy, and the classifier keeps the fit on the other 90% (TRL fits on all and
  reports training accuracy only; pass ``holdout_fraction=0`` for that). Prompts are
  sampled with replacement, so held-out rows can repeat training rows: the held-out
  accuracy is optimistic when the subsets are small.
- Default embedding: the reference model's last hidden state, mean-pooled over the
  prompt's tokens and L2-normalised (TRL's example: nomic-embed-text, layer-normed and
  cut to 512 dims; we add no layer norm and no truncation).
- ``bco_loss`` reports class-mean rewards as 0 when a class is absent from the batch,
  with the counts beside them so a logger can weight them (TRL logs sums and counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from trainers.core.types import Metrics

T = TypeVar("T")
AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over ranks and returns the sum (e.g. ``lambda t: acc.reduce(t, "sum")``)."""

INITIAL_COUNT = 1e-24  # TRL's RunningMoments start: mean 0, count 1e-24
ODDS_EPS = 1e-8  # TRL's p / (1 − p + 1e-8)


def _check_rows(name: str, x: torch.Tensor, b: int) -> None:
    if x.shape != (b,):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B] = ({b},)")


def _check_labels(labels: torch.Tensor, b: int) -> torch.Tensor:
    _check_rows("labels", labels, b)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError("labels must be a bool (or 0/1 integer) tensor; True = desirable")
    return labels.bool()


# ----------------------------------------------------------------------------- running δ
class RunningRewardMean:
    """δ: the count-weighted running mean of all implicit rewards seen (TRL's RunningMoments).

    balanced: False (TRL) δ = mean of every reward, both labels pooled. True [proposal]
        δ = ½(mean₊ + mean₋) over thumbs-up / thumbs-down rewards; before both classes
        have been seen, δ is the seen class's mean (0 before any reward).
    """

    def __init__(self, *, balanced: bool = False):
        self.balanced = balanced  # one [mean, count] per stream: "all", or "pos" and "neg"
        self._stats = {k: [0.0, INITIAL_COUNT] for k in self._streams()}

    def _streams(self) -> tuple[str, ...]:
        return ("pos", "neg") if self.balanced else ("all",)

    @property
    def delta(self) -> float:
        """The current δ (read it without updating in eval)."""
        if not self.balanced:
            return self._stats["all"][0]
        seen = [m for m, c in self._stats.values() if c >= 1.0]
        return sum(seen) / len(seen) if seen else 0.0

    def update(
        self,
        rewards: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        all_reduce: AllReduce | None = None,
    ) -> float:
        """Fold a batch's rewards (and other ranks', via ``all_reduce``) in; return the new δ.

        rewards: [B] implicit rewards (detached here); B may be 0 on a rank.
        labels:  [B] bool, True = desirable; required when ``balanced``, else ignored.
        all_reduce: sums a float64 stats tensor over ranks; None for one process.
        One host sync (the reduced stats are read back as floats).
        """
        r = rewards.detach().reshape(-1).to(torch.float64)
        if self.balanced:
            if labels is None:
                raise ValueError("balanced=True needs the labels to split the rewards")
            pos = _check_labels(labels.reshape(-1), r.numel())
            parts = [r[pos], r[~pos]]
        else:
            parts = [r]
        local = torch.stack([t for p in parts for t in (p.sum(), r.new_tensor(p.numel()))])
        totals = (all_reduce(local) if all_reduce is not None else local).tolist()
        for i, key in enumerate(self._streams()):
            self._merge(key, totals[2 * i], totals[2 * i + 1])
        return self.delta

    def _merge(self, key: str, batch_sum: float, batch_count: float) -> None:
        if batch_count <= 0:
            return
        mean, count = self._stats[key]
        total = count + batch_count
        self._stats[key] = [mean + (batch_sum / batch_count - mean) * batch_count / total, total]

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (floats only) for ``running.json`` in a checkpoint."""
        state: dict[str, Any] = {"balanced": self.balanced}
        for key, (mean, count) in self._stats.items():
            state[f"mean_{key}"], state[f"count_{key}"] = mean, count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["balanced"]) != self.balanced:
            raise ValueError(
                f"checkpoint has balanced={state['balanced']} but this run has "
                f"balanced={self.balanced}; resume with the same setting"
            )
        self._stats = {
            k: [float(state[f"mean_{k}"]), float(state[f"count_{k}"])] for k in self._streams()
        }


# ----------------------------------------------------------------------------- loss
def implicit_rewards(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """r = β(lpθ − lpref) [B], differentiable in ``policy_logps`` (the reference is detached).

    policy_logps, ref_logps: [B] summed completion log-probs.
    """
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be [B]; got {tuple(policy_logps.shape)}")
    _check_rows("ref_logps", ref_logps, policy_logps.shape[0])
    return beta * (policy_logps - ref_logps.detach())


def bco_row_losses(
    rewards: torch.Tensor,
    labels: torch.Tensor,
    delta: float | torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row BCO loss ℓ [B]: softplus(−(r−δ)) for label 1, softplus(r−δ)·w for label 0.

    rewards: [B] implicit rewards r; labels: [B] bool; delta: float or 0-dim (detached).
    weights: [B] UDM weights or None; entries at desirable rows are ignored (never weighted).
    Computed in at least float32 (−logσ(z) = softplus(−z), stable for any z).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B]; got {tuple(rewards.shape)}")
    b = rewards.shape[0]
    pos = _check_labels(labels, b)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    z = rewards.to(dtype) - torch.as_tensor(delta, dtype=dtype, device=rewards.device).detach()
    losses = torch.where(pos, F.softplus(-z), F.softplus(z))
    if weights is None:
        return losses
    _check_rows("weights", weights, b)
    w = torch.where(pos, torch.ones_like(z), weights.detach().to(dtype))
    return losses * w


def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    delta: float | torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """BCO batch loss: the mean of ``bco_row_losses`` over all B ≥ 1 rows, plus metrics.

    policy_logps: [B] summed completion log-probs under πθ (differentiable).
    ref_logps:    [B] the same under πref.
    labels:       [B] bool, True = desirable (thumbs-up).
    delta:        δ already updated with this batch (``RunningRewardMean.update``).
    weights:      [B] UDM weights (``density_ratio_weights``) or None.
    Metrics (detached 0-dim): rewards/chosen, rewards/rejected (class means, 0 when the
    class is absent), count/chosen, count/rejected, delta, and with weights
    udm_weight/min, /max, /mean over the rejected rows (1 when there are none).
    """
    if policy_logps.dim() != 1 or policy_logps.shape[0] == 0:
        raise ValueError("policy_logps must be a non-empty [B] tensor")
    r = implicit_rewards(policy_logps, ref_logps, beta=beta)
    losses = bco_row_losses(r, labels, delta, weights=weights)
    metrics = _bco_metrics(r.detach(), labels.bool(), delta, weights)
    return losses.mean(), metrics


def _class_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _bco_metrics(
    r: torch.Tensor, pos: torch.Tensor, delta: float | torch.Tensor, weights: torch.Tensor | None
) -> Metrics:
    dtype = torch.promote_types(r.dtype, torch.float32)
    r = r.to(dtype)
    metrics = {
        "rewards/chosen": _class_mean(r, pos),
        "rewards/rejected": _class_mean(r, ~pos),
        "count/chosen": pos.sum().to(dtype),
        "count/rejected": (~pos).sum().to(dtype),
        "delta": torch.as_tensor(delta, dtype=dtype, device=r.device).detach().clone(),
    }
    if weights is not None:
        w, neg = weights.detach().to(dtype), ~pos
        lo = torch.where(neg, w, torch.full_like(w, float("inf"))).amin()
        hi = torch.where(neg, w, torch.full_like(w, float("-inf"))).amax()
        for name, value in (("min", lo), ("max", hi), ("mean", _class_mean(w, neg))):
            metrics[f"udm_weight/{name}"] = torch.where(neg.any(), value, 1.0)
    return metrics


# ----------------------------------------------------------------------------- UDM
def density_ratio_weights(
    p_desirable: torch.Tensor, *, min_ratio: float = 0.5, max_ratio: float = 10.0
) -> torch.Tensor:
    """w = clip(p / (1 − p + 1e-8), min_ratio, max_ratio), same shape as ``p_desirable``.

    p_desirable: [B] classifier probabilities that each row's prompt is from the
    desirable subset. p = 0.5 gives w = 0.5/(0.5 + 1e-8) ≈ 1 (TRL's epsilon).
    """
    if not 0.0 <= min_ratio <= max_ratio:
        raise ValueError(f"need 0 <= min_ratio <= max_ratio; got {min_ratio}, {max_ratio}")
    p = p_desirable.detach()
    return (p / (1 - p + ODDS_EPS)).clamp(min=min_ratio, max=max_ratio)


def mean_pooled_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens, L2-normalised: hidden [B,T,H], mask [B,T] -> [B,H] (≥ float32).

    A row with no valid token gives the zero vector. Detached.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"need hidden [B,T,H] and mask [B,T]; got {tuple(hidden.shape)}, {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.detach().to(dtype).unsqueeze(-1)
    pooled = (hidden.detach().to(dtype) * m).sum(1) / m.sum(1).clamp(min=1.0)
    return F.normalize(pooled, dim=-1)


def sample_prompts(
    desirable: Sequence[T], undesirable: Sequence[T], size: int, seed: int
) -> tuple[list[T], torch.Tensor]:
    """Draw min(len, size) prompts from each subset WITH replacement (TRL's np.random.choice).

    Returns (prompts, labels [n₊ + n₋] bool): desirable first (True), then undesirable.
    Seeded by ``seed`` alone, so every rank draws the same sample.
    """
    if size < 1 or not desirable or not undesirable:
        raise ValueError("UDM needs size >= 1 and at least one desirable and one undesirable row")
    gen = torch.Generator().manual_seed(seed)
    picked: list[T] = []
    for subset in (desirable, undesirable):
        n = min(len(subset), size)
        picked.extend(subset[i] for i in torch.randint(len(subset), (n,), generator=gen).tolist())
    return picked, torch.arange(len(picked)) < min(len(desirable), size)


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, C: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, float]:
    """Balanced, L2 logistic regression: x [N,D] float64, y [N] bool -> (w [D], b)."""
    n, n_pos = y.numel(), int(y.sum())
    s = torch.where(y, n / (2.0 * n_pos), n / (2.0 * (n - n_pos))).to(x.dtype)
    target = y.to(x.dtype)
    params = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(  # stops when max |∇| ≤ tol (the loss-change test is off)
        [params],
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ params[:-1] + params[-1]
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (s * bce).sum() / n + params[:-1].square().sum() / (2.0 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    fitted = params.detach()
    return fitted[:-1].clone(), float(fitted[-1])


def _stratified_split(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """[N] bool mask of held-out rows: round(fraction·n_c) per class, ≥ 1 left to train on."""
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros_like(y)
    for cls in (True, False):
        idx = torch.nonzero(y == cls).flatten()
        k = min(round(fraction * idx.numel()), idx.numel() - 1)
        held[idx[torch.randperm(idx.numel(), generator=gen)[: max(k, 0)]]] = True
    return held


class PromptClassifier:
    """P(desirable | prompt embedding): logistic regression fitted once, saved, never refitted.

    C: inverse L2 strength (sklearn's default 1.0); class weights are "balanced".
    """

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-10):
        if C <= 0:
            raise ValueError(f"C must be > 0; got {C}")
        self.C, self.max_iter, self.tol = C, max_iter, tol
        self.weight: torch.Tensor | None = None  # [D] float64
        self.bias = 0.0
        self.report: dict[str, float] = {}

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    def fit(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor,
        *,
        holdout_fraction: float = 0.1,
        seed: int = 0,
    ) -> dict[str, float]:
        """Fit on emb [N,D] with labels [N] (True = desirable); return and keep a report.

        ``holdout_fraction`` of each class (stratified, seeded) is held out and the fit
        uses the rest; report: train_accuracy, holdout_accuracy (when held out),
        n_train, n_holdout.
        """
        if emb.dim() != 2:
            raise ValueError(f"emb must be [N,D]; got {tuple(emb.shape)}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1); got {holdout_fraction}")
        y = _check_labels(labels.reshape(-1), emb.shape[0]).cpu()
        if y.all() or not y.any():
            raise ValueError("the classifier needs both desirable and undesirable prompts")
        x = emb.detach().cpu().to(torch.float64)
        held = _stratified_split(y, holdout_fraction, seed)
        self.weight, self.bias = _fit_logistic(
            x[~held], y[~held], C=self.C, max_iter=self.max_iter, tol=self.tol
        )
        self.report = {"train_accuracy": self._accuracy(x[~held], y[~held])}
        if held.any():
            self.report["holdout_accuracy"] = self._accuracy(x[held], y[held])
        self.report.update(n_train=float((~held).sum()), n_holdout=float(held.sum()))
        return dict(self.report)

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((self.predict_proba(x) > 0.5) == y).double().mean())

    def predict_proba(self, emb: torch.Tensor) -> torch.Tensor:
        """p_desirable [N] = σ(emb·w + b) for emb [N,D]; dtype ≥ float32, on emb's device."""
        if self.weight is None:
            raise RuntimeError("PromptClassifier is not fitted; call fit() or load_state_dict()")
        if emb.dim() != 2 or emb.shape[1] != self.weight.numel():
            raise ValueError(f"emb must be [N,{self.weight.numel()}]; got {tuple(emb.shape)}")
        logits = emb.detach().to(torch.float64) @ self.weight.to(emb.device) + self.bias
        return torch.sigmoid(logits).to(torch.promote_types(emb.dtype, torch.float32))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (weight as a list of floats): saved with checkpoints."""
        if self.weight is None:
            raise RuntimeError("nothing to save: the classifier is not fitted")
        state = {"C": self.C, "weight": self.weight.tolist(), "bias": self.bias}
        return state | {"report": dict(self.report)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.C = float(state["C"])
        self.weight = torch.tensor(state["weight"], dtype=torch.float64)
        self.bias = float(state["bias"])
        self.report = {k: float(v) for k, v in state["report"].items()}
