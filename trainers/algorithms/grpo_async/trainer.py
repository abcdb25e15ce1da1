"""Building TRL's ``AsyncGRPOTrainer`` for a run: what changes between a GPU host with
vLLM and a CPU host with the stand-in server of the tests, and nothing else.

* attention: TRL's ``tree_fa3`` runs FlashAttention-3 from the Hub on CUDA; on any other
  device ``varlen.install`` swaps in the plain-torch kernel first;
* weight sync: with vLLM importable TRL chooses (NCCL, or the LoRA adapter alone over
  HTTP when the server has ``--enable-lora``); without it, ``FileWeightTransfer``, unless
  the model is a LoRA adapter and the server takes adapters, which TRL's adapter sync
  already sends over HTTP alone;
* MFU: TRL asks ``torch.cuda.get_device_name`` for the device's peak FLOPs while
  building the trainer, which raises on a CPU-only torch; off CUDA the peak is unknown
  (``None``: TRL then logs no MFU, as for any device it does not know);
* stopping the rollout worker: TRL's ``AsyncRolloutWorker.stop`` sets a
  multiprocessing ``Event`` the child's stop watcher waits on, and an ``Event``'s
  ``set`` waits for every waiter to wake: when the child has died (a reward function
  raised, say) nothing ever wakes and the trainer hangs in its ``finally`` instead of
  raising. ``guard_worker_stop`` skips the signal to a child that is no longer alive;
* the rollout worker: TRL's ``AsyncRolloutWorker`` refuses to be built without vLLM
  importable, although its child process only talks HTTP to the server (aiohttp) and
  never imports vLLM; without vLLM that guard is answered ``True`` while the trainer
  builds it, and only then.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import PartialState

from trainers.algorithms.grpo_async import varlen
from trainers.algorithms.grpo_async.transfer import FileWeightTransfer


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


@contextlib.contextmanager
def _rollout_worker_without_vllm() -> Iterator[None]:
    import trl.experimental.async_grpo.async_rollout_worker as worker

    guard = worker.is_vllm_available
    worker.is_vllm_available = lambda *a, **k: True
    try:
        yield
    finally:
        worker.is_vllm_available = guard


@contextlib.contextmanager
def _no_peak_flops_off_cuda(device) -> Iterator[None]:
    import trl.experimental.async_grpo.async_grpo_trainer as trainer

    if device.type == "cuda":
        yield
        return
    original = trainer.get_peak_flops_per_device
    trainer.get_peak_flops_per_device = lambda *a, **k: None
    try:
        yield
    finally:
        trainer.get_peak_flops_per_device = original


def server_takes_adapters(url: str, timeout: float) -> bool:
    from trl.experimental.async_grpo.vllm_client import VLLMClient

    client = VLLMClient(url, timeout)
    client.wait_for_server_ready(poll_interval_s=0.5)
    return client.get_server_info()["lora_config"] is not None


@contextlib.contextmanager
def adapted_for_host(args: Any, peft_config: Any = None) -> Iterator[dict[str, Any]]:
    """Around ``AsyncGRPOTrainer.__init__``: installs what this host needs and yields the
    extra keyword arguments (``weight_transfer``) to pass it."""
    device = PartialState().device
    varlen.install(device)
    if vllm_importable():
        with _no_peak_flops_off_cuda(device):
            yield {}
        return
    transfer = None
    if peft_config is None or not server_takes_adapters(
        args.vllm_server_base_url, args.vllm_server_timeout
    ):
        transfer = FileWeightTransfer(
            args.vllm_server_base_url, Path(args.output_dir) / ".policy_weights"
        )
    with _rollout_worker_without_vllm(), _no_peak_flops_off_cuda(device):
        yield {"weight_transfer": transfer}


def guard_worker_stop(trainer: Any) -> None:
    """Make ``trainer.rollout_worker.stop()`` return at once for a dead child (see above)."""
    worker = getattr(trainer, "rollout_worker", None)
    stop = getattr(worker, "stop", None)
    if stop is None or not hasattr(worker, "_process"):
        return

    def stop_unless_dead() -> None:
        process = worker._process
        if process is not None and process._popen is not None and not process.is_alive():
            process.join(timeout=5)
            worker._process = None
            return
        stop()

    worker.stop = stop_unless_dead


def build_trainer(model: str, args: Any, *, peft_config: Any = None, **kwargs: Any):
    """``AsyncGRPOTrainer(model, args=args, peft_config=peft_config, **kwargs)`` with the
    attention kernel, weight transfer and rollout worker this host can run."""
    from trl.experimental.async_grpo import AsyncGRPOTrainer

    with adapted_for_host(args, peft_config) as extra:
        trainer = AsyncGRPOTrainer(model, args=args, peft_config=peft_config, **kwargs, **extra)
    guard_worker_stop(trainer)
    return trainer
