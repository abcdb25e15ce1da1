"""The rules every posttrain trainer follows, in one mixin.

1. Token log-probs and entropies on the training path come from the model's
   fused LM head (``model(..., labels=..., fused_lm_head=True)``, TRL 1.16's
   contract) running posttrain's kernel, never from full logits.
   ``PosttrainTrainerMixin.__init__`` binds posttrain's kernel before the TRL
   trainer's ``__init__`` (which installs the fused head), makes sure the model
   has the head afterwards, refuses LoRA on the LM head, and installs
   ``forbid_full_logits``, so a code path that builds ``[tokens x vocab]`` logits
   with gradients on fails loudly in tests instead of silently costing memory.
2. Progress reaches the job record only through ``trainers.callbacks.ReportingCallback``.

A trainer class for a new method subclasses its TRL/transformers trainer with
this mixin first; ``tests/trainers/test_base.py`` checks that every registered
method's trainer does.
"""

from __future__ import annotations

from trainers.fused_head import install_fused_head, use_posttrain_kernel
from trainers.logprobs import TokenLogprobs, causal_lm_logprobs, forbid_full_logits

# Inputs a collator may add that the model's forward does not take.
_NOT_FOR_MODEL = {
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
        use_posttrain_kernel()  # TRL's trainers install their fused head inside __init__
        super().__init__(*args, **kwargs)
        install_fused_head(self.model)  # no-op when TRL installed it; refuses a LoRA head
        self._logits_guard = forbid_full_logits(self.model)

    def token_logprobs(self, model, inputs: dict, *, return_entropy: bool = False) -> TokenLogprobs:
        """Per-token log-probs of ``inputs["labels"][:, 1:]`` through ``model``'s fused forward."""
        extra = {k: v for k, v in inputs.items() if k not in _NOT_FOR_MODEL}
        return causal_lm_logprobs(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            return_entropy=return_entropy,
            **extra,
        )
