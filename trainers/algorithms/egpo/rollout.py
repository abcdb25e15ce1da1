"""EGPO's rollouts: completions sampled from the policy's current weights.

Two engines behind one ``sample(model, prompt_ids, n, temperature, top_k)``, which
returns ``n`` completions per prompt (grouped by prompt), each cut after its first
EOS (the EOS kept: it is part of the completion's log-prob):

- ``TransformersSampler``: ``generate`` on the unwrapped policy (LoRA layers stay
  active), in eval mode and no-grad, prompts left-padded. CPU, tests, the demo.
- ``VLLMSampler``: TRL's ``VLLMGeneration`` (the engine GRPO's vLLM path uses),
  ``colocate`` or ``server`` mode; ``sync(model)`` pushes the trainer's weights to
  vLLM. The trainer calls it before each step's first sample: every step follows an
  optimizer step or the restore of θ_t, so vLLM always samples the weights the method
  names (θ_t for the half step, θ_{t+½} for the full step). Untested here: vLLM needs
  a GPU host.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trainers.fused_head import unwrap_model


def truncate_after_eos(ids: Iterable[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """The tokens up to and including the first EOS; padding after an unfinished one dropped."""
    out: list[int] = []
    for t in ids:
        t = int(t)
        out.append(t)
        if t in eos_ids:
            return out
    while out and pad_id is not None and pad_id not in eos_ids and out[-1] == pad_id:
        out.pop()
    return out


def eos_ids_of(tokenizer, model=None) -> set[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(unwrap_model(model), "generation_config", None) if model is not None else None
    extra = getattr(config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids


class TransformersSampler:
    """Sampling with transformers ``generate``."""

    def __init__(self, tokenizer, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def sync(self, model) -> None:
        """Nothing to do: ``generate`` runs on the training weights themselves."""

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        top_k: int,
    ) -> list[list[int]]:
        policy = unwrap_model(model)
        eos = eos_ids_of(self.tokenizer, policy)
        rows = [p for p in prompt_ids for _ in range(n)]
        width = max(len(p) for p in rows)
        device = next(policy.parameters()).device
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        was_training = policy.training
        policy.eval()
        try:
            out = policy.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                top_p=1.0,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(eos),
            )
        finally:
            policy.train(was_training)
        return [truncate_after_eos(row[width:].tolist(), eos, self.pad_id) for row in out]


class VLLMSampler:
    """Sampling with vLLM through TRL's ``VLLMGeneration`` (GPU hosts; untested on CPU)."""

    def __init__(
        self,
        model,
        accelerator,
        tokenizer,
        *,
        max_new_tokens: int,
        mode: str,
        server_base_url: str | None,
        max_model_length: int,
        max_num_seqs: int,
    ):
        from trl.generation.vllm_generation import VLLMGeneration

        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.engine = VLLMGeneration(
            model=model,
            accelerator=accelerator,
            processing_class=tokenizer,
            mode=mode,
            server_base_url=server_base_url,
            gpu_memory_utilization=0.3,  # TRL's GRPOConfig default for colocate
            max_model_length=max_model_length,
            max_num_seqs=max_num_seqs,
            max_completion_length=max_new_tokens,
        )

    def sync(self, model) -> None:
        self.engine.sync_weights()

    def sample(self, model, prompt_ids, n, temperature, top_k) -> list[list[int]]:
        self.engine.temperature = temperature
        self.engine.top_k = top_k  # 0 = off, as TRL's GRPO default
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        _, completions, _, _ = self.engine.generate(prompts=rows, images=None, num_generations=n)
        eos = eos_ids_of(self.tokenizer, model)
        return [truncate_after_eos(c, eos, self.pad_id) for c in completions]
