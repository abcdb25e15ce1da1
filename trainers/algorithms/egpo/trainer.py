"""EGPO's trainer on transformers' Trainer: two optimizer steps per extragradient iteration.

The loss math is ``trainers.core.egpo``; formulas and worked examples:
``docs/algorithms/egpo.md``. Each optimizer step draws a fresh prompt batch (all its
accumulation micro-batches are fetched up front by ``get_batch_samples``); at the step's
first ``training_step``:

*Half step* (``global_step`` even): sample y, y' (``temperature``, ``top_k``) and y''
(``opponent_temperature``, ``opponent_top_k``) from θ_t; judge p1 = P(y ≻ y''),
p2 = P(y' ≻ y''); copy the trainable parameters and the optimizer's state to CPU
(the snapshot); the loss at θ_t is backpropagated and the optimizer steps → θ_{t+½}.

*Full step* (``global_step`` odd): sample and judge from the current weights θ_{t+½};
THEN restore θ_t and the optimizer state from the snapshot; the loss at θ_t is
backpropagated and the optimizer steps → θ_{t+1}. The learning-rate scheduler is not
restored (it advances on both steps, as the Trainer steps it), nor are the optimizer's
param-group settings (the learning rate the scheduler set for this step stays).

``extragradient: false`` is online IPO: every step is a half step with no snapshot.

Iteration boundaries: checkpoints and pauses happen only after a full step (the
``steps_per_iteration`` argument, read by ``ReportingCallback``), so a checkpoint never
holds θ_{t+½} and a resumed run always starts with a half step; the Trainer's own
checkpoint restores the optimizer, scheduler and RNG states, and the judge's flip
generator is saved beside them (``posttrain_egpo_state.json``).

Logged per step: loss, h, target, win_rate_y and win_rate_y_prime (mean p1, p2), kl (mean
log-ratio lpθ − lpref of y and y', as the loss sees them: length-normalised when
``normalize_logprobs``), completion_length (mean tokens of y, y', y''), egpo_half
(0 = half step, 1 = full step), and with a pattern judge the class mix of y'' as
``style/<class>``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from trainers.algorithms.egpo.rollout import TransformersSampler, VLLMSampler
from trainers.algorithms.reference_trainer import ReferenceTrainer
from trainers.algorithms.tokens import pad_id, prompt_ids
from trainers.contract.errors import JobError
from trainers.contract.methods.egpo import EGPOHyperparameters
from trainers.core.egpo import egpo_loss, sequence_logps
from trainers.judges.registry import prompt_text
from trainers.logprobs import IGNORE_INDEX

STATE_FILE = "posttrain_egpo_state.json"


@dataclass
class EGPOTrainingArguments(TrainingArguments):
    """TrainingArguments plus the iteration length the reporting callback honours."""

    steps_per_iteration: int = field(
        default=2,
        metadata={"help": "Optimizer steps per iteration: checkpoints and pauses only at its end."},
    )


class EGPOCollator:
    """Prompt rows → {"prompt_ids", "prompt", "items"}: python lists, no tensors."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        items = []
        for r in rows:
            item = {k: v for k, v in r.items() if k != "prompt_ids"}
            if not isinstance(item["prompt"], str):
                item["messages"] = item["prompt"]
            items.append(item)
        return {
            "prompt_ids": [list(r["prompt_ids"]) for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "items": items,
        }


@dataclass
class Snapshot:
    """θ_t and the optimizer's per-parameter state, on CPU."""

    params: dict[str, torch.Tensor]
    optimizer_state: list[dict[str, Any] | None]


class PosttrainEGPOTrainer(ReferenceTrainer):
    """EGPO (and online IPO) on posttrain's fused kernel; see the module docstring."""

    keeps_columns = True  # the judge reads a prompt's whole row as its item

    def __init__(
        self,
        *args,
        egpo: EGPOHyperparameters,
        judge,
        use_vllm: bool = False,
        vllm_server_url: str | None = None,
        **kwargs,
    ):
        self.egpo = egpo
        self.judge = judge
        kwargs["eval_dataset"] = None  # EGPO has no validation pass
        super().__init__(*args, **kwargs)
        tok = self.processing_class
        self._check_prompt_lengths(self.train_dataset)
        if use_vllm:
            self.sampler = VLLMSampler(
                self.model,
                self.accelerator,
                tok,
                max_new_tokens=egpo.max_new_tokens,
                mode=egpo.vllm_mode,
                server_base_url=vllm_server_url,
                max_model_length=egpo.max_seq_length,
                max_num_seqs=2 * self.args.per_device_train_batch_size,
            )
        else:
            self.sampler = TransformersSampler(tok, egpo.max_new_tokens)
        self.pad_id = pad_id(tok)
        self.snapshot: Snapshot | None = None
        self._step_batches: list[dict] = []
        self._prepared: list[dict[str, torch.Tensor]] = []
        self._micro = 0

    def _check_prompt_lengths(self, data) -> None:
        room = self.egpo.max_seq_length - self.egpo.max_new_tokens
        for i, ids in enumerate(data["prompt_ids"]):
            if len(ids) > room:
                raise JobError(
                    "invalid_training_file",
                    f"training_file row {i + 1}: the prompt is {len(ids)} tokens, more than "
                    f"max_seq_length ({self.egpo.max_seq_length}) minus max_new_tokens "
                    f"({self.egpo.max_new_tokens}); shorten it or raise max_seq_length",
                    "training_file",
                )

    def tokenizer_for(self, tokenizer):
        return lambda row, i: {"prompt_ids": prompt_ids(tokenizer, row["prompt"])}

    def collator_for(self, tokenizer) -> EGPOCollator:
        return EGPOCollator()

    # ------------------------------------------------------------------ which step
    def is_half_step(self) -> bool:
        """The step about to run is a half step (always, for online IPO)."""
        return not self.egpo.extragradient or self.state.global_step % 2 == 0

    # ------------------------------------------------------------------ snapshot
    def _optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _optimizer_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self._optimizer().param_groups for p in group["params"]]

    def take_snapshot(self) -> Snapshot:
        """θ_t (trainable parameters) and the optimizer's state, copied to CPU."""
        params = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()}
        opt = self._optimizer()
        states: list[dict[str, Any] | None] = []
        for p in self._optimizer_params():
            state = opt.state.get(p)
            if not state:
                states.append(None)
                continue
            states.append(
                {
                    k: (v.detach().to("cpu", copy=True), v.device)
                    if torch.is_tensor(v)
                    else copy.deepcopy(v)
                    for k, v in state.items()
                }
            )
        return Snapshot(params, states)

    @torch.no_grad()
    def restore_snapshot(self, snap: Snapshot) -> None:
        """Put θ_t and the optimizer state back, bit for bit (learning rates untouched)."""
        for name, p in self._trainable():
            p.copy_(snap.params[name].to(p.device))
        opt = self._optimizer()
        for p, saved in zip(self._optimizer_params(), snap.optimizer_state, strict=True):
            if saved is None:
                opt.state.pop(p, None)
                continue
            opt.state[p] = {
                k: v[0].to(v[1], copy=True) if isinstance(v, tuple) else copy.deepcopy(v)
                for k, v in saved.items()
            }

    # ------------------------------------------------------------------ the step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches, self._prepared, self._micro = list(batches), [], 0
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._prepared:
            self._start_step(model)
        prepared = self._prepared[self._micro]
        self._micro += 1
        if self._micro == len(self._prepared):
            self._step_batches, self._prepared, self._micro = [], [], 0
        # the Trainer counts trained tokens from the batch it handed in: y and y' with prompts
        inputs["input_ids"], inputs["attention_mask"] = (
            prepared["input_ids"],
            prepared["attention_mask"],
        )
        return super().training_step(model, prepared, num_items_in_batch)

    def _start_step(self, model) -> None:
        """Sample and judge every micro-batch of this step, then snapshot or restore."""
        half = self.is_half_step()
        batches = self._step_batches or []
        self.sampler.sync(model)
        rollouts = [self._rollout(model, b) for b in batches]
        if self.egpo.extragradient:
            if half:
                self.snapshot = self.take_snapshot()
            else:
                if self.snapshot is None:
                    raise RuntimeError("EGPO full step without a half-step snapshot")
                self.restore_snapshot(self.snapshot)
                self.snapshot = None
        self._prepared = [self._loss_inputs(r) for r in rollouts]
        self.record("train", {"egpo_half": 0.0 if half else 1.0})

    def _rollout(self, model, batch: dict) -> dict[str, Any]:
        s, tok = self.egpo, self.processing_class
        prompt_ids, prompts = batch["prompt_ids"], batch["prompt"]
        pair = self.sampler.sample(model, prompt_ids, 2, s.temperature, s.top_k)
        opponent = self.sampler.sample(
            model, prompt_ids, 1, s.opponent_temperature, s.opponent_top_k
        )
        y, yp = pair[0::2], pair[1::2]

        def text(ids: list[list[int]]) -> list[str]:
            return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

        y_text, yp_text, opp_text = text(y), text(yp), text(opponent)
        n = len(prompts)
        probs = self.judge.prefer(
            list(prompts) * 2, y_text + yp_text, opp_text * 2, list(batch["items"]) * 2
        )
        lengths = [len(c) for c in y + yp + opponent]
        metrics = {"completion_length": sum(lengths) / max(len(lengths), 1)}
        classify = getattr(self.judge, "classify", None)
        if classify is not None:
            names = classify(opp_text)
            for name in getattr(self.judge.spec, "class_names", sorted(set(names))):
                metrics[f"style/{name}"] = names.count(name) / max(len(names), 1)
        self.record("train", metrics)
        return {
            "prompt_ids": prompt_ids,
            "y": y,
            "yp": yp,
            "p1": probs[:n],
            "p2": probs[n:],
            "texts": (y_text, yp_text, opp_text),
            "prompts": [prompt_text(p) for p in prompts],
        }

    def _loss_inputs(self, r: dict[str, Any]) -> dict[str, torch.Tensor]:
        """2B right-padded sequences (every y, then every y'), labels only on completions."""
        seqs = [(p, c) for p, c in zip(r["prompt_ids"] * 2, r["y"] + r["yp"], strict=True)]
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            full = torch.tensor(p + c, dtype=torch.long)
            ids[i, : len(full)] = full
            mask[i, : len(full)] = 1
            labels[i, len(p) : len(full)] = torch.tensor(c, dtype=torch.long)
        device = self.args.device
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
            "p1": torch.tensor(r["p1"], dtype=torch.float32, device=device),
            "p2": torch.tensor(r["p2"], dtype=torch.float32, device=device),
        }

    def _logps(self, model, inputs: dict) -> torch.Tensor:
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        out = self.token_logprobs(model, batch)
        return sequence_logps(out.logp, out.mask, normalize=self.egpo.normalize_logprobs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = self._logps(model, inputs)
        with torch.no_grad(), self._reference(model) as ref:
            reference = self._logps(ref, inputs)
        n = policy.shape[0] // 2
        loss, metrics = egpo_loss(
            policy[:n],
            policy[n:],
            reference[:n],
            reference[n:],
            inputs["p1"],
            inputs["p2"],
            beta=self.egpo.beta,
        )
        self.record("train", {k: float(v) for k, v in metrics.items()})
        return (loss, {"metrics": metrics}) if return_outputs else loss

    # ------------------------------------------------------------------ checkpoints
    state_file = STATE_FILE

    def _save_checkpoint(self, model, trial):
        if self.snapshot is not None:  # ReportingCallback never asks for this
            raise RuntimeError("EGPO checkpoints only at iteration boundaries (after a full step)")
        super()._save_checkpoint(model, trial)

    def extra_state(self) -> dict[str, Any]:
        state_dict = getattr(self.judge, "state_dict", None)
        return {"judge": state_dict() if state_dict else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load = getattr(self.judge, "load_state_dict", None)
        if load is not None and state.get("judge") is not None:
            load(state["judge"])

    def on_train_start(self) -> None:
        self.snapshot = None
