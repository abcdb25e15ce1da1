"""The GRPO family: hyperparameters, the request block, the variants as presets.

Torch side: ``trainers/algorithms/grpo/``; formulas and each paper's settings:
``docs/algorithms/grpo.md`` and the pages it links (DAPO, Dr.GRPO, NGRPO, XRPO, HAPO).

A variant is a row of settings over the registries in ``trainers/core``
(advantage estimator, shaper, objective, aggregation, rollout planner,
temperature rule) plus TRL's clip widths, KL coefficient and reward scaling,
with each paper's published defaults. Every piece field of a job's
``hyperparameters`` that is not None overrides the preset; ``resolve`` returns
the job's hyperparameters with every piece field filled in, which is what the
trainer reads (``trl_native`` says whether TRL's own code computes them).

Adding a GRPO variant is one row of ``PRESETS`` (and, for a new piece, one entry in
a ``trainers/core`` registry and its name in the tuple here).

Departures from the papers: ``dapo`` is TRL's DAPO (asymmetric clip, token-level
aggregation over the step, overlong completions masked); DAPO's dynamic
sampling (drop zero-variance groups and refill) is not done. ``ngrpo`` drops no
groups (the paper drops all-correct ones). ``xrpo`` realises its allocator's
phases across visits of a prompt (``trainers/core/rollout.py``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from trainers.contract.environments import (
    EnvironmentSpec,
    check_names,
    check_reward_sources,
)
from trainers.contract.errors import JobError
from trainers.contract.graders.spec import Grader, reward_range, template_fields
from trainers.contract.graders.validate import check_grader_models
from trainers.contract.hparams import (
    MAX_STEPS,
    Auto,
    CommonHyperparameters,
    RolloutEngine,
    Strict,
)
from trainers.contract.methods.base import MethodModel
from trainers.contract.methods.grpo_async import check_async
from trainers.contract.modelfiles import ModelFileError
from trainers.contract.resources import Resources
from trainers.contract.rows import RowFormat
from trainers.contract.tools import MAX_TOOLS, Tool, check_unique

# The pieces' names: the keys of the trainers/core registries (a test checks they agree).
# Advantage estimators: a base normaliser per group.
ESTIMATOR_NAMES: tuple[str, ...] = ("grpo", "dr_grpo", "ngrpo", "hapo")
# Advantage shapers applied on top of any estimator ("none" = identity).
SHAPER_NAMES: tuple[str, ...] = ("none", "xrpo_novelty")
# Per-token surrogate objectives (clipping rules).
OBJECTIVE_NAMES: tuple[str, ...] = ("ppo_clip", "hapo")
# Loss aggregation over tokens (TRL's loss_type names).
AGGREGATION_NAMES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
# Rollout planners: how many samples each prompt gets, and from what context.
PLANNER_NAMES: tuple[str, ...] = ("uniform", "xrpo")
# Sampling temperature rules.
TEMPERATURE_RULE_NAMES: tuple[str, ...] = ("constant", "hapo_ats")

Aggregation = Literal[AGGREGATION_NAMES]  # type: ignore[valid-type]
Estimator = Literal[ESTIMATOR_NAMES]  # type: ignore[valid-type]
Shaper = Literal[SHAPER_NAMES]  # type: ignore[valid-type]
Objective = Literal[OBJECTIVE_NAMES]  # type: ignore[valid-type]
Planner = Literal[PLANNER_NAMES]  # type: ignore[valid-type]
TemperatureRule = Literal[TEMPERATURE_RULE_NAMES]  # type: ignore[valid-type]


class GRPOHyperparameters(CommonHyperparameters, RolloutEngine):
    """The GRPO family on TRL's GRPOTrainer. Fields left None take the variant's preset
    (``PRESETS`` below). Base learning rate 1e-6 (TRL's default) / 1e-5 (LoRA).

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
    num_iterations: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Passes over each generated batch (PPO's mu); None = the variant's recipe.",
    )
    steps_per_generation: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Optimizer steps (mini-batches) per generated batch; None = the variant's "
        "recipe. One policy update per batch (1 x 1) leaves the ratio at 1, so no clip binds.",
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
    hapo_literal_code_sign: bool = Field(
        False,
        description="HAPO: give tokens below the entropy pivot the authors' code's h̃ >= 0 "
        "instead of the paper's signed h̃ (clip widths, redistribution, temperature).",
    )
    hapo_raw_z: bool = Field(
        False,
        description="HAPO: adaptive temperature from the paper's raw z instead of the code's h̃.",
    )
    rollout_mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: each batch is generated by the weights being trained, then trained "
        "on. async (extension): TRL's asynchronous GRPO trainer, generating on the job's vLLM "
        "server while it trains on samples up to max_staleness policy versions old, with the "
        "PPO clip on the importance ratio against the server's log-probabilities; needs "
        "rollout_engine 'vllm' with vllm_mode 'server' (see check_async).",
    )
    max_staleness: int = Field(
        4,
        ge=0,
        le=64,
        description="rollout_mode 'async': policy versions a sample may lag the weights being "
        "trained before it is dropped unused (TRL's max_staleness; 0 = on-policy only).",
    )
    # Tools (when the block lists ``tools``; trainers/contract/tools.py).
    max_turns: int = Field(
        4,
        ge=1,
        le=64,
        description="Tools: model turns per episode that may end in tool calls (TRL's "
        "max_tool_calling_iterations); the turn after the last of them is the final answer.",
    )
    max_tool_calls: int = Field(
        8, ge=1, le=256, description="Tools: calls per episode; later ones get an error result."
    )
    tool_timeout_seconds: float = Field(
        10.0, gt=0.0, le=300.0, description="Tools: how long one try of a call may take."
    )
    tool_retries: int = Field(
        1, ge=0, le=5, description="Tools: retries of a call after a timeout, 5xx or no connection."
    )
    episode_tool_seconds: float = Field(
        120.0,
        gt=0.0,
        le=3600.0,
        description="Tools: time all of an episode's calls may take together; later calls get "
        "an error result.",
    )
    tool_max_reply_bytes: int = Field(
        8192,
        ge=16,
        le=1 << 20,
        description="Tools: longest reply read (the server's cap applies too); a longer one is "
        "a tool error the model sees.",
    )

    def chat_template_kwargs(self) -> dict[str, Any] | None:
        """Extra keywords for the chat template (none for plain GRPO)."""
        return None

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


PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath's GRPO (TRL's loss_type 'grpo': per-sequence mean, then batch mean). Its
    # recipe takes a single update per exploration stage (§4.2), so the clip never binds.
    "grpo": {"epsilon": 0.2, "epsilon_high": 0.2, "beta": 0.04, "loss_type": "grpo"},
    # DAPO as TRL implements it; 16 updates per rollout batch (§4.1: 512 prompts x 16,
    # mini-batches of 512 responses).
    "dapo": {
        "steps_per_generation": 16,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "beta": 0.0,
        "loss_type": "dapo",
        "mask_truncated_completions": True,
    },
    # Dr.GRPO: centred advantages, length-independent aggregation; 8 updates per rollout
    # batch (the authors' oat scripts: 128 prompts x 8, train batches of 128 responses).
    "dr_grpo": {
        "steps_per_generation": 8,
        "advantage_estimator": "dr_grpo",
        "scale_rewards": "none",
        "beta": 0.0,
        "loss_type": "dr_grpo",
    },
    # NGRPO: virtual-max advantages, asymmetric clip, token mean; 4 updates per rollout
    # batch (the authors' script: 1024 prompts x 8, mini-batches of 256 prompts).
    "ngrpo": {
        "steps_per_generation": 4,
        "advantage_estimator": "ngrpo",
        "epsilon": 0.16,
        "epsilon_high": 0.24,
        "beta": 0.0,
        "loss_type": "bnpo",
    },
    # XRPO: GRPO advantages sharpened by novelty, hierarchical allocation with ICL seeding.
    # Its schedule is not published: DAPO's 16 updates, whose loss settings it takes here.
    "xrpo": {
        "steps_per_generation": 16,
        "advantage_shaper": "xrpo_novelty",
        "rollout_planner": "xrpo",
        "beta": 0.0,
        "loss_type": "dapo",
    },
    # HAPO: token-level group average, adaptive clip + redistribution, adaptive temperature;
    # 16 updates per rollout batch (the authors' recipes: 512 prompts x 16, mini-batches of 32).
    "hapo": {
        "steps_per_generation": 16,
        "advantage_estimator": "hapo",
        "objective": "hapo",
        "temperature_rule": "hapo_ats",
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "dual_clip": 10.0,
        "beta": 0.0,
        "loss_type": "bnpo",
    },
}

