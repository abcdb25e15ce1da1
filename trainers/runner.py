"""The one runner every method goes through: load, build, train, resume, pause, result.

A method is a ``MethodDef``: its TRL config class and the fields only it sets,
its row mapping (JSONL rows -> the records its trainer takes) and its trainer
class (a TRL trainer with ``PosttrainTrainerMixin`` first). Everything else is
here, once: reading the job's files, the tokenizer and model, the settings every
method shares (output dir, seed, epochs, batch size, learning rate and schedule,
logging, checkpoint interval, device), LoRA, the reporting callback (and the samples
recorder of a method that records samples), the job's trackers (``trainers.trackers``:
W&B, TensorBoard, MLflow, added here rather than through ``report_to``), padding-free
batches for a method whose hyperparameters have ``packing`` (``trainers.packing``),
resuming from the newest complete checkpoint, pausing at a step boundary, and the
typed ``RunResult``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainers.callbacks import NonFiniteCallback, ReportingCallback
from trainers.contract.checkpoints import checkpoint_dir, resumable_checkpoint
from trainers.contract.errors import JobError
from trainers.contract.hparams import CommonHyperparameters, PackedHyperparameters
from trainers.contract.plan import RunPlan
from trainers.models import load_causal_lm, load_tokenizer, lora_config, pick_device_dtype
from trainers.packing import install_on_trainer, resolve_packing
from trainers.records import build_dataset, read_rows
from trainers.reporting import PauseRequest, Reporter, main_process
from trainers.samples import SampleRecorder
from trainers.trackers import build_trackers


@dataclass
class TrainData:
    """A method's datasets: ``format`` is the row format the training file was read as."""

    format: Any
    train: Any
    eval: Any = None


@dataclass(frozen=True)
class MethodDef:
    """What makes a method a method; the runner does the rest.

    config_class:   the TRL config (``SFTConfig``, ``DPOConfig``...).
    trainer_class:  the trainer, ``PosttrainTrainerMixin`` first in its bases.
    records:        ``(rows, hyperparameters, param) -> list of records`` for one file
                    (``param`` names the file in errors).
    config_fields:  ``(plan, hyperparameters, data) -> dict`` of the config fields
                    only this method sets.
    trainer_kwargs: ``(plan, model, data) -> dict`` of extra trainer arguments
                    (a reference model, say).
    shuffle:        shuffle the training records once with the job seed (for trainers
                    that then read them in order).
    events:         ``(plan, hyperparameters, data) -> list[str]``: what the job's
                    events should say about how the method will run.
    loads_model:    the trainer loads the model itself from the path it is given (as
                    ``model``) instead of taking the runner's loaded copy, so only one
                    copy is ever held.
    """

    name: str
    config_class: type
    trainer_class: type
    records: Callable[[list, Any, str], list[dict[str, Any]]]
    config_fields: Callable[[RunPlan, Any, TrainData], dict[str, Any]]
    trainer_kwargs: Callable[[RunPlan, Any, TrainData], dict[str, Any]] = field(
        default=lambda plan, model, data: {}
    )
    shuffle: bool = False
    events: Callable[[RunPlan, Any, TrainData], list[str]] = field(
        default=lambda plan, hp, data: []
    )
    loads_model: bool = False


@dataclass(frozen=True)
class RunResult:
    """How a run ended: at ``step``, with ``checkpoint`` (relative to the data dir)."""

    step: int
    checkpoint: str
    trained_tokens: int
    paused: bool


def per_process_batch(plan: RunPlan, hp: CommonHyperparameters, rows: int) -> int:
    """``batch_size`` is the global batch: each of the run's processes takes its share,
    so a job trains alike on any process count."""
    batch = hp.resolved_batch_size(rows)
    if batch % plan.processes:
        raise JobError(
            "invalid_value",
            f"batch_size {batch} does not split over the job's {plan.processes} training "
            f"processes; use a multiple of {plan.processes}",
            "hyperparameters.batch_size",
        )
    return batch // plan.processes


