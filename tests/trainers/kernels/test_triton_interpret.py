"""Triton kernels of trainers.kernels, run by the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before triton decorates the kernels, and it
must not leak into the other test modules, so all interpreter checks run in
one subprocess (``_run_checks``) whose results the tests below assert on.
Truth is the fp64 chunked path on the same (upcast) numbers. Shapes stay
small (N <= 64, H <= 64, V <= 2048): the interpreter is ~1000x slower than torch.
GPU tests at the bottom run the compiled kernels and are skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch

from tests.trainers.kernels import run_python
from trainers.kernels.head import HEAD_OUTPUTS

HAS_TRITON = importlib.util.find_spec("triton") is not None
SMALL = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}


def _inputs(n, hdim, vocab, dtype=torch.float32, *, bias=True, scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=gen) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen) / hdim**0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, b, y


def _outputs_and_grads(fn, h, w, b, y, gl, ge, **kw):
    """[logp, entropy, *grads] of sum(gl * logp) + sum(ge * entropy); a None weight
    leaves its output out of the loss (so its upstream grad is None, not zeros)."""
    logp, ent = fn(h, w, y, bias=b, return_entropy=True, **kw)
    terms = [(o * g).sum() for o, g in ((logp, gl), (ent, ge)) if g is not None]
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    return [logp, ent, *torch.autograd.grad(sum(terms), leaves)]


def _rel_err(got, ref) -> float:
    """Worst over tensors of max|got - ref| / max|ref|."""
    return max(
        ((a.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()
        for a, r in zip(got, ref, strict=True)
    )


def _against_fp64(
    inputs, outputs=("logp", "ent"), *, temperature=1.0, num_splits=None, config=SMALL
):
    """Relative error of the Triton path against the fp64 chunked path."""
    from trainers.kernels.chunked import chunked_token_logprobs
    from trainers.kernels.triton_logprob import triton_token_logprobs

    h, w, b, y = inputs
    gen = torch.Generator().manual_seed(1)
    gl, ge = (
        torch.randn(h.shape[0], generator=gen) if k in outputs else None for k in ("logp", "ent")
    )
    got = _outputs_and_grads(
        triton_token_logprobs,
        h,
        w,
        b,
        y,
        gl,
        ge,
        temperature=temperature,
        config=config,
        num_splits=num_splits,
    )
    ref_in = [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad)
        for t in (h, w, b)
    ]
    ref = _outputs_and_grads(
        chunked_token_logprobs,
        *ref_in,
        y,
        None if gl is None else gl.double(),
        None if ge is None else ge.double(),
        temperature=temperature,
        chunk_n=16,
        block_v=64,
    )
    assert all(g.dtype == t.dtype for g, t in zip(got[2:], (h, w, b), strict=False))
    return _rel_err(got, ref)


# ----------------------------------------------------------------------------- checks
def check_kernels_are_interpreted():
    from trainers.kernels import triton_logprob

    return 0.0 if type(triton_logprob._forward_kernel).__name__ == "InterpretedFunction" else 1.0


def check_fp32_ragged_bias_temperature_splits():
    return _against_fp64(_inputs(37, 40, 301), temperature=0.7, num_splits=3)


def check_fp32_medium_shape():
    cfg = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_K": 32}
    return _against_fp64(_inputs(64, 64, 2048, bias=False), config=cfg, num_splits=4)


def check_logp_only_grads():
    return _against_fp64(_inputs(20, 24, 100), ("logp",), num_splits=2)


def check_entropy_only_grads():
    return _against_fp64(_inputs(20, 24, 100), ("ent",), temperature=1.5)


def check_extreme_logits():
    return _against_fp64(_inputs(24, 8, 200, bias=False, scale=300.0), num_splits=2)


def check_targets_on_block_and_split_edges():
    h, w, b, y = _inputs(8, 16, 100)
    y = torch.tensor([0, 31, 32, 63, 64, 95, 96, 99])  # BLOCK_V=32, 2 splits of 64 columns
    return _against_fp64((h, w, b, y), num_splits=2, temperature=0.9)


def _ratio_to_naive(dtype, scale):
    """Worst over outputs and grads of err(triton) / err(naive in dtype), both vs fp64."""
    from trainers.kernels.chunked import chunked_token_logprobs
    from trainers.kernels.reference import naive_token_logprobs
    from trainers.kernels.triton_logprob import triton_token_logprobs

    h, w, b, y = _inputs(32, 32, 300, dtype, scale=scale)
    gl, ge = torch.randn(32), torch.randn(32)
    got = _outputs_and_grads(triton_token_logprobs, h, w, b, y, gl, ge, config=SMALL, num_splits=2)
    naive = _outputs_and_grads(naive_token_logprobs, h, w, b, y, gl, ge)
    truth = _outputs_and_grads(
        chunked_token_logprobs,
        *(t.detach().double().requires_grad_() for t in (h, w, b)),
        y,
        gl.double(),
        ge.double(),
    )
    return max(
        _rel_err([a], [t]) / (_rel_err([n], [t]) + 1e-7)
        for a, n, t in zip(got, naive, truth, strict=True)
    )


def check_bf16_no_worse_than_naive_bf16():
    return _ratio_to_naive(torch.bfloat16, 2.0)


def check_fp16_no_worse_than_naive_fp16():
    return _ratio_to_naive(torch.float16, 1.0)


def check_split_count_changes_little_and_runs_repeat_bitwise():
    from trainers.kernels.triton_logprob import triton_token_logprobs

    h, w, b, y = _inputs(16, 16, 300)
    runs = [
        triton_token_logprobs(h, w, y, bias=b, return_entropy=True, config=SMALL, num_splits=s)
        for s in (1, 5, 5)
    ]
    if not all(torch.equal(a, b) for a, b in zip(runs[1], runs[2], strict=True)):
        return 1.0
    return _rel_err(runs[0], runs[1])


def check_frozen_weight_skips_dw_gemm():
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainers.kernels.triton_logprob import triton_token_logprobs

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket).split(".")[-1]] += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for trainable in (True, False):
        h, w, _, y = _inputs(20, 16, 90, bias=False)
        w.requires_grad_(trainable)
        logp = triton_token_logprobs(h, w, y, config=SMALL)
        with Count() as mode:
            logp.sum().backward()
        counts.append(mode.ops["mm"] + mode.ops["addmm"] + mode.ops["addmm_"])
        if (w.grad is None) == trainable:
            return 1.0
    return 0.0 if counts == [2, 1] else 1.0  # one chunk: dh GEMM (+ dW GEMM)


def check_backward_orders_over_many_windows():
    """Both loop orders, each cut into one-block dz windows, and a frozen ``hidden``."""
    from trainers.kernels import triton_logprob

    budget = triton_logprob.DZ_BUDGET_BYTES
    triton_logprob.DZ_BUDGET_BYTES = 1  # windows of one block: 3 row or 10 column windows
    try:
        errs = [
            _against_fp64(_inputs(37, 40, 301), temperature=0.7, config={**SMALL, "order": order})
            for order in ("rows", "cols")
        ]
        h, w, b, y = _inputs(37, 40, 301)
        errs.append(_against_fp64((h.detach(), w, b, y), num_splits=2))
    finally:
        triton_logprob.DZ_BUDGET_BYTES = budget
    return max(errs)


def check_default_order_accumulates_the_smaller_gradient():
    from trainers.kernels.triton_logprob import _backward_order

    want = {
        (100, 50, True, True): "rows",  # N > V: the fp32 accumulator is dW's
        (50, 100, True, True): "cols",  # N < V (every LM head): dh's
        (50, 100, True, False): "rows",  # frozen head: no accumulator
        (100, 50, False, True): "cols",  # frozen inputs: no accumulator
    }
    return float(sum(_backward_order(*k) != v for k, v in want.items()))


def check_ignore_index_through_public_api():
    from trainers.kernels import naive_token_logprobs, token_logprobs

    h, w, b, y = _inputs(12, 16, 40)
    y[[0, 7]] = -100
    gl, ge = torch.randn(12), torch.randn(12)
    got = _outputs_and_grads(token_logprobs, h, w, b, y, gl, ge, impl="triton")
    if not (
        got[0][[0, 7]].eq(0).all() and got[1][[0, 7]].eq(0).all() and got[2][[0, 7]].eq(0).all()
    ):
        return 1.0
    ref = _outputs_and_grads(naive_token_logprobs, h, w, b, y, gl, ge)
    return _rel_err(got, ref)


def check_top1_matches_argmax():
    """top1 is the fraction of rows where it disagrees with argmax of the logits (want 0)."""
    from trainers.kernels import token_stats

    h, w, b, y = _inputs(40, 16, 96, bias=True)
    logits = h.detach() @ w.detach().t() + b.detach()
    y[:20] = logits[:20].argmax(dim=1)  # half the rows hit, the rest are random
    y[5] = -100
    got = token_stats(h, w, y, bias=b, impl="triton").top1
    want = logits.argmax(dim=1) == y
    want[5] = False
    return (got != want).float().mean().item()


def _head_both(inputs, outputs, **transform):
    """head_stats through the Triton kernels (inputs' dtype) and the fp64 chunked path:
    (Triton results, fp64 results), each [logp, entropy, log_sum_sq_probs, mean_logits,
    dh, dW, db] with upstream grads on logp and entropy."""
    from trainers.kernels.head import head_stats

    h, w, b, y = inputs
    gen = torch.Generator().manual_seed(2)
    gl, ge = torch.randn(h.shape[0], generator=gen), torch.randn(h.shape[0], generator=gen)

    def run(hh, ww, bb, impl, **kw):
        st = head_stats(hh, ww, y, bias=bb, outputs=outputs, impl=impl, **transform, **kw)
        loss = (st.logp * gl.to(st.logp.dtype)).sum() + (st.entropy * ge.to(st.logp.dtype)).sum()
        grads = torch.autograd.grad(loss, [hh, ww, bb])
        return [st.logp, st.entropy, st.log_sum_sq_probs, st.mean_logits, *grads], st.is_top1

    got, top1 = run(h, w, b, "triton")
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref, ref_top1 = run(*ref_in, "torch", chunk_n=16, block_v=64)
    return got, ref, top1, ref_top1


def check_softcap_scale_and_every_output():
    """A soft-capped, scaled head (Gemma 2's final_logit_softcapping): logp, entropy,
    log_sum_sq_probs, mean_logits and the three grads against fp64 chunked."""
    inputs = _inputs(29, 24, 230, scale=6.0)
    got, ref, _, _ = _head_both(inputs, HEAD_OUTPUTS, temperature=0.8, logit_scale=1.7, softcap=5.0)
    return _rel_err(got, ref)


def check_log_sum_sq_probs_and_mean_without_softcap():
    got, ref, _, _ = _head_both(_inputs(21, 16, 150), HEAD_OUTPUTS, temperature=1.3)
    return _rel_err(got, ref)


def check_top1_first_index_on_ties():
    """Duplicate head rows make exact ties (small integers: every sum is exact in any
    order): a target on the later twin is not top-1, on the first one it is, as argmax
    says, on the Triton and on the chunked path. Returns the mismatch count."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randint(-3, 4, (8, 16), generator=gen).float()
    w = torch.randint(-3, 4, (96, 16), generator=gen).float()
    maxes = (h @ w[:90].t()).argmax(dim=1)
    w[90:] = w[maxes[:6]]  # rows 90..95 repeat the maxima of rows 0..5, later in the vocab
    y = torch.cat([torch.arange(90, 96), maxes[6:]])  # later twins, then true maxima
    inputs = (h.requires_grad_(), w.requires_grad_(), torch.zeros(96, requires_grad=True), y)
    _, _, top1, ref_top1 = _head_both(inputs, HEAD_OUTPUTS)
    want = (h.detach() @ w.detach().t()).argmax(dim=1) == y
    return float((top1 != want).sum() + (ref_top1 != want).sum())


CHECKS = {  # name -> max relative error allowed (vs fp64 unless noted)
    "kernels_are_interpreted": 0.0,
    "fp32_ragged_bias_temperature_splits": 1e-5,
    "fp32_medium_shape": 1e-5,
    "logp_only_grads": 1e-5,
    "entropy_only_grads": 1e-5,
    "extreme_logits": 5e-5,  # entropy: fp32 naive and chunked also sit at 1.7e-5 here
    "targets_on_block_and_split_edges": 1e-5,
    "bf16_no_worse_than_naive_bf16": 1.1,  # an error ratio, not an error
    "fp16_no_worse_than_naive_fp16": 1.1,
    "split_count_changes_little_and_runs_repeat_bitwise": 1e-6,
    "frozen_weight_skips_dw_gemm": 0.0,
    "backward_orders_over_many_windows": 1e-5,
    "default_order_accumulates_the_smaller_gradient": 0.0,  # a count of wrong choices
    "ignore_index_through_public_api": 1e-5,
    "top1_matches_argmax": 0.0,  # a mismatch fraction
    "softcap_scale_and_every_output": 1e-5,
    "log_sum_sq_probs_and_mean_without_softcap": 1e-5,
    "top1_first_index_on_ties": 0.0,  # a mismatch count
}


def _run_checks() -> dict:
    results = {}
    for name in CHECKS:
        torch.manual_seed(0)
        try:
            results[name] = float(globals()[f"check_{name}"]())
        except Exception as exc:  # reported by the test of that name
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def interpreted() -> dict:
    code = (
        "import os, json; os.environ['TRITON_INTERPRET'] = '1'; "
        "from tests.trainers.kernels import test_triton_interpret as m; "
        "print(json.dumps(m._run_checks()))"
    )
    return json.loads(run_python("-W", "ignore", "-c", code).strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted_kernel(interpreted, name):
    err = interpreted[name]
    assert not isinstance(err, str), err
    assert err <= CHECKS[name], f"relative error {err:.3g} > {CHECKS[name]:.3g}"


def test_module_imports_and_fails_cleanly_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import torch; "
        "from trainers.kernels import token_logprobs, triton_logprob as t; "
        "assert not t.triton_available(); h = torch.randn(3, 4); w = torch.randn(5, 4); "
        "y = torch.tensor([0, 1, 4]); token_logprobs(h, w, y)\n"
        "try:\n    token_logprobs(h, w, y, impl='triton')\nexcept RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e)\nelse:\n    raise SystemExit(1)"
    )
    run_python("-c", code, timeout=120)


# ----------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton"
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu_compiled_kernels_match_fp64(dtype, tol):
    from trainers.kernels import token_logprobs
    from trainers.kernels.chunked import chunked_token_logprobs

    h, w, b, y = _inputs(1000, 256, 50257, dtype)
    gl, ge = torch.randn(1000), torch.randn(1000)
    dev = [t.detach().cuda().requires_grad_() for t in (h, w, b)]
    got = _outputs_and_grads(token_logprobs, *dev, y.cuda(), gl.cuda(), ge.cuda(), temperature=0.8)
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = _outputs_and_grads(
        chunked_token_logprobs, *ref_in, y, gl.double(), ge.double(), temperature=0.8
    )
    assert _rel_err([t.cpu() for t in got], ref) <= tol


@pytest.mark.gpu
@needs_gpu
def test_gpu_bitwise_deterministic_and_memory_bounded():
    from trainers.kernels import token_logprobs
    from trainers.kernels.triton_logprob import DZ_BUDGET_BYTES

    n, hdim, vocab = 4096, 896, 151936
    h, w, _, y = (
        t.cuda() if t is not None else None
        for t in _inputs(n, hdim, vocab, torch.bfloat16, bias=False)
    )
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    gl, ge = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    runs = []
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        got = _outputs_and_grads(token_logprobs, h, w, None, y, gl, ge)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        runs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    grads_bytes = (n + vocab) * hdim * 2  # the bf16 dh and dW themselves
    accumulator = n * hdim * 4  # N < V: the fp32 dh accumulator (not a 4 V H dW one)
    assert peak <= grads_bytes + accumulator + DZ_BUDGET_BYTES + 64 * 2**20


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gpu_soft_capped_head_every_output_matches_fp64(dtype, tol):
    """The compiled kernels on a soft-capped, scaled head (Gemma 2's transform): logp,
    entropy, log_sum_sq_probs, mean_logits and the grads against the fp64 chunked path."""
    from trainers.kernels.head import head_stats

    h, w, b, y = _inputs(512, 128, 32000, dtype, scale=4.0)
    gen = torch.Generator().manual_seed(2)
    gl, ge = torch.randn(512, generator=gen), torch.randn(512, generator=gen)
    transform = {"temperature": 0.8, "logit_scale": 1.5, "softcap": 30.0}

    def run(hh, ww, bb, yy, g1, g2, impl):
        st = head_stats(hh, ww, yy, bias=bb, outputs=HEAD_OUTPUTS, impl=impl, **transform)
        loss = (st.logp * g1).sum() + (st.entropy * g2).sum()
        grads = torch.autograd.grad(loss, [hh, ww, bb])
        return [st.logp, st.entropy, st.log_sum_sq_probs, st.mean_logits, *grads], st.is_top1

    dev = [t.detach().cuda().requires_grad_() for t in (h, w, b)]
    got, top1 = run(*dev, y.cuda(), gl.cuda(), ge.cuda(), "triton")
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref, ref_top1 = run(*ref_in, y, gl.double(), ge.double(), "torch")
    assert _rel_err([t.cpu() for t in got], ref) <= tol
    if dtype == torch.float32:
        assert (top1.cpu() != ref_top1).sum() <= 1  # a near-tie may round either way


@pytest.mark.gpu
@needs_gpu
def test_gpu_top1_first_index_on_exact_ties():
    """Exact ties (small-integer rows, duplicated later in the vocabulary) follow argmax's
    first-index rule on the compiled kernels too."""
    from trainers.kernels.head import head_stats

    gen = torch.Generator().manual_seed(3)
    h = torch.randint(-3, 4, (64, 32), generator=gen).float()
    w = torch.randint(-3, 4, (4096, 32), generator=gen).float()
    maxes = (h @ w[:4000].t()).argmax(dim=1)
    w[4000:4048] = w[maxes[:48]]
    y = torch.cat([torch.arange(4000, 4048), maxes[48:]])
    st = head_stats(h.cuda(), w.cuda(), y.cuda(), outputs=("is_top1",), impl="triton")
    want = (h @ w.t()).argmax(dim=1) == y
    assert torch.equal(st.is_top1.cpu(), want)