# The value of each piece field when neither the preset nor the request sets it.
PIECE_DEFAULTS: dict[str, Any] = {
    "num_iterations": 1,
    "steps_per_generation": 1,
    "advantage_estimator": "grpo",
    "advantage_shaper": "none",
    "objective": "ppo_clip",
    "loss_type": "dapo",
    "rollout_planner": "uniform",
    "temperature_rule": "constant",
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": 0.2,
    "dual_clip": None,
    "scale_rewards": "group",
    "mask_truncated_completions": False,
}
GRPO_VARIANTS: tuple[str, ...] = tuple(PRESETS)

GRPOVariant = Literal[GRPO_VARIANTS]  # type: ignore[valid-type]


def trl_native(s: GRPOHyperparameters) -> bool:
    """True when TRL's own advantage and loss code computes exactly these (resolved)
    settings: z-scored or centred group advantages, PPO clipping, no dual clip, uniform
    rollouts, a constant temperature."""
    return (
        s.advantage_estimator in ("grpo", "dr_grpo")
        and s.advantage_shaper == "none"
        and s.objective == "ppo_clip"
        and s.dual_clip is None
        and s.rollout_planner == "uniform"
        and s.temperature_rule == "constant"
    )


def resolve(variant: str, hp: GRPOHyperparameters) -> GRPOHyperparameters:
    """``hp`` with every piece field set: the preset of ``variant``, overridden by every
    piece field the request set."""
    if variant not in PRESETS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(PRESETS)}")
    values = {**PIECE_DEFAULTS, **PRESETS[variant]}
    values.update({k: getattr(hp, k) for k in PIECE_DEFAULTS if getattr(hp, k) is not None})
    if values["advantage_estimator"] == "dr_grpo" and hp.scale_rewards is None:
        values["scale_rewards"] = "none"  # centred means unscaled
    settings = hp.model_copy(update=values)
    _check(settings, hp, variant)
    return settings


def _check(s: GRPOHyperparameters, hp: GRPOHyperparameters, variant: str) -> None:
    """Combinations that cannot mean what the request says; each message says how to fix it."""
    if s.advantage_estimator == "dr_grpo" and s.scale_rewards != "none":
        raise ValueError(
            "advantage_estimator 'dr_grpo' centres rewards without scaling them; drop "
            "scale_rewards or use advantage_estimator 'grpo'"
        )
    if s.advantage_estimator in ("ngrpo", "hapo") and hp.scale_rewards is not None:
        raise ValueError(
            f"scale_rewards applies to the 'grpo' estimator; '{s.advantage_estimator}' "
            "defines its own normalisation, so drop scale_rewards"
        )
    if not trl_native(s) and hp.importance_sampling_level == "sequence":
        raise ValueError(
            "importance_sampling_level 'sequence' (GSPO) is computed by TRL's own loss; "
            f"variant '{variant}' with these settings uses posttrain's per-token objective, "
            "so use importance_sampling_level 'token'"
        )
    if hp.rollout_mode == "async":
        check_async(s, hp, variant)
    elif hp.max_staleness != type(hp).model_fields["max_staleness"].default:
        # (compared with the default, not "was it set": a stored spec holds every field)
        raise ValueError(
            "max_staleness applies to rollout_mode 'async' only; drop it or set rollout_mode "
            "'async'"
        )
    if s.temperature_rule == "hapo_ats" and hp.rollout_engine == "vllm":
        raise ValueError(
            "temperature_rule 'hapo_ats' sets a temperature per token, which vLLM's sampler "
            "does not take; use rollout_engine 'transformers' or temperature_rule 'constant'"
        )


