"""Hyperparameters: one shared base every method extends with only its own fields.

OpenAI's fine-tuning API names three hyperparameters per method (``n_epochs``,
``batch_size``, ``learning_rate_multiplier``, each a value or ``"auto"``); DPO
adds ``beta``. posttrain accepts those exactly and adds extensions in the same
style. The learning rate a job trains at is the method's base rate (which
differs for full and LoRA training) times ``learning_rate_multiplier``, unless
an absolute ``learning_rate`` is given.

``batch_size`` is the global micro-batch: the job's training processes split it
evenly (``trainers.runner.per_process_batch``). One optimizer step sees
``batch_size x gradient_accumulation_steps`` rows (a DPO row is one pair), on any
process count.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.judges.spec import Judge as JudgeField
from trainers.methods import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SHAPERS,
    AGGREGATIONS,
    DPO_LOSS_TYPES,
    OBJECTIVES,
    ROLLOUT_PLANNERS,
    TEMPERATURE_RULES,
)

Auto = Literal["auto"]
# Upper bounds of the common settings (README, "Limits"). The API refuses larger values
# with a 400; they are far past any useful run, and keep a typo from queueing a job that
# would never end or overflow a counter.
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 4096
MAX_STEPS = 1_000_000
MAX_LR_MULTIPLIER = 100.0
MAX_LEARNING_RATE = 1.0  # the effective rate: base x multiplier, or learning_rate
Epochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]
Multiplier = Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)]
DPOLossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommonHyperparameters(Strict):
    """Fields every method has. Subclasses set ``base_learning_rate`` (full, LoRA)."""

    base_learning_rate: ClassVar[tuple[float, float]] = (2e-5, 2e-4)

    n_epochs: Epochs | Auto = Field("auto", description="Passes over the training file; auto = 3.")
    batch_size: BatchSize | Auto = Field(
        "auto",
        description="Rows per micro-batch, split over the job's processes; auto = min(8, rows "
        "in the file). An optimizer step sees batch_size x gradient_accumulation_steps rows.",
    )
    learning_rate_multiplier: Multiplier | Auto = Field(
        "auto", description="Scales the method's base learning rate; auto = 1.0."
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=MAX_LEARNING_RATE,
        description="Absolute learning rate (extension); beats the multiplier.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule over the run."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps of warmup.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Stop after this many optimizer steps (overrides n_epochs).",
    )
    max_seq_length: int = Field(
        1024, ge=8, le=131072, description="Tokens per row (prompt + answer); longer rows are cut."
    )

    def resolved_epochs(self) -> int:
        return 3 if self.n_epochs == "auto" else self.n_epochs

    def resolved_batch_size(self, rows: int) -> int:
        return max(1, min(8, rows)) if self.batch_size == "auto" else self.batch_size

    def resolved_learning_rate(self, lora: bool) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        mult = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        return self.base_learning_rate[1 if lora else 0] * mult

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v: float | str) -> float | str:
        if isinstance(v, str):
            return v
        if not math.isfinite(v):
            raise ValueError("learning_rate_multiplier must be a finite number or 'auto'")
        rate = max(cls.base_learning_rate) * v
        if rate > MAX_LEARNING_RATE:
            raise ValueError(
                f"learning_rate_multiplier {v:g} makes the learning rate {rate:g}, above "
                f"{MAX_LEARNING_RATE:g}"
            )
        return v


class SupervisedHyperparameters(CommonHyperparameters):
    """SFT. Base learning rate 2e-5 (full) / 2e-4 (LoRA), common choices for SFT."""

    loss_on_prompt: bool = Field(
        False, description="Train on prompt/user tokens too; default trains on completions only."
    )


class DPOHyperparameters(CommonHyperparameters):
    """DPO on TRL's DPOTrainer. Base learning rate 1e-6 (TRL's default, full) / 5e-6 (LoRA:
    an adapter needs larger steps for the same change)."""

    base_learning_rate: ClassVar[tuple[float, float]] = (1e-6, 5e-6)

    beta: float | Auto = Field(
        "auto", description="Strength of the pull toward the reference model; auto = 0.1."
    )
    loss_type: DPOLossType | list[DPOLossType] = Field(
        "sigmoid",
        description="TRL loss type, or a list combined with loss_weights "
        "(e.g. ['sigmoid', 'sft'] is RPO).",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight per loss_type entry; default 1.0 each."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Probability a label is flipped (robust) or EXO's epsilon."
    )

    def resolved_beta(self) -> float:
        return 0.1 if self.beta == "auto" else self.beta

    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _check_dpo(self) -> DPOHyperparameters:
        if isinstance(self.beta, float) and self.beta <= 0:
            raise ValueError("beta must be > 0 or 'auto'")
        types = self.loss_types()
        if not types:
            raise ValueError("loss_type must name at least one loss")
        if "exo_pair" in types and self.label_smoothing == 0.0:
            raise ValueError(
                "loss_type 'exo_pair' needs label_smoothing > 0 (its epsilon; the EXO paper "
                "uses 1e-3)"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has "
                f"{len(types)}; give one weight per loss type"
            )
        return self


Aggregation = Literal[AGGREGATIONS]  # type: ignore[valid-type]
Estimator = Literal[ADVANTAGE_ESTIMATORS]  # type: ignore[valid-type]
Shaper = Literal[ADVANTAGE_SHAPERS]  # type: ignore[valid-type]
Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]
Planner = Literal[ROLLOUT_PLANNERS]  # type: ignore[valid-type]
TemperatureRule = Literal[TEMPERATURE_RULES]  # type: ignore[valid-type]


class GRPOHyperparameters(CommonHyperparameters):
    """The GRPO family on TRL's GRPOTrainer. Fields left None take the variant's preset
    (``trainers/grpo_presets.py``). Base learning rate 1e-6 (TRL's default) / 1e-5 (LoRA).

    ``batch_size`` counts completions, not prompts: one (global) micro-batch holds
    ``batch_size / num_generations`` prompts' whole groups.
    """

    base_learning_rate: ClassVar[tuple[float, float]] = (1e-6, 1e-5)

    num_generations: int = Field(8, ge=2, le=256, description="Completions per prompt (G).")
    max_completion_length: int = Field(
        256, ge=1, le=32768, description="Tokens generated per completion at most."
    )
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")
    num_iterations: int = Field(
        1, ge=1, le=64, description="Policy updates per generated batch (PPO's mu)."
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token (GRPO) or per sequence (GSPO)."
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per grader; default 1.0 each (rewards are summed)."
    )
    eval_interval: int | Auto = Field(
        "auto", description="Steps between validation rewards; auto = the checkpoint interval."
    )
    eval_samples: int | Auto = Field(
        "auto", description="Completions per validation prompt; auto = 1."
    )
    # The pieces and their settings; None = the variant's preset.
    advantage_estimator: Estimator | None = None
    advantage_shaper: Shaper | None = None
    objective: Objective | None = None
    loss_type: Aggregation | None = Field(None, description="Token aggregation (TRL's name).")
    rollout_planner: Planner | None = None
    temperature_rule: TemperatureRule | None = None
    beta: float | None = Field(None, ge=0.0, description="KL (k3) coefficient to the reference.")
    epsilon: float | None = Field(None, gt=0.0, lt=1.0, description="Lower clip width.")
    epsilon_high: float | None = Field(None, gt=0.0, description="Upper clip width.")
    dual_clip: float | None = Field(None, gt=1.0, description="Dual-clip bound c for A < 0.")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="z-score by the group's std, the batch's, or not at all."
    )
    mask_truncated_completions: bool | None = Field(
        None, description="Leave completions cut at max_completion_length out of the loss."
    )
    ngrpo_virtual_reward: float = Field(1.0, description="NGRPO: r_max of the virtual sample.")
    ngrpo_virtual_count: int = Field(1, ge=0, le=64, description="NGRPO: copies of r_max (k).")
    xrpo_novelty_lambda: float = Field(2.5, ge=0.0, description="XRPO novelty strength.")
    xrpo_novelty_kappa: float = Field(0.5, ge=0.0, description="XRPO novelty cap (x A).")
    xrpo_alpha: float = Field(0.05, gt=0.0, lt=1.0, description="XRPO CI level of the allocator.")
    xrpo_ucb_lambda: float = Field(0.1, ge=0.0, description="XRPO exploration bonus.")
    xrpo_exemplars: int = Field(2, ge=0, le=8, description="XRPO ICL exemplars (K).")
    hapo_alpha: float = Field(1.0, ge=0.0, description="HAPO adaptive-clip strength.")
    hapo_beta_a: float = Field(1.0, ge=0.0, le=1.0, description="HAPO advantage redistribution.")
    hapo_pivot_quantile: float = Field(0.8, gt=0.0, lt=1.0, description="HAPO entropy pivot.")
    hapo_tau: float = Field(0.05, ge=0.0, lt=1.0, description="HAPO temperature range (tau).")
    # Where rollouts are generated.
    rollout_engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto = vLLM on a GPU worker that has it, else transformers."
    )
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM in the training process, or a server the worker starts."
    )

    def resolved_eval_samples(self) -> int:
        return 1 if self.eval_samples == "auto" else self.eval_samples

    def generations(self) -> int:
        """Completions per prompt (G) this job samples."""
        return self.num_generations

    @model_validator(mode="after")
    def _check_grpo(self) -> GRPOHyperparameters:
        g = self.generations()
        if isinstance(self.batch_size, int) and self.batch_size % g:
            raise ValueError(
                f"batch_size ({self.batch_size} completions) must be a multiple of "
                f"num_generations ({g}) so every micro-batch holds whole groups; "
                f"try batch_size {max(g, self.batch_size // g * g)}"
            )
        if self.max_completion_length >= self.max_seq_length:
            raise ValueError(
                f"max_completion_length ({self.max_completion_length}) must be below "
                f"max_seq_length ({self.max_seq_length}), which also holds the prompt"
            )
        if isinstance(self.eval_samples, int) and not 1 <= self.eval_samples <= 64:
            raise ValueError("eval_samples must be from 1 to 64, or 'auto'")
        if isinstance(self.eval_interval, int) and not 1 <= self.eval_interval <= MAX_STEPS:
            raise ValueError(f"eval_interval must be from 1 to {MAX_STEPS}, or 'auto'")
        return self

    def resolved_batch_size(self, rows: int) -> int:
        """Completions per micro-batch: auto = two prompts' groups."""
        return 2 * self.generations() if self.batch_size == "auto" else self.batch_size


class ReinforcementHyperparameters(GRPOHyperparameters):
    """OpenAI's reinforcement fine-tuning hyperparameters, run as GRPO (every GRPO field is
    accepted too). ``compute_multiplier`` scales the completions sampled per prompt;
    ``reasoning_effort`` is passed to the chat template (templates that ignore it, ignore
    it); ``eval_interval``/``eval_samples`` are GRPO's own."""

    compute_multiplier: float | Auto = Field(
        "auto", description="Scales num_generations (rounded, at least 2); auto = 1.0."
    )
    reasoning_effort: Literal["auto", "default", "low", "medium", "high"] = Field(
        "auto", description="Passed to the chat template as reasoning_effort; auto = not passed."
    )

    def generations(self) -> int:
        mult = 1.0 if self.compute_multiplier == "auto" else self.compute_multiplier
        return max(2, round(self.num_generations * mult))

    @model_validator(mode="before")
    @classmethod
    def _positive_multiplier(cls, data: Any) -> Any:
        mult = data.get("compute_multiplier") if isinstance(data, dict) else None
        if isinstance(mult, (int, float)) and not isinstance(mult, bool) and not mult > 0:
            raise ValueError("compute_multiplier must be > 0 or 'auto'")
        return data


class BCOHyperparameters(CommonHyperparameters):
    """BCO (binary classifier optimisation) on posttrain's trainer. Base learning rate 1e-6
    (TRL's BCO example) / 5e-6 (LoRA); warmup defaults to TRL's example's 10%."""

    base_learning_rate: ClassVar[tuple[float, float]] = (1e-6, 5e-6)

    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps of warmup.")
    beta: float | Auto = Field(
        "auto", description="Scale of the implicit reward beta*(log pi - log pi_ref); auto = 0.1."
    )
    balanced_delta: bool = Field(
        False,
        description="Reward shift delta = half the sum of the two classes' running means, "
        "instead of the running mean of every reward (TRL's).",
    )
    udm: bool = Field(
        False, description="Underlying distribution matching: reweight thumbs-down rows."
    )
    udm_prompt_sample_size: int = Field(
        1024, ge=2, le=100_000, description="Prompts per class the UDM classifier is fitted on."
    )
    udm_min_density_ratio: float = Field(0.5, gt=0.0, description="Lower clip of the weights.")
    udm_max_density_ratio: float = Field(10.0, gt=0.0, description="Upper clip of the weights.")
    udm_embedding_model: str | None = Field(
        None,
        description="Local sentence-embedding model path for UDM; default = the reference "
        "model's mean-pooled last hidden state.",
    )

    def resolved_beta(self) -> float:
        return 0.1 if self.beta == "auto" else self.beta

    @model_validator(mode="after")
    def _check_bco(self) -> BCOHyperparameters:
        if isinstance(self.beta, float) and self.beta <= 0:
            raise ValueError("beta must be > 0 or 'auto'")
        if self.udm_min_density_ratio >= self.udm_max_density_ratio:
            raise ValueError("udm_min_density_ratio must be below udm_max_density_ratio")
        return self


class OREOHyperparameters(CommonHyperparameters):
    """OREO (Wang et al. 2024, arXiv 2412.16145): a policy and a separate value model trained
    on scored trajectories with the soft-Bellman residual. Base learning rate 5e-6 (the
    paper's) / 5e-5 (LoRA); cosine schedule with 3% warmup for both models (the scripts')."""

    base_learning_rate: ClassVar[tuple[float, float]] = (5e-6, 5e-5)

    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule of both the policy and the value model."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps of warmup.")
    beta: float = Field(0.03, gt=0.0, description="Scale of the log-ratio in the residual.")
    alpha: float | Auto = Field(
        "auto",
        description="Weight of the full-vocabulary KL(pi || pi_ref) term; "
        "auto = 0.01 (token), 0.1 (step), 0.3 (response).",
    )
    variant: Literal["token", "step", "response"] = Field(
        "token", description="Where the residual is evaluated: every token, each step, s_0."
    )
    step_delimiters: list[str] = Field(
        default_factory=lambda: ["\n"],
        min_length=1,
        description="Strings that end a step (variant 'step'); MATH used ['\\n', '. ', '.$ '].",
    )
    value_learning_rate: float | Auto = Field(
        "auto", description="Learning rate of the value model; auto = the policy's."
    )
    reward_scale: float = Field(1.0, description="R = reward * reward_scale + reward_offset.")
    reward_offset: float = Field(0.0, description="See reward_scale.")

    _ALPHA: ClassVar[dict[str, float]] = {"token": 0.01, "step": 0.1, "response": 0.3}

    def resolved_alpha(self) -> float:
        return self._ALPHA[self.variant] if self.alpha == "auto" else self.alpha

    def resolved_value_learning_rate(self, policy_lr: float) -> float:
        return policy_lr if self.value_learning_rate == "auto" else self.value_learning_rate

    @model_validator(mode="after")
    def _check_oreo(self) -> OREOHyperparameters:
        if isinstance(self.alpha, float) and self.alpha < 0:
            raise ValueError("alpha must be >= 0 or 'auto'")
        if isinstance(self.value_learning_rate, float) and not 0 < self.value_learning_rate <= 1:
            raise ValueError("value_learning_rate must be in (0, 1] or 'auto'")
        if not all(self.step_delimiters):
            raise ValueError("step_delimiters must not hold an empty string")
        return self


