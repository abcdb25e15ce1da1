"""What a job may use: its worker queue, GPUs, processes and strategy, and its LoRA adapter.

Both are blocks of the job spec (``resources``, ``lora``) that method hooks may read
(``MethodModel.check_job``) and the workers place (``workers.placement``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trainers.contract.hparams import Strict

# Module names that are an LM head in the model families transformers ships.
_HEAD_MODULES = frozenset({"lm_head", "embed_out", "output", "output_layer"})


class LoraSettings(Strict):
    """LoRA adapter settings, used when ``training_type == "lora"`` (peft ``LoraConfig``)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank. Default 16 (common SFT choice).")
    alpha: int = Field(
        32, ge=1, description="Scaling numerator; effective scale alpha/r. Default 2r."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; 'all-linear' = every linear but the head."
    )

    @model_validator(mode="after")
    def _no_head(self) -> LoraSettings:
        if isinstance(self.target_modules, list):
            heads = sorted(_HEAD_MODULES.intersection(self.target_modules))
            if heads:
                raise ValueError(
                    f"LoRA on the LM head ({', '.join(heads)}) is not supported: posttrain's fused "
                    "log-prob kernel reads the head's base weight; drop it from target_modules "
                    "(or train the head with training_type 'full')"
                )
        return self


# A worker queue's name: letters, digits, '.', '_' and '-' (no ':', so it can never name
# another Redis key), the names kombu keeps for itself excepted. Celery's keys live under
# their own prefix as well (``workers.redis_client.broker_transport_options``).
QUEUE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RESERVED_QUEUES = frozenset({"unacked", "unacked_index", "unacked_mutex"})


def check_queue_name(name: str) -> str:
    """``name`` if it may name a queue; ValueError saying why not."""
    if not re.fullmatch(QUEUE_NAME, name):
        raise ValueError(
            f"queue {name[:80]!r} is not a queue name: 1 to 64 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    if name in RESERVED_QUEUES:
        raise ValueError(f"queue {name!r} is a name the message broker keeps for itself")
    return name


# Distributed strategies of a multi-process job, each one of accelerate's own launch
# configurations (``workers.launch``): DDP, FSDP2, DeepSpeed ZeRO stage 2 or 3.
STRATEGIES = ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


class Resources(Strict):
    """What one job may use on its worker (extension).

    A job runs on a worker of ``queue`` (one queue per GPU class); every training
    process sees exactly that worker's devices (``CUDA_VISIBLE_DEVICES``). More than
    one process (``gpus`` > 1, or ``processes`` > 1 on CPU) runs under
    ``accelerate launch`` with ``strategy``.
    """

    gpus: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs, one training process each; 0 = CPU. Default (null): 1 on a GPU "
        "worker, 0 on a CPU-only worker.",
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Training processes of a CPU job (gloo); default 1. A GPU job runs one "
        "process per GPU.",
    )
    strategy: Literal[STRATEGIES] = Field(
        "ddp", description="How processes share the model: ddp, fsdp2, deepspeed_zero2/3."
    )
    queue: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Worker queue (GPU class) whose workers run the job: one a live worker "
        "serves or the server's POSTTRAIN_QUEUES names (and the tenant may use); default = "
        "the API's POSTTRAIN_QUEUE.",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=512, description="torch threads; default = the worker's share of cores."
    )

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str | None) -> str | None:
        return None if value is None else check_queue_name(value)

    @model_validator(mode="after")
    def _check_processes(self) -> Resources:
        if self.gpus and self.processes is not None and self.processes != self.gpus:
            raise ValueError(
                f"processes ({self.processes}) must equal gpus ({self.gpus}): a GPU job runs "
                "one process per GPU; drop processes"
            )
        if self.gpus == 0 and self.strategy != "ddp":
            raise ValueError(
                f"strategy '{self.strategy}' needs GPUs (on CPU accelerate runs DDP over "
                "gloo); set gpus >= 1 or use 'ddp'"
            )
        return self
