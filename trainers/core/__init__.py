"""The GRPO family's math as registries: pure tensor functions, no TRL, no model.

Formulas: ``docs/algorithms/grpo.md``. Four axes, each a registry keyed by the names in
``trainers.contract.methods.grpo`` (a test checks they agree), each entry with one signature:

- ``ADVANTAGES`` (``advantages.py``): ``fn(AdvantageInputs, **hp) -> (A [B,T], metrics)``
- ``SHAPERS`` (``advantages.py``): ``fn(AdvantageInputs, A, **hp) -> (A' [B,T], metrics)``
- ``OBJECTIVES`` (``objectives.py``): ``fn(ObjectiveInputs, *, epsilon_low, epsilon_high,
  beta, **hp) -> (per-token loss [B,T], metrics)``
- ``AGGREGATIONS`` (``aggregation.py``): ``fn(per_token_loss, mask, **hp) -> scalar``

``entropy.py`` holds HAPO's entropy signal h̃ and its saved statistics, shared by the
``hapo`` objective and HAPO's adaptive temperature. Importing this package only
defines functions and fills the registries.
"""

from trainers.core.advantages import (
    ADVANTAGES,
    SHAPERS,
    get_advantage,
    get_shaper,
    register_advantage,
    register_shaper,
)
from trainers.core.aggregation import (
    AGGREGATIONS,
    GLOBAL_NORMALISED,
    get_aggregation,
    register_aggregation,
)
from trainers.core.entropy import (
    adaptive_temperature,
    entropy_signal,
    entropy_stats,
    entropy_z,
    normalized_entropy,
)
from trainers.core.objectives import (
    OBJECTIVES,
    adaptive_clip_widths,
    clipped_surrogate,
    get_objective,
    k3_kl,
    redistribute_advantages,
    register_objective,
)
from trainers.core.types import AdvantageInputs, EntropyStats, Metrics, ObjectiveInputs

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "GLOBAL_NORMALISED",
    "OBJECTIVES",
    "SHAPERS",
    "AdvantageInputs",
    "EntropyStats",
    "Metrics",
    "ObjectiveInputs",
    "adaptive_clip_widths",
    "adaptive_temperature",
    "clipped_surrogate",
    "entropy_signal",
    "entropy_stats",
    "entropy_z",
    "get_advantage",
    "get_aggregation",
    "get_objective",
    "get_shaper",
    "k3_kl",
    "normalized_entropy",
    "redistribute_advantages",
    "register_advantage",
    "register_aggregation",
    "register_objective",
    "register_shaper",
]