def read_data(method: MethodDef, plan: RunPlan) -> TrainData:
    """The job's training (and validation) file as the method's datasets: the training file
    read as the first of the method's formats all its rows fit, the validation file in the
    same format."""
    spec = plan.spec
    hp = spec.method_hyperparameters()
    accepted = spec.method.accepted_formats
    fmt, rows = read_rows(plan.training_path, accepted, "training_file")
    train = build_dataset(method.records(rows, hp, "training_file"))
    if method.shuffle:
        train = train.shuffle(seed=spec.seed)
    evals = None
    if plan.validation_path:
        _, vrows = read_rows(plan.validation_path, (fmt,), "validation_file")
        evals = build_dataset(method.records(vrows, hp, "validation_file"))
    return TrainData(fmt, train, evals)


def common_config(plan: RunPlan, hp: CommonHyperparameters, data: TrainData) -> dict[str, Any]:
    """The config fields every method shares, from the job spec and the worker's plan."""
    device, dtype = pick_device_dtype()
    spec, every = plan.spec, plan.checkpoint_every_steps
    has_eval = data.eval is not None
    return {
        "output_dir": str(plan.output_dir),
        "seed": spec.seed,
        "data_seed": spec.seed,
        "num_train_epochs": hp.resolved_epochs(),
        "max_steps": hp.max_steps or -1,
        "per_device_train_batch_size": per_process_batch(plan, hp, len(data.train)),
        "per_device_eval_batch_size": per_process_batch(plan, hp, len(data.train)),
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.resolved_learning_rate(spec.training_type == "lora"),
        "lr_scheduler_type": hp.lr_scheduler_type,
        "warmup_steps": hp.warmup_ratio,  # a float below 1 is a fraction of the run
        "weight_decay": hp.weight_decay,
        "logging_steps": 1,
        "logging_nan_inf_filter": False,  # a NaN loss is logged as NaN (NonFiniteCallback)
        "save_strategy": "steps",
        "save_steps": every,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": every if has_eval else None,
        "include_num_input_tokens_seen": "non_padding",
        "report_to": "none",  # the job's trackers are added guarded (trainers.trackers)
        "disable_tqdm": True,
        "use_cpu": device == "cpu",
        "bf16": str(dtype) == "torch.bfloat16",
        "gradient_checkpointing": hp.resolved_gradient_checkpointing(device),
        "dataloader_num_workers": 0,
    }


def run_method(
    method: MethodDef, plan: RunPlan, reporter: Reporter, pause: PauseRequest | None = None
) -> RunResult:
    """Train ``plan`` with ``method``, resuming from the newest complete checkpoint."""
    spec = plan.spec
    hp = spec.method_hyperparameters()
    tokenizer = load_tokenizer(spec.model)
    data = read_data(method, plan)
    reporter.event(
        f"Loaded {len(data.train)} training rows ({data.format} format)"
        + (f" and {len(data.eval)} validation rows" if data.eval is not None else "")
    )
    for note in method.events(plan, hp, data):
        reporter.event(note)
    model = spec.model if method.loads_model else load_causal_lm(spec.model)
    pack = False
    if isinstance(hp, PackedHyperparameters):
        pack, note = resolve_packing(hp.packing, model)
        reporter.event(note)
    # a method's own fields win over the shared ones it needs to set differently
    args = method.config_class(
        **{**common_config(plan, hp, data), **method.config_fields(plan, hp, data)}
    )
    callback = ReportingCallback(plan, reporter, pause)
    diverged = NonFiniteCallback()
    trackers = build_trackers(plan, reporter)
    trainer = method.trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(spec.lora) if spec.training_type == "lora" else None,
        callbacks=[callback, diverged, *trackers],
        **method.trainer_kwargs(plan, model, data),
    )
    if pack:
        install_on_trainer(trainer)
    every, rows = spec.sampling()
    if every and main_process():
        trainer.sample_recorder = SampleRecorder(reporter, every, rows, trackers)
    resume = resumable_checkpoint(plan.output_dir)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if diverged.step is not None:
        advice, param = spec.method.divergence_hint()
        raise JobError(
            "training_diverged",
            f"training stopped at step {diverged.step}: {diverged.what}. The weights of that "
            f"step were not saved; the last checkpoint before it is kept. {advice}",
            param=param,
        )
    step = trainer.state.global_step
    return RunResult(
        step=step,
        checkpoint=plan.relative(checkpoint_dir(plan.output_dir, step)),
        trained_tokens=int(trainer.state.num_input_tokens_seen or 0),
        paused=callback.paused_at is not None,
    )