def check_weights(hp: GRPOHyperparameters, n_graders: int) -> None:
    if hp.reward_weights is not None and len(hp.reward_weights) != n_graders:
        raise ValueError(
            f"reward_weights has {len(hp.reward_weights)} entries for {n_graders} graders; "
            "give one weight per grader"
        )


def max_reward(graders: list, weights: list[float] | None) -> float | None:
    """The largest total reward the weighted graders can give, or None if unknown."""
    total = 0.0
    for grader, weight in zip(graders, weights or [1.0] * len(graders), strict=True):
        bounds = reward_range(grader)
        if bounds is None:
            return None
        total += weight * (bounds[1] if weight >= 0 else bounds[0])
    return total


def _check_virtual_reward(s: GRPOHyperparameters, graders: list) -> None:
    """NGRPO's virtual sample must score at least what a completion can: with a reward
    above r_max, an all-correct group would get a positive advantage."""
    top = max_reward(graders, s.reward_weights)
    if top is not None and s.ngrpo_virtual_reward < top:
        raise ValueError(
            f"ngrpo_virtual_reward ({s.ngrpo_virtual_reward:g}) is below the largest reward "
            f"the graders can give ({top:g}), so a group of best answers would be pushed up "
            f"further; set ngrpo_virtual_reward to {top:g}"
        )


def processes_of(resources: Resources) -> int:
    """Training processes a job asks for (one per GPU; on CPU ``processes``; default 1)."""
    return resources.gpus or resources.processes or 1


def graders_fields(graders: list) -> set[str]:
    """The dataset fields a list of graders reads (``{{item.x}}``)."""
    return set().union(*(template_fields(g) for g in graders)) if graders else set()


class GradedBlock(Strict):
    """A GRPO-family block: graders, a variant, GRPO hyperparameters, and the tools the
    model may call during its rollouts (extension)."""

    tools: list[Tool] | None = Field(
        None,
        min_length=1,
        max_length=MAX_TOOLS,
        description="Extension: OpenAI function tools, each bound to an HTTP endpoint "
        "(trainers.contract.tools); rollouts become multi-turn episodes.",
    )

    environment: EnvironmentSpec | None = Field(
        None,
        description="Extension: a stateful HTTP environment, one session per rollout "
        "(trainers.contract.environments); its tools join the job's tools and its reward, "
        "when asked for, the graders.",
    )

    _unique_tools = field_validator("tools")(classmethod(lambda cls, v: check_unique(v)))

    @field_validator("environment")
    @classmethod
    def _own_names(cls, value: EnvironmentSpec | None, info: ValidationInfo):
        return check_names(value, info.data.get("tools"))

    @model_validator(mode="after")
    def _check(self) -> GradedBlock:
        self._check_environment()
        if self.hyperparameters.rollout_mode == "async" and (self.tools or self.environment):
            raise ValueError(
                "rollout_mode 'async' does not run the job's tools or environment yet: "
                "posttrain's HTTP tools live in the training process, and TRL's asynchronous "
                "trainer calls tools from a separate rollout process; use rollout_mode 'sync'"
            )
        settings = resolve(self.variant, self.hyperparameters)
        check_weights(self.hyperparameters, len(self.grader_list()))
        if settings.advantage_estimator == "ngrpo" and not self.environment_reward():
            _check_virtual_reward(settings, self.grader_list())
        return self

    def environment_reward(self) -> bool:
        """Whether the environment's reward is a reward source of this job."""
        return self.environment is not None and self.environment.reward

    def _check_environment(self) -> None:
        check_reward_sources(self.environment, self.grader_list())

    def grader_list(self) -> list:
        raise NotImplementedError

    def graders_with_params(self, base: str) -> list[tuple[Any, str]]:
        """(grader, its request path) of every grader of the block."""
        return [(g, f"{base}.graders[{i}]") for i, g in enumerate(self.grader_list())]

    def with_graders(self, graders: list) -> dict[str, Any]:
        """The update that puts ``graders`` (as ``grader_list`` gives them) in the block."""
        return {"graders": graders}


