"""Sampling temperature rules: ``constant`` and HAPO's Adaptive Temperature Sampling (ATS).

Paper: HAPO (2509.16591) S3; ``docs/algorithms/hapo.md``. Per generated token t:

    H_t = entropy of the untempered next-token distribution softmax(logits_t)
    h̃_t = entropy_signal(H_t, stats)     (``trainers.core.entropy``: h̃, or the raw z)
    T_t = T_base·(1 + τ·clip(h̃_t, −1, 1))

so high-entropy ("forking") tokens are sampled hotter and confident ones colder. The
statistics (pivot P, RMS, positive/negative scales) are those of the previous step's
policy entropies over valid completion tokens; the first step, having none, samples
at T_base. Defaults T_base = 1, τ = 0.05 (code and recipe); the paper's τ = 0.1 and
its raw z in place of h̃ (``use_raw_z``) are selectable, as is the code's sign of h̃
for z ≤ 0 (``literal_code_sign``, shared with the ``hapo`` objective).

Trainer protocol::

    rule = get_temperature_rule(name)(**hparams)
    generation_config.temperature = rule.generation_temperature()   # 1.0 for hapo_ats
    # each generation round:
    processor = rule.processor()               # None for constant; else pass
    model.generate(..., logits_processor=LogitsProcessorList([processor]))
    log(rule.metrics())
    # each loss micro-batch (any number per round):
    rule.observe(entropies, mask)              # [B, T] policy entropies, valid-token mask
    # checkpoint: rule.state_dict() (JSON); on resume: rule.load_state_dict(state)

``observe`` only buffers the valid entropies; the next ``processor()`` turns every
entropy observed since the previous one into the statistics, so the "previous step"
is everything trained on since the last generation, not its last micro-batch.

Departures and caveats:
* transformers runs user logits processors after its own (repetition penalty, min
  length, ...) and before the sampling warpers (temperature, top-k/p, min-p), so H is
  taken after those processors and before truncation; the generation config's own
  temperature must be 1.0, or it would be applied a second time.
* Only transformers' ``generate`` is covered; vLLM would need its own processor.
* [our choice] The trainer's log-probs use one fixed temperature, not the per-token T_t
  sampled with, so sampling is slightly off-policy (logits scaled by at most 1 ± τ
  around T_base). The entropies passed to ``observe`` must be of the untempered
  logits (temperature 1), as the statistics are applied to untempered ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor

from trainers.core.entropy import adaptive_temperature, entropy_signal, entropy_stats
from trainers.core.types import EntropyStats, lookup, registration

_STAT_FIELDS = ("pivot", "rms", "pos_scale", "neg_scale")


def stats_to_dict(stats: EntropyStats) -> dict[str, float]:
    """JSON-ready floats of ``stats`` (for checkpoints)."""
    return {name: float(getattr(stats, name)) for name in _STAT_FIELDS}


def stats_from_dict(data: dict[str, float]) -> EntropyStats:
    return EntropyStats(**{name: torch.tensor(float(data[name])) for name in _STAT_FIELDS})


def ats_temperature(
    entropies: torch.Tensor,
    stats: EntropyStats | None,
    base_temperature: float = 1.0,
    tau: float = 0.05,
    use_raw_z: bool = False,
    literal_code_sign: bool = False,
) -> torch.Tensor:
    """ATS temperature per entropy (same shape, float32); T_base everywhere when no ``stats``."""
    if stats is None:
        return torch.full_like(entropies, base_temperature, dtype=torch.float32)
    kind = "z" if use_raw_z else "h_tilde"
    signal = entropy_signal(entropies, stats, kind=kind, literal_code_sign=literal_code_sign)
    return adaptive_temperature(signal.float(), base_temperature=base_temperature, tau=tau)


def next_token_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(scores) per row, (B, V) -> (B,); −inf scores are excluded."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    # exp(-inf) = 0, so masked tokens contribute 0 * 0 once their log-prob is zeroed
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1)


class HapoTemperatureProcessor(LogitsProcessor):
    """Divides each row's scores [B, V] by its ATS temperature, from the entropy of that row.

    ``stats``: the previous step's ``EntropyStats`` (None on the first step: T_base).
    The generation config's temperature must be 1.0 (the trainer sets it), or
    transformers' own warper divides a second time. Keeps on-device running
    min/mean/max of the temperatures applied (no host sync until ``summary``), over
    every row ``generate`` processes, finished ones included.
    """

    def __init__(
        self,
        stats: EntropyStats | None,
        base_temperature: float = 1.0,
        tau: float = 0.05,
        use_raw_z: bool = False,
        *,
        literal_code_sign: bool = False,
    ) -> None:
        _check(base_temperature, tau)
        self.stats = stats
        self.base_temperature, self.tau = base_temperature, tau
        self.use_raw_z, self.literal_code_sign = use_raw_z, literal_code_sign
        self._summary: torch.Tensor | None = None  # [sum, count, min, max]

    def temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """The temperature [B] each row of ``scores`` [B, V] is divided by."""
        stats = self.stats
        if stats is not None and stats.pivot.device != scores.device:
            stats = self.stats = EntropyStats(*(t.to(scores.device) for t in _fields(stats)))
        return ats_temperature(
            next_token_entropy(scores),
            stats,
            self.base_temperature,
            self.tau,
            self.use_raw_z,
            self.literal_code_sign,
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        temps = self.temperatures(scores)
        step = torch.stack([temps.sum(), temps.new_tensor(temps.numel()), temps.min(), temps.max()])
        if self._summary is None:
            self._summary = step
        else:
            s = self._summary
            self._summary = torch.stack(
                [s[0] + step[0], s[1] + step[1], s[2].minimum(step[2]), s[3].maximum(step[3])]
            )
        return scores / temps.to(scores.dtype).unsqueeze(-1)

    def summary(self) -> dict[str, float]:
        """``temperature/mean|min|max`` over the tokens processed so far (empty before any)."""
        if self._summary is None:
            return {}
        total, count, low, high = self._summary.tolist()
        return {"temperature/mean": total / count, "temperature/min": low, "temperature/max": high}


def _fields(stats: EntropyStats) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(stats, name) for name in _STAT_FIELDS)


def _check(base_temperature: float, tau: float) -> None:
    if base_temperature <= 0 or not 0.0 <= tau < 1.0:
        raise ValueError(
            f"need base_temperature > 0 and 0 <= tau < 1, got {base_temperature} and {tau}"
        )


class TemperatureRule:
    """Base rule: sample at a constant ``base_temperature`` through the generation config."""

    name: str = ""

    def __init__(self, base_temperature: float = 1.0) -> None:
        _check(base_temperature, 0.0)
        self.base_temperature = base_temperature

    def generation_temperature(self) -> float:
        """The value the generation config's ``temperature`` must hold."""
        return self.base_temperature

    def processor(self) -> LogitsProcessor | None:
        """A fresh logits processor for this round's ``generate`` call, or None."""
        return None

    def observe(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Record policy entropies [B, T] on the valid tokens ``mask`` [B, T]."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def metrics(self) -> dict[str, float]:
        return {"temperature/mean": self.base_temperature}


TEMPERATURE_RULES: dict[str, type[TemperatureRule]] = {}


def register_temperature_rule(
    name: str,
) -> Callable[[type[TemperatureRule]], type[TemperatureRule]]:
    def decorator(cls: type[TemperatureRule]) -> type[TemperatureRule]:
        cls.name = name
        return registration(TEMPERATURE_RULES, "temperature rule", name)(cls)

    return decorator


def get_temperature_rule(name: str) -> type[TemperatureRule]:
    """The rule class registered as ``name`` (KeyError listing the names); build it with its
    own hyperparameters."""
    return lookup(TEMPERATURE_RULES, "temperature rule", name)


@register_temperature_rule("constant")
class ConstantTemperature(TemperatureRule):
    """TRL's behaviour: one temperature for every token."""


@register_temperature_rule("hapo_ats")
class HapoAdaptiveTemperature(TemperatureRule):
    """HAPO's Adaptive Temperature Sampling.

    Args: base_temperature T_base (1.0); tau τ (0.05 code and recipe; paper 0.1);
    use_raw_z (False: h̃ as the code; True: the paper's raw z); literal_code_sign (False;
    True gives z ≤ 0 the code's h̃ ≥ 0, ``docs/algorithms/hapo.md``); quantile ρ of the pivot (0.8).
    """

    def __init__(
        self,
        base_temperature: float = 1.0,
        tau: float = 0.05,
        use_raw_z: bool = False,
        literal_code_sign: bool = False,
        quantile: float = 0.8,
    ) -> None:
        super().__init__(base_temperature)
        _check(base_temperature, tau)
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1]; got {quantile}")
        self.tau, self.use_raw_z, self.literal_code_sign = tau, use_raw_z, literal_code_sign
        self.quantile = quantile
        self.stats: EntropyStats | None = None  # what the next processor samples with
        self._pending: list[torch.Tensor] = []  # valid entropies observed since then
        self._processor: HapoTemperatureProcessor | None = None

    def generation_temperature(self) -> float:
        return 1.0

    def processor(self) -> HapoTemperatureProcessor:
        self.stats = self._current_stats()
        self._pending = []
        self._processor = HapoTemperatureProcessor(
            self.stats,
            self.base_temperature,
            self.tau,
            self.use_raw_z,
            literal_code_sign=self.literal_code_sign,
        )
        return self._processor

    def observe(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Buffer the valid entropies (no host sync). Gather across ranks first if every
        rank should sample with the same statistics."""
        self._pending.append(entropies.detach().float()[mask.bool()])

    def _current_stats(self) -> EntropyStats | None:
        """Statistics of the entropies observed since the last processor (if any valid)."""
        valid = torch.cat(self._pending) if self._pending else None
        if valid is None or valid.numel() == 0:  # nothing new: keep the previous statistics
            return self.stats
        return entropy_stats(valid, torch.ones_like(valid), quantile=self.quantile)

    def state_dict(self) -> dict[str, Any]:
        stats = self._current_stats()
        return {"stats": None if stats is None else stats_to_dict(stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = None if state["stats"] is None else stats_from_dict(state["stats"])
        self._pending = []

    def metrics(self) -> dict[str, float]:
        out = self._processor.summary() if self._processor is not None else {}
        if self.stats is not None:
            out["temperature/entropy_pivot"] = float(self.stats.pivot)
        return out
