"""Two-process DDP through the fused head trains exactly like one process on the union batch.

Two ranks (gloo, CPU, one thread each) each hold a different half of a batch
and run 3 SGD steps of a tiny Qwen2 with the fused LM head installed, the loss
computed through the ``DistributedDataParallel`` wrapper as
``ddp(..., labels=..., fused_lm_head=True)``. Each rank's loss is its token sum
of ``-log p`` divided by the GLOBAL token count (all-reduced) and multiplied by
the world size: DDP averages gradients over ranks, so the averaged gradient is
then exactly the gradient of the union batch's token mean. The parameters after
the 3 steps must equal those of one process training on the union batch.

The same harness shows that the check has teeth: calling the wrapped module
directly (``ddp.module(...)``) skips DDP's forward, so its reducer never arms
and each rank steps on its own half's gradient; normalising by the local token
count instead of the global one averages two per-rank means. Both diverge from
the union run by orders of magnitude more than the tolerance.

Everything that patches TRL (``use_posttrain_kernel`` rebinds a module global
in ``trl.trainer.utils``) happens in spawned children, never in pytest's own
process. The ``posttrain-packed`` rows run it with padding-free batches
(``trainers.packing``) behind the DDP wrapper. The ``trl`` kernel rows run the same
harness on TRL's own fused head as the control: if they pass and the ``posttrain``
rows fail, the fault is in ``trainers.fused_head``, not in this harness.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from trainers.tiny_model import build_tiny_model

WORLD = 2
STEPS = 3
LR = 0.2
ROWS, SEQ = 6, 20  # union batch; rank r trains rows [3r, 3r + 3)
TIMEOUT_S = 240  # ~10 s of CPU; generous for a loaded CI box
# Tolerance for fp32. DDP all-reduces the two half-batch gradients (sum, then
# / 2), while the single process sums every token's contribution in one go, so
# the gradients differ only by summation order: a few ulp of each gradient
# entry (|g| <~ 1, eps 1.2e-7). Three SGD steps at lr 0.2 carry that into the
# parameters, also through the forward of steps 2-3, which sees slightly
# different weights. Measured max |diff| is 1.2e-7 with either kernel, on
# parameters of magnitude ~0.01-1 (absolute error dominates: the near-zero
# entries, e.g. key biases, see relative errors up to ~3e-3, so rtol alone would
# not do), so atol 1e-6 / rtol 1e-5 leaves a ~8x margin while the wrong
# variants below differ by 0.06-0.12.
ATOL, RTOL = 1e-6, 1e-5
WRONG_MIN_DIFF = 1e-4  # a wrong variant must differ by at least this (100x ATOL)


# --------------------------------------------------------------------------- children
def _batch(vocab: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded union batch with prompt tokens masked; rank 0's half has more tokens.

    Unequal per-rank token counts are what make the global-count normalisation
    matter (with equal counts the mean of per-rank means would be correct).
    """
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(8, vocab, (ROWS, SEQ), generator=gen)
    lengths = [20, 18, 17, 9, 7, 12]
    prompts = [3, 5, 2, 4, 3, 6]
    mask = torch.zeros(ROWS, SEQ, dtype=torch.long)
    labels = torch.full((ROWS, SEQ), -100)
    for row, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        mask[row, :length] = 1
        labels[row, prompt:length] = ids[row, prompt:length]
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask, labels


def _model(model_dir: str, kernel: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = ("log_probs", "entropy", "is_top1")
    if kernel.startswith("posttrain"):
        from trainers.fused_head import install_fused_head, posttrain_kernel_active

        install_fused_head(model, outputs=outputs)
        assert posttrain_kernel_active()
        if kernel == "posttrain-packed":  # padding-free batches (trainers.packing)
            from trainers.packing import install_padding_free

            assert install_padding_free(model)
    else:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=outputs)
    return model.train()