class GRPOBlock(GradedBlock):
    variant: GRPOVariant = Field("grpo", description="Preset over the pieces; see the README.")
    graders: list[Grader] = Field(
        default_factory=list,
        max_length=16,
        description="Reward sources; may be empty when the environment gives the reward.",
    )
    hyperparameters: GRPOHyperparameters = Field(default_factory=GRPOHyperparameters)

    def grader_list(self) -> list:
        return list(self.graders)


class GradedMethod(MethodModel):
    """A member of the GRPO family: prompt rows, graders, the GRPO trainer."""

    accepted_formats: ClassVar[tuple[RowFormat, ...]] = (RowFormat.prompt_only,)
    algorithm: ClassVar[str] = "trainers.algorithms.grpo.method"
    records_samples: ClassVar[bool] = True

    def item_fields(self) -> set[str]:
        return graders_fields(self.block.grader_list())

    def job_algorithm(self) -> str:
        """``rollout_mode: "async"`` runs on TRL's AsyncGRPOTrainer."""
        if self.hyperparameters.rollout_mode == "async":
            return "trainers.algorithms.grpo_async.method"
        return self.algorithm

    def settings(self) -> GRPOHyperparameters:
        """The resolved hyperparameters the trainer runs with."""
        return resolve(self.block.variant, self.hyperparameters)

    def check_request(self, *, validation_file: str | None, judges: Collection[str] = ()) -> None:
        """Every score_model grader names a one-label sequence classifier directory or a
        model one of the server's judge endpoints serves (``judges``); every label_model
        the latter. An asynchronous job takes no validation file (TRL's asynchronous
        trainer does not evaluate)."""
        if validation_file and self.hyperparameters.rollout_mode == "async":
            raise JobError(
                "invalid_value",
                "validation_file: rollout_mode 'async' does not compute validation rewards "
                "(TRL's asynchronous GRPO trainer has no evaluation loop); drop the "
                "validation file or use rollout_mode 'sync'",
                "validation_file",
            )
        for grader, where in self.block.graders_with_params(f"method.{self.type}"):
            try:
                check_grader_models(grader, where, judges)
            except ModelFileError as exc:
                raise JobError("invalid_value", f"{exc.param}: {exc}", exc.param) from None

    def check_job(self, resources: Resources) -> None:
        """XRPO's planner re-spends each process's completions over that process's prompts:
        a prompt's group must not straddle two processes, and it cannot go through TRL's
        vLLM server path, which keeps every G-th prompt and asks for G completions each."""
        s = self.settings()
        if s.rollout_mode == "async" and processes_of(resources) > 1:
            raise ValueError(
                f"rollout_mode 'async' runs on one training process (TRL's asynchronous GRPO "
                f"trainer is run here without its FSDP2 setup), and the job asks for "
                f"{processes_of(resources)}; set resources to one GPU, or use rollout_mode "
                "'sync'"
            )
        if s.rollout_planner != "xrpo":
            return
        n, g = processes_of(resources), s.generations()
        batch = s.resolved_batch_size(rows=0)
        if batch % (g * n):
            raise ValueError(
                f"rollout_planner 'xrpo' needs whole groups on each of the job's {n} "
                f"processes: batch_size ({batch}) must be a multiple of num_generations x "
                f"processes ({g} x {n}); try batch_size {g * n * max(1, batch // (g * n))}"
            )
        if s.rollout_engine != "transformers" and s.vllm_mode == "server":
            raise ValueError(
                "rollout_planner 'xrpo' gives prompts uneven numbers of completions, which "
                "TRL's vLLM server path cannot generate (it asks for num_generations "
                "completions of every num_generations-th prompt); use vllm_mode 'colocate' or "
                "rollout_engine 'transformers'"
            )


class GRPOMethod(GradedMethod):
    """The GRPO family on TRL's GRPOTrainer: ``variant`` plus ``hyperparameters``."""

    type: Literal["grpo"]
    grpo: GRPOBlock