class EGPOHyperparameters(CommonHyperparameters):
    """EGPO (Zhou, Fazel & Du 2025, arXiv 2503.08942): online Nash preference optimisation
    with extragradient steps, judged by ``judge``. One iteration is two optimizer steps (a
    half step and a full step), so ``max_steps`` counts optimizer steps and must be even.

    ``batch_size`` counts prompts: each prompt gets y and y' (``temperature``, ``top_k``)
    and the opponent y'' (``opponent_temperature``, ``opponent_top_k``). Base learning rate
    5e-7 (the paper's code, full) / 5e-6 (LoRA); weight decay 0.01 (the paper's code). A
    tiny or randomly initialised model needs far larger rates (the tests use 1e-3..1e-2).
    """

    base_learning_rate: ClassVar[tuple[float, float]] = (5e-7, 5e-6)

    judge: JudgeField = Field(description="The pairwise judge that gives P(A ≻ B).")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    beta: float = Field(0.1, gt=0.0, le=100.0, description="KL coefficient to the reference.")
    temperature: float = Field(
        2.0, gt=0.0, le=10.0, description="Sampling temperature of y and y'."
    )
    top_k: int = Field(10, ge=0, description="Top-k sampling of y and y'; 0 = off.")
    opponent_temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Sampling temperature of the opponent y''."
    )
    opponent_top_k: int = Field(0, ge=0, description="Top-k sampling of y''; 0 = off.")
    max_new_tokens: int = Field(
        64, ge=1, le=32768, description="Tokens generated per completion at most."
    )
    normalize_logprobs: bool = Field(
        True,
        description="Length-normalised log-probs in h (summed up to and including EOS, "
        "divided by the token count), as the paper's code; false = summed (the theory's).",
    )
    extragradient: bool = Field(
        True,
        description="Half step + full step per iteration (EGPO); false = every step is a "
        "plain step on fresh samples (online IPO).",
    )
    rollout_engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto = vLLM on a GPU worker that has it, else transformers."
    )
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="vLLM in the training process, or a server the worker starts."
    )

    @model_validator(mode="after")
    def _check_egpo(self) -> EGPOHyperparameters:
        if self.max_steps is not None and self.extragradient and self.max_steps % 2:
            raise ValueError(
                f"max_steps ({self.max_steps}) must be even: one EGPO iteration is a half step "
                f"and a full step; try {self.max_steps + 1}"
            )
        if self.max_new_tokens >= self.max_seq_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below max_seq_length "
                f"({self.max_seq_length}), which also holds the prompt"
            )
        return self