def _train(model_dir, kernel, mode, ids, mask, labels) -> dict[str, torch.Tensor]:
    """``STEPS`` SGD steps on this process's rows; returns the parameters after them.

    mode: ``union`` (one process, whole batch, no DDP), ``ddp`` (the right way),
    ``bypass`` (DDP-wrapped but forward through ``.module``), ``local_mean``
    (through the wrapper, but normalised by this rank's token count).
    """
    model = _model(model_dir, kernel)
    world = 1 if mode == "union" else WORLD
    net = model if mode == "union" else torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    count = (labels[:, 1:] != -100).sum()
    total = count.clone()
    if world > 1:
        dist.all_reduce(total)  # what TRL's num_items_in_batch gathers across ranks
    denom = count if mode == "local_mean" else total
    caller = net.module if mode == "bypass" else net
    for _ in range(STEPS):
        out = caller(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        assert torch.equal(out.label_mask.sum(), count)
        loss = -out.log_probs.sum() * world / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, model_dir: str, out_dir: str, kernel: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD
    )
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        ids, mask, labels = _batch(config.vocab_size, config.pad_token_id)
        half = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        mine = (ids[half], mask[half], labels[half])
        results = {m: _train(model_dir, kernel, m, *mine) for m in ("ddp", "bypass", "local_mean")}
        if rank == 0:
            results["union"] = _train(model_dir, kernel, "union", ids, mask, labels)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- parent
def _spawn(model_dir: Path, out_dir: Path, kernel: str) -> list[dict]:
    """Run the two ranks, bounded by ``TIMEOUT_S``; returns each rank's results."""
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("OMP_NUM_THREADS", "1")  # read by torch at import in each child
        ctx = mp.start_processes(
            _worker,
            args=(str(model_dir), str(out_dir), kernel),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic()), grace_period=5):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"DDP run ({kernel}) did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("ddp") / "model", seed=0)


@pytest.fixture(scope="module")
def spawned(model_dir, tmp_path_factory):
    """kernel -> both ranks' results, each kernel's children spawned once per module."""
    cache: dict[str, list[dict]] = {}

    def get(kernel: str) -> list[dict]:
        if kernel not in cache:
            cache[kernel] = _spawn(model_dir, tmp_path_factory.mktemp(f"ddp-{kernel}"), kernel)
        return cache[kernel]

    return get


@pytest.fixture(params=["posttrain", "posttrain-packed", "trl"])
def runs(request, spawned):
    return spawned(request.param)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_through_the_wrapper_equals_the_union_batch(runs, model_dir):
    rank0, rank1 = runs
    union = rank0["union"]
    for name, p in union.items():
        torch.testing.assert_close(rank0["ddp"][name], p, atol=ATOL, rtol=RTOL, msg=name)
        # both ranks applied the same all-reduced gradient
        torch.testing.assert_close(rank1["ddp"][name], rank0["ddp"][name], atol=0, rtol=0)
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    moved = _max_diff(union, {n: p.detach() for n, p in initial.named_parameters()})
    assert moved > 100 * ATOL  # the steps did change the weights


@pytest.mark.parametrize("wrong", ["bypass", "local_mean"])
def test_the_check_catches_a_wrong_ddp_setup(runs, wrong):
    rank0, rank1 = runs
    union = rank0["union"]
    for rank in (rank0, rank1):
        assert _max_diff(rank[wrong], union) > WRONG_MIN_DIFF
        with pytest.raises(AssertionError):
            for name, p in union.items():
                torch.testing.assert_close(rank[wrong][name], p, atol=ATOL, rtol=RTOL)
    if wrong == "bypass":  # no gradient sync at all: the two replicas drift apart
        assert _max_diff(rank0[wrong], rank1[wrong]) > WRONG_MIN_DIFF


def test_posttrain_and_trl_kernels_train_alike(spawned):
    ours, trl = spawned("posttrain")[0]["union"], spawned("trl")[0]["union"]
    for name, p in trl.items():
        torch.testing.assert_close(ours[name], p, atol=ATOL, rtol=RTOL, msg=name)


def test_packed_batches_train_like_padded_ones_under_ddp(spawned):
    padded, packed = spawned("posttrain")[0], spawned("posttrain-packed")
    for name, p in padded["union"].items():
        for rank in packed:
            torch.testing.assert_close(rank["ddp"][name], p, atol=ATOL, rtol=RTOL, msg=name)
