"""The rules every posttrain trainer follows, in one mixin.

1. Token log-probs and entropies on the training path come from
   ``trainers.logprobs.causal_lm_logprobs`` (the fused kernel), never from full
   logits. ``PosttrainTrainerMixin`` installs ``forbid_full_logits`` on the model,
   so a code path that builds ``[tokens x vocab]`` logits with gradients on fails
   loudly in tests instead of silently costing memory.
2. Progress reaches the job record only through ``trainers.callbacks.ReportingCallback``.

A trainer class for a new method subclasses its TRL/transformers trainer with
this mixin first; ``tests/trainers/test_base.py`` checks that every registered
method's trainer does.
"""

from __future__ import annotations

from trainers.logprobs import TokenLogprobs, causal_lm_logprobs, forbid_full_logits

# Inputs a collator may add that the backbone does not take.
_NOT_FOR_BACKBONE = {
    "input_ids",
    "labels",
    "attention_mask",
    "completion_mask",
    "assistant_masks",
    "num_items_in_batch",
}


class PosttrainTrainerMixin:
    """Put before the TRL trainer in the bases: ``class X(PosttrainTrainerMixin, SFTTrainer)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logits_guard = forbid_full_logits(self.model)

    def token_logprobs(
        self, model, inputs: dict, *, return_entropy: bool = False, temperature: float = 1.0
    ) -> TokenLogprobs:
        extra = {k: v for k, v in inputs.items() if k not in _NOT_FOR_BACKBONE}
        return causal_lm_logprobs(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            temperature=temperature,
            return_entropy=return_entropy,
            **extra,
        )
