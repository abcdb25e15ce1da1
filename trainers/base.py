"""The rules every posttrain trainer follows, in one mixin.

1. Token log-probs and entropies on the training path come from the model's
   fused LM head (``model(..., labels=..., fused_lm_head=True)``, TRL 1.16's
   contract) running posttrain's kernel, never from full logits.
   ``PosttrainTrainerMixin.__init__`` binds posttrain's kernel before the TRL
   trainer's ``__init__`` (which installs the fused head), makes sure the model
   has the head afterwards, refuses LoRA on the LM head, and installs
   ``forbid_full_logits``, so a code path that builds ``[tokens x vocab]`` logits
   with gradients on fails loudly in tests instead of silently costing memory.
2. Progress reaches the job record only through ``trainers.callbacks.ReportingCallback``
   (and samples of a method's scored rollouts through ``sample_recorder``, a
   ``trainers.samples.SampleRecorder`` on the same reporter).
3. State a trainer keeps beside the Trainer's own (BCO's running mean, a rollout
   planner's history, a judge's random state, OREO's value model) is saved into every
   checkpoint and restored on resume through one hook: a trainer names its
   ``state_file`` and implements ``extra_state``/``load_extra_state`` (a JSON dict), or
   overrides ``save_extra``/``load_extra`` for files of its own. The mixin writes only
   in the process that saves (``args.should_save``) and loads before training starts;
   ``on_train_start`` then runs once, after any such state is back.

A trainer class for a new method subclasses its TRL/transformers trainer with
this mixin first; ``tests/trainers/test_base.py`` checks that every registered
method's trainer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from trainers.contract.checkpoints import checkpoint_dir
from trainers.fused_head import install_fused_head, use_posttrain_kernel
from trainers.logprobs import TokenLogprobs, causal_lm_logprobs, forbid_full_logits
from trainers.samples import SampleRecorder

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

    # ------------------------------------------------------------ state beside checkpoints
    state_file: ClassVar[str | None] = None  # the JSON file extra_state is saved as

    def extra_state(self) -> dict[str, Any] | None:
        """This trainer's own state to save in a checkpoint (None: nothing)."""
        return None

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved."""

    def save_extra(self, folder: Path) -> None:
        """Write this trainer's state into the checkpoint ``folder`` (main process only)."""
        state = self.extra_state() if self.state_file else None
        if state is not None:
            (folder / self.state_file).write_text(json.dumps(state))

    def load_extra(self, folder: Path) -> None:
        """Read back what ``save_extra`` wrote into ``folder``; absent files are fine (a
        checkpoint of a run that had nothing to save)."""
        path = folder / self.state_file if self.state_file else None
        if path is not None and path.is_file():
            self.load_extra_state(json.loads(path.read_text()))

    def on_train_start(self) -> None:
        """Runs once per ``train()``, after a resumed run's extra state is loaded."""

    # ------------------------------------------------------------ samples of rollouts
    # Set by the runner in the reporting process of a job that records samples; a
    # trainer of such a method hands it the rows of the rollout batches it scores.
    sample_recorder: SampleRecorder | None = None

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self.save_extra(checkpoint_dir(self.args.output_dir, self.state.global_step))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            self.load_extra(Path(resume_from_checkpoint))
        self.on_train_start()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
