"""TRL's ``GRPOTrainer`` with posttrain's pieces plugged in at its two override points.

When a job's settings are ones TRL computes itself (``trl_native`` in
``trainers.contract.methods.grpo``), nothing here runs: TRL's own advantages and loss
do the work on posttrain's fused kernel. Otherwise, at TRL's two override points and
no further:

- ``_generate_and_score_completions``: before TRL generates, the rollout planner
  (``trainers/core/rollout.py``) decides how many of the step's completions each
  prompt gets and which prompts are seeded with exemplars, and a temperature rule
  (``trainers/core/temperature.py``) is attached to ``generate`` as a logits
  processor; after TRL scored the completions, the advantage estimator and shaper
  (``trainers/core/advantages.py``) replace TRL's advantages, with groups taken
  from the planner (they may be ragged);
- ``_compute_loss``: the objective (``trainers/core/objectives.py``) and the
  aggregation (``trainers/core/aggregation.py``) replace TRL's PPO loss, from the
  same per-token log-probs and entropies TRL computes through the fused head (also for
  plain PPO clipping when the shaper is deferred to the loss, below).

A shaper that reads the sampling policy's log-probs (XRPO's novelty bonus) needs one more
no-grad forward when TRL does not compute them (it generates for every optimizer step:
the loss then uses its own log-probs, detached, as the old ones). When the loss will see
exactly the rollout batch, once, with the weights that sampled it (one process, one
micro-batch per generation, one pass), the shaper is deferred instead: the rollout keeps
the estimator's advantages, and the loss shapes them from its own forward's detached
log-probs, which are the ones the extra forward would have computed (``_defers``).

The planner's history and the temperature rule's entropy statistics are saved
with every checkpoint (``posttrain_rollout_state.json``) and restored on resume.

Samples (``trainers.samples``): after a training rollout batch is scored and its
advantages are final (TRL's, or the estimator's above), its first rows are reported with
the rewards TRL computed, so a sample shows what the loss was given.

Tools (a job that lists them): TRL's own tool loop runs them (``toolloop.py`` adds the
per-episode budgets and the tool metrics).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import torch
from transformers import LogitsProcessorList
from trl import GRPOTrainer

from trainers.algorithms.grpo.padding import in_length_groups
from trainers.algorithms.grpo.toolloop import ToolEpisodesMixin
from trainers.algorithms.tokens import prompt_ids
from trainers.base import PosttrainTrainerMixin
from trainers.contract.errors import JobError
from trainers.contract.methods.grpo import GRPOHyperparameters, trl_native
from trainers.core import advantages as adv
from trainers.core import aggregation as agg
from trainers.core import objectives as obj
from trainers.core.types import AdvantageInputs, ObjectiveInputs, masked_mean
from trainers.fused_head import unwrap_model
from trainers.graders.reward import completion_text

STATE_FILE = "posttrain_rollout_state.json"
# False: the shaper always gets its own no-grad forward (benchmark baseline and tests)
DEFER_SHAPER = True
# inputs posttrain's objective branch does not read; a batch with any of them keeps TRL's loss
_TRL_ONLY_INPUTS = (
    "tool_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
)


class PosttrainGRPOTrainer(PosttrainTrainerMixin, ToolEpisodesMixin, GRPOTrainer):
    """GRPO on posttrain's kernel; see the module docstring for what it overrides."""

    def __init__(self, *args, settings: GRPOHyperparameters, pieces: dict[str, Any], **kwargs):
        self.pt_settings = settings
        self.pt_pieces = pieces  # hyperparameters of each piece, by piece kind
        self.pt_planner = pieces.get("planner")
        self.pt_temperature = pieces.get("temperature")
        self._pt_rewards: torch.Tensor | None = None
        self._pt_scored: tuple[list, list] = ([], [])
        self._pt_rollout_s = 0.0
        self._pt_deferred: dict | None = None  # the rollout whose shaping waits for the loss
        super().__init__(*args, **kwargs)
        self._use_environment_schemas()
        self._check_prompt_lengths()

    def _check_prompt_lengths(self) -> None:
        """TRL 1.16 does not truncate GRPO prompts: one that leaves no room for
        ``max_completion_length`` within ``max_seq_length`` tokens is refused, naming its row."""
        room = self.pt_pieces["max_seq_length"] - self.max_completion_length
        tok = self.processing_class
        for param, data in (
            ("training_file", self.train_dataset),
            ("validation_file", self.eval_dataset),
        ):
            for i, prompt in enumerate(data["prompt"] if data is not None else []):
                n = len(prompt_ids(tok, prompt))
                if n > room:
                    raise JobError(
                        "invalid_training_file",
                        f"{param} row {i + 1}: the prompt is {n} tokens, more than "
                        f"max_seq_length ({self.pt_pieces['max_seq_length']}) minus "
                        f"max_completion_length ({self.max_completion_length}); shorten it or "
                        "raise max_seq_length",
                        param,
                    )

    # ---------------------------------------------------------------- rollouts and advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._pt_rewards = rewards_per_func  # [N_global, n_graders], gathered by TRL
        self._pt_scored = (completions, completion_ids_list)  # this process's, for samples
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        if trl_native(self.pt_settings) or not self.model.training:
            out = super()._generate_and_score_completions(inputs)
            self._pt_rollout_s += time.perf_counter() - start
            if self.model.training:
                self._pt_log(_advantage_stats(out["advantages"]))
                self._record_samples(out, [i // self.num_generations for i in range(len(inputs))])
            return out
        inputs, groups, originals = self._plan(inputs)
        with self._temperature_rule():
            out = super()._generate_and_score_completions(inputs)
        self._replace_advantages(out, groups, originals)
        self._pt_rollout_s += time.perf_counter() - start
        if self._pt_deferred is None:  # else recorded once the loss has shaped the advantages
            self._record_samples(out, groups)
        return out

    def _record_samples(self, out: dict, groups: list[int]) -> None:
        """The first rows of this rollout batch as a sample (``trainers.samples``): the
        prompt's tokens decoded as the model saw them, the completion as the graders read
        it, each grader's reward, their weighted sum and the advantage the loss uses."""
        recorder, step = self.sample_recorder, self.state.global_step + 1
        if recorder is None or not recorder.due(step):
            return
        completions, completion_ids = self._pt_scored
        n = min(recorder.rows, len(completions))
        first = self.accelerator.process_index * out["completion_mask"].shape[0]
        per_func = self._pt_rewards[first : first + n].float().cpu()
        weights = self.reward_weights.float().cpu()
        advantages = out["advantages"][:n].float()
        if advantages.dim() == 2:  # per token: the completion's mean
            mask = out["completion_mask"][:n].float()
            advantages = (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)
        advantages = advantages.cpu().tolist()
        ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        rows = []
        for i in range(n):
            scores = per_func[i]
            prompt = out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()
            ids = list(completion_ids[i])
            rows.append(
                {
                    "prompt": self._tokenizer.decode(prompt, skip_special_tokens=False),
                    "completion": completion_text(completions[i]),
                    "reward": None
                    if bool(torch.isnan(scores).all())
                    else float(torch.nansum(scores * weights)),
                    "rewards": {
                        name: float(scores[j]) for j, name in enumerate(self.reward_func_names)
                    },
                    "advantage": advantages[i],
                    "group": groups[i],
                    "completion_tokens": len(ids),
                    "truncated": bool(ids) and ids[-1] not in ends,
                    "tool_calls": self._episode_calls(completions[i]),
                }
            )
        recorder.send(step, rows)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step, timed: rollout (generation and scoring) and update, in seconds."""
        self._pt_rollout_s, start = 0.0, time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        total = time.perf_counter() - start
        self._pt_log(
            {"time/rollout_s": self._pt_rollout_s, "time/update_s": total - self._pt_rollout_s}
        )
        return loss

    def _plan(self, inputs: list[dict]) -> tuple[list[dict], list[int], list[dict]]:
        """Re-spend the step's completions over its prompts as the planner says.

        TRL's sampler gives every dataset row ``num_generations`` consecutive copies, so each
        block of G rows is one group (two rows with the same prompt text are two groups).
        Returns the rows to generate for, each row's group, and each group's original row.
        """
        g = self.num_generations
        originals = inputs[::g]
        if self.pt_planner is None:
            return inputs, [i // g for i in range(len(inputs))], originals
        if len(inputs) % g:  # refused at job creation (GradedMethod.check_job)
            raise JobError(
                "invalid_value",
                f"rollout_planner 'xrpo' needs whole groups on each process; this one holds "
                f"{len(inputs)} completions with num_generations {g}",
                "resources",
            )
        allocations = self.pt_planner.plan([_key(row) for row in originals], len(inputs))
        planned, groups = [], []
        for q, (row, alloc) in enumerate(zip(originals, allocations, strict=True)):
            if alloc.exemplars:
                seeded = self.pt_pieces["seed_prompt"](row["prompt"], alloc.exemplars)
                row = {**row, "prompt": seeded}
            planned += [row] * alloc.n
            groups += [q] * alloc.n
        self._pt_log(self.pt_planner.metrics())
        return planned, groups, originals

    @contextlib.contextmanager
    def _temperature_rule(self):
        """Attach the temperature rule's logits processor to ``generate`` for one rollout."""
        processor = self.pt_temperature.processor() if self.pt_temperature else None
        if processor is None:
            yield
            return
        inner = unwrap_model(self.model)
        had_own = "generate" in vars(inner)
        original = inner.generate

        def generate(*args, **kwargs):
            kwargs["logits_processor"] = LogitsProcessorList([processor])
            return original(*args, **kwargs)

        inner.generate = generate
        try:
            yield
        finally:
            if had_own:
                inner.generate = original
            else:
                del inner.generate  # back to the class's method
        self._pt_log(self.pt_temperature.metrics())

    def _replace_advantages(self, out: dict, groups: list[int], originals: list[dict]) -> None:
        """Our estimator (and shaper) over the whole step, then this process's rows."""
        device = out["completion_mask"].device
        mask = out["completion_mask"].float()
        n_local = mask.shape[0]
        weights = self.reward_weights.to(device).unsqueeze(0)
        rewards = torch.nan_to_num(self._pt_rewards.to(device) * weights).sum(dim=1)
        s = self.pt_settings
        old = out.get("old_per_token_logps")
        defer = s.advantage_shaper != "none" and old is None and self._defers(out)
        if old is None and s.advantage_shaper != "none" and not defer:
            old = self._old_logps(out)
        seq_old = None if old is None else (old * mask).sum(1) / mask.sum(1).clamp(min=1)
        rank = self.accelerator.process_index
        if self.pt_planner is None:
            # TRL lays each row's G copies out consecutively over the gathered batch (rank
            # after rank), so a group may straddle two processes: group = global position // G
            world = self.accelerator.num_processes
            g_groups = torch.arange(n_local * world, device=device) // self.num_generations
        else:  # the planner's groups are whole on each process (checked at creation)
            local_groups = torch.tensor(groups, device=device) + rank * n_local
            g_groups = self.accelerator.gather(local_groups)
        g_lengths = self.accelerator.gather(mask.sum(1))
        g_mask = _lengths_mask(g_lengths)
        g_old = None
        if seq_old is not None:
            g_old = self.accelerator.gather(seq_old)[:, None] * g_mask
        inp = AdvantageInputs(
            rewards=rewards, groups=g_groups, mask=g_mask, old_logps=g_old, entropy=None
        )
        a, metrics = adv.get_advantage(s.advantage_estimator)(inp, **self.pt_pieces["estimator"])
        metrics.update(_group_stats(rewards, g_groups))
        if defer:  # one process: the gathered batch is this process's rows
            out.update(
                pt_rewards=rewards,
                pt_groups=g_groups,
                pt_estimated=a,
                pt_row=torch.arange(n_local, device=device),
            )
            out["advantages"] = torch.full((n_local,), float("nan"), device=device)  # the loss's
            self._pt_deferred = {"out": out, "groups": groups, "metrics": metrics}
        else:
            self._pt_deferred = None
            if s.advantage_shaper != "none":
                a, shaped = adv.get_shaper(s.advantage_shaper)(inp, a, **self.pt_pieces["shaper"])
                metrics.update(shaped)
            seq_a = (a * g_mask).sum(1) / g_mask.sum(1).clamp(min=1)
            out["advantages"] = seq_a[rank * n_local : (rank + 1) * n_local]
            metrics.update(_advantage_stats(seq_a))
            self._pt_log(metrics)
        if self.pt_planner is not None:
            local = rewards[rank * n_local : (rank + 1) * n_local]
            self._observe(out, local, groups, originals)

    def _defers(self, out: dict) -> bool:
        """Whether the shaper can wait for the loss's forward: that forward must see every row
        of the rollout batch at once (one process, the generation batch one micro-batch), with
        the weights that sampled them (one pass, generated just before), and go through
        posttrain's objective branch, which computes what TRL's loss computes only for inputs
        without tool results or images and TRL's loss options posttrain leaves off.

        The rollout batch then carries the rows' rewards, groups and estimator advantages
        (``pt_*``: TRL shuffles and splits them with the batch) and NaN advantages until the
        loss writes the shaped ones (``_shape_deferred``)."""
        args = self.args
        return (
            DEFER_SHAPER
            and self.accelerator.num_processes == 1
            and args.steps_per_generation == 1
            and self.num_iterations == 1
            and not (self.use_vllm and self.vllm_importance_sampling_correction)
            and not self.aux_loss_enabled
            and args.importance_sampling_level == "token"
            and args.top_entropy_quantile == 1.0
            and args.off_policy_mask_threshold is None
            and args.delta is None
            and not getattr(self, "_entropy_bonus_enabled", False)
            and not any(key in out for key in _TRL_ONLY_INPUTS)
        )

    def _shape_deferred(self, inputs: dict, logps: torch.Tensor) -> None:
        """The deferred shaper on the loss's rows (TRL shuffled them), from the loss forward's
        log-probs; the same arithmetic as ``_replace_advantages`` on the extra forward's."""
        mask = inputs["completion_mask"].float()
        seq_old = (logps * mask).sum(1) / mask.sum(1).clamp(min=1)
        g_mask = _lengths_mask(mask.sum(1))
        inp = AdvantageInputs(
            rewards=inputs["pt_rewards"],
            groups=inputs["pt_groups"],
            mask=g_mask,
            old_logps=seq_old[:, None] * g_mask,
            entropy=None,
        )
        shaper = adv.get_shaper(self.pt_settings.advantage_shaper)
        a, shaped = shaper(inp, inputs["pt_estimated"], **self.pt_pieces["shaper"])
        seq_a = (a * g_mask).sum(1) / g_mask.sum(1).clamp(min=1)
        inputs["advantages"] = seq_a
        pending, self._pt_deferred = self._pt_deferred, None
        if pending is None:
            return
        metrics = {**pending["metrics"], **shaped, **_advantage_stats(seq_a)}
        self._pt_log(metrics)
        out = pending["out"]  # the rollout batch in its own row order, for the sample
        out["advantages"] = seq_a[inputs["pt_row"].argsort()]
        self._record_samples(out, pending["groups"])

    @torch.no_grad()
    def _old_logps(self, out: dict) -> torch.Tensor:
        """The sampling policy's per-token log-probs (on-policy: the current weights)."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model,
            ids,
            attn,
            out["completion_ids"].size(1),
            self.args.per_device_train_batch_size,
        )
        return logps

    def _observe(self, out, rewards, groups, originals) -> None:
        """Report each prompt's rewards and completions back to the planner (its history)."""
        texts = self.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
        for q, row in enumerate(originals):
            rows = [i for i, g in enumerate(groups) if g == q]
            self.pt_planner.observe(
                _key(row),
                _question(row["prompt"]),
                [float(rewards[i]) for i in rows],
                [texts[i] for i in rows],
            )

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **media,
    ):
        """TRL's, run in length groups without their shared left padding (``padding.py``)
        when the planner may seed prompts (text only, rotary models, no MoE aux loss)."""
        parent = super()._get_per_token_logps_and_entropies
        args = (batch_size, compute_entropy, compute_aux_loss)
        plain = compute_aux_loss or any(v is not None for v in media.values())
        if self.pt_planner is None or plain or not _rotary(model):
            return parent(model, input_ids, attention_mask, logits_to_keep, *args, **media)

        def score(ids, mask):
            return parent(model, ids, mask, logits_to_keep, *args)

        return in_length_groups(score, input_ids, attention_mask, logits_to_keep)

    # ---------------------------------------------------------------- the objective
    def _compute_loss(self, model, inputs):
        s = self.pt_settings
        deferred = "pt_estimated" in inputs  # the shaper waits for this forward (_defers)
        own = (
            s.objective != "ppo_clip" or s.dual_clip is not None or self.pt_temperature is not None
        )
        if not (own or deferred):
            return super()._compute_loss(model, inputs)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, entropy, _ = self._get_per_token_logps_and_entropies(
            model, ids, attn, inputs["completion_ids"].size(1), compute_entropy=True
        )
        # what is trained on: the model's own tokens; a tool's result (tool_mask 0) is
        # attended to above but left out of every term below, as TRL's loss leaves it out
        mask = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        if deferred:
            self._shape_deferred(inputs, logps.detach())
        old = inputs.get("old_per_token_logps")
        a = inputs["advantages"]
        a = (a.unsqueeze(1) if a.dim() == 1 else a) * mask
        inp = ObjectiveInputs(
            logps=logps,
            old_logps=logps.detach() if old is None else old,
            ref_logps=inputs.get("ref_per_token_logps"),
            advantages=a,
            entropy=entropy.detach(),
            mask=mask,
        )
        hp = {"dual_clip": s.dual_clip} if s.dual_clip is not None else {}
        # the policy term only; the KL term is added below, after the sampler correction
        per_token, metrics = obj.get_objective(s.objective)(
            inp,
            epsilon_low=s.epsilon,
            epsilon_high=s.epsilon_high,
            beta=0.0,
            **hp,
            **self.pt_pieces["objective"],
        )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token = per_token * inputs["importance_sampling_ratio"]  # as TRL corrects its own
        if s.beta != 0.0:  # as TRL adds it: uncorrected for the sampler, k3 x ratio if asked
            kl = obj.k3_kl(logps, inp.ref_logps)
            if self.args.use_bias_correction_kl:
                kl = kl * torch.exp(logps - inp.old_logps)
            metrics["kl"] = masked_mean(kl, mask)
            per_token = per_token + s.beta * kl * mask
        loss = self._aggregate(per_token, mask, inputs)
        if self.pt_temperature is not None and self.model.training:
            self.pt_temperature.observe(entropy.detach(), mask)
        mode = "train" if self.model.training else "eval"
        metrics["entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
        for name, value in metrics.items():
            self._metrics[mode][name].append(float(value))
        return loss

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs) -> torch.Tensor:
        """The aggregation, scaled for gradient accumulation the way TRL scales its own."""
        name, training = self.pt_settings.loss_type, self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        if name in agg.GLOBAL_NORMALISED:  # dapo: tokens of the whole optimiser step
            num_items = inputs["num_items_in_batch"].clamp(min=1.0)
            if training:  # num_items spans the generation batch; one accumulation window here
                num_items = num_items * accumulation / self.args.steps_per_generation
            world = self.accelerator.num_processes
            return agg.get_aggregation(name)(per_token, mask, num_items=num_items, world_size=world)
        hp = {"max_completion_length": self.max_completion_length} if name == "dr_grpo" else {}
        return agg.get_aggregation(name)(per_token, mask, **hp) / accumulation

    # ---------------------------------------------------------------- bookkeeping
    def _pt_log(self, metrics: dict[str, float]) -> None:
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(float(value))

    state_file = STATE_FILE

    def extra_state(self) -> dict[str, Any]:
        return {
            "planner": self.pt_planner.state_dict() if self.pt_planner else None,
            "temperature": self.pt_temperature.state_dict() if self.pt_temperature else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.pt_planner and state.get("planner") is not None:
            self.pt_planner.load_state_dict(state["planner"])
        if self.pt_temperature and state.get("temperature") is not None:
            self.pt_temperature.load_state_dict(state["temperature"])


def _rotary(model: torch.nn.Module) -> bool:
    """Whether the model encodes positions with rotary embeddings (relative positions only)."""
    inner = unwrap_model(model)
    found = inner.__dict__.get("_posttrain_rotary")
    if found is None:
        found = any(type(m).__name__.endswith("RotaryEmbedding") for m in inner.modules())
        inner.__dict__["_posttrain_rotary"] = found
    return found


def _lengths_mask(lengths: torch.Tensor) -> torch.Tensor:
    """[B] completion lengths -> [B, longest] float mask (at least one column)."""
    width = int(lengths.max().item()) or 1
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).float()


def _group_stats(rewards: torch.Tensor, groups: torch.Tensor) -> dict:
    """The fraction of groups whose rewards do not vary (they carry no signal)."""
    zero = []
    for g in torch.unique(groups):
        r = rewards[groups == g]
        zero.append(float(r.numel() < 2 or bool(torch.all(r == r[0]))))
    return {"frac_zero_variance_groups": sum(zero) / max(1, len(zero))}


def _advantage_stats(a: torch.Tensor) -> dict:
    a = a.float()
    return {
        "advantages/mean": a.mean().item(),
        "advantages/std": a.std().item() if a.numel() > 1 else 0.0,
        "advantages/abs_max": a.abs().max().item(),
    }


def _key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True)


def _question(prompt) -> str:
    """A prompt's text for similarity search: the string, or its last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"] or prompt
    content = users[-1].get("content", "")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)
