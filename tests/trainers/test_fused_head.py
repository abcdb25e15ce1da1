"""posttrain's kernel behind TRL 1.16's fused LM head (``trainers.fused_head``).

Kernel level: ``PosttrainLogProbFunction.apply`` against TRL's own
``ChunkedLogProbFunction`` (which computes in fp32 whatever the input dtype, so
the two agree to fp32 precision) and against fp64 full logits (tight).
Model level, in fp64: the fused forward against each model's own forward for a
logit-scaled (Granite), a soft-capped (Gemma 2) and an MoE (Qwen2-MoE) config,
LoRA, the LM-head guard and the trainer mixin. Every test puts back the kernel
binding it found, so nothing leaks into other test modules.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
import trl.trainer.utils as trl_utils
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Trainer,
    TrainingArguments,
)
from trl.kernels import ChunkedLogProbFunction

from tests.trainers.kernels import run_python
from trainers import fused_head
from trainers.base import PosttrainTrainerMixin
from trainers.fused_head import (
    LoraOnLMHeadError,
    PosttrainLogProbFunction,
    fused_head_settings,
    install_fused_head,
    posttrain_kernel_active,
    restore_trl_kernel,
    trl_kernel,
    use_posttrain_kernel,
)
from trainers.kernels.reference import naive_head_stats
from trainers.logprobs import FullLogitsForbidden, causal_lm_logprobs, forbid_full_logits

F64 = torch.float64
ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
NAMES = ("logp", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.5,  # logits of a few units, so a soft-cap of 3 bites
}


@pytest.fixture(autouse=True)
def _keep_kernel_binding():
    before = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton)
    torch.manual_seed(0)
    yield
    trl_utils._ChunkedLogProbFunction, trl_utils._use_triton = before


# ----------------------------------------------------------------------------- kernel level
def _inputs(dtype, n=64, hdim=24, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=gen, dtype=F64).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=gen, dtype=F64) * 0.6).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen, dtype=F64) * 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[: n // 3] = torch.addmm(b, h, w.t())[: n // 3].argmax(-1)  # (monotone transforms keep it)
    return h, w, b, y


def _outputs_and_grads(fn, h, w, b, y, gl, ge, *args):
    out = fn(h, w, b, y, *args)
    terms = [(o * g).sum() for o, g in ((out[0], gl), (out[1], ge)) if g is not None]
    return out, torch.autograd.grad(sum(terms), (h, w, b))


def _rel(a, r) -> float:
    a, r = a.detach().double(), r.detach().double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


CASES = [  # temperature, softcap, logit_scale
    (1.0, None, 1.0),
    (0.7, None, 0.125),  # Granite-style 1 / logits_scaling
    (1.0, 3.0, 1.0),
    (0.6, 3.0, 2.5),
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("temperature,softcap,scale", CASES)
@pytest.mark.parametrize("grads", ["both", "entropy"])
def test_matches_trls_kernel_outputs_and_grads(dtype, temperature, softcap, scale, grads):
    h, w, b, y = _inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    gl = None if grads == "entropy" else torch.randn(64, generator=gen, dtype=dtype)
    ge = torch.randn(64, generator=gen, dtype=dtype)
    args = (temperature, 128, softcap, scale, ALL)  # TRL tiles the 300-token vocab in 3
    ours, ours_g = _outputs_and_grads(PosttrainLogProbFunction.apply, h, w, b, y, gl, ge, *args)
    trls, trls_g = _outputs_and_grads(ChunkedLogProbFunction.apply, h, w, b, y, gl, ge, *args)
    assert torch.equal(ours[4], trls[4]) and 0 < int(ours[4].sum()) < 64
    for name, a, r in zip(NAMES[:4], ours[:4], trls[:4], strict=True):
        assert _rel(a, r) <= 1e-5, name
    for a, r in zip(ours_g, trls_g, strict=True):
        assert a.dtype == dtype and _rel(a, r) <= 1e-5
    assert all(not t.requires_grad for t in ours[2:])
    if dtype == F64:  # TRL is fp32 inside; ours is fp64 for fp64 inputs: check against truth
        kw = {"bias": b, "temperature": temperature, "logit_scale": scale, "softcap": softcap}
        truth = naive_head_stats(h, w, y, **kw)
        for name, a in zip(NAMES, ours, strict=True):
            assert a.dtype == (torch.bool if name == "is_top1" else F64)
            assert (a == truth[name]).all() if name == "is_top1" else _rel(a, truth[name]) < 1e-12
        terms = [(truth[k] * g).sum() for k, g in (("logp", gl), ("entropy", ge)) if g is not None]
        for a, r in zip(ours_g, torch.autograd.grad(sum(terms), (h, w, b)), strict=True):
            assert _rel(a, r) < 1e-12


def test_only_requested_outputs_are_computed():
    h, w, b, y = _inputs(torch.float32)
    out = PosttrainLogProbFunction.apply(h, w, b, y, 1.0, 4096, None, 1.0, ("entropy",))
    assert out[0] is not None and out[1] is not None and out[2:] == (None, None, None)
    out = PosttrainLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ("log_probs",))
    assert out[1:] == (None, None, None, None)


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_is_top1_follows_argmax_first_on_exact_ties(softcap):
    """Rows 5, 30 and 35 of W are equal, so their (integer, exact) logits tie at the max:
    only the first of them counts as top-1, as with argmax and TRL's kernel."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randint(-2, 3, (40, 8), generator=gen).float()
    v = torch.tensor([3.0, 3, -3, 3, 3, -3, 3, 3])
    w[[5, 30, 35]] = v
    h = v.sign().repeat(6, 1).requires_grad_()  # z_j = h . W_j: 24 at 5/30/35, < 24 elsewhere
    y = torch.tensor([5, 30, 35, 7, 5, 39])
    want = torch.tensor([True, False, False, False, True, False])
    args = (1.0, 16, softcap, 1.0, ("is_top1",))  # TRL's tiles put 5, 30, 35 in three blocks
    assert torch.equal(PosttrainLogProbFunction.apply(h, w, None, y, *args)[4], want)
    assert torch.equal(ChunkedLogProbFunction.apply(h, w, None, y, *args)[4], want)
    from trainers.kernels import head_stats

    for block_v in (4, 16, 64):  # ties across blocks and inside one block
        got = head_stats(h, w, y, softcap=softcap, outputs=("is_top1",), block_v=block_v)
        assert torch.equal(got.is_top1, want), block_v


def test_non_positive_scale_and_bad_outputs_are_refused():
    h, w, b, y = _inputs(torch.float32, n=4)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        PosttrainLogProbFunction.apply(h, w, b, y, 1.0, 128, None, 0.0, ALL)
    with pytest.raises(ValueError, match="logit_scale"):
        PosttrainLogProbFunction.apply(h, w, b, y, 1.0, 128, 30.0, -1.0, ALL)
    with pytest.raises(ValueError, match="unknown outputs"):
        PosttrainLogProbFunction.apply(h, w, b, y, 1.0, 128, None, 1.0, ("logits",))


_INTERPRETED = """
import os, json
os.environ["TRITON_INTERPRET"] = "1"
import torch
from trainers.kernels import head_stats, triton_logprob
torch.manual_seed(0)
h, w, b = torch.randn(24, 16), torch.randn(100, 16) * 0.5, torch.randn(100)
y = torch.randint(0, 100, (24,))
y[:8] = (h @ w.t() + b)[:8].argmax(-1)
h, w, b = (t.requires_grad_() for t in (h, w, b))
res = {}
for impl in ("triton", "torch"):
    st = head_stats(h, w, y, bias=b, temperature=0.7, logit_scale=0.5, impl=impl,
                    outputs=("entropy", "mean_logits", "is_top1"))
    grads = torch.autograd.grad(st.logp.sum() + 0.3 * st.entropy.sum(), (h, w, b))
    res[impl] = ([st.logp, st.entropy, st.mean_logits, *grads], st.is_top1)
err = max(((a - r).abs().max() / r.abs().max()).item()
          for a, r in zip(res["triton"][0], res["torch"][0]))
capped = [head_stats(h, w, y, softcap=3.0, impl=impl, outputs=("entropy",))
          for impl in ("triton", "torch")]
cap_err = max((capped[0].logp - capped[1].logp).abs().max().item(),
              (capped[0].entropy - capped[1].entropy).abs().max().item())
print(json.dumps({"err": err, "top1": torch.equal(res["triton"][1], res["torch"][1]),
                  "hits": int(res["torch"][1].sum()), "cap_err": cap_err,
                  "interpreted": type(triton_logprob._forward_kernel).__name__}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_branch_of_the_head_under_the_interpreter():
    """The CUDA route (scale folded into T, linear mean_logits, the soft-cap) run by
    Triton's interpreter, against the torch route."""
    got = json.loads(run_python("-W", "ignore", "-c", _INTERPRETED).strip().splitlines()[-1])
    assert got["interpreted"] == "InterpretedFunction"
    assert got["err"] <= 1e-5 and got["top1"] and got["hits"] >= 8
    assert got["cap_err"] <= 1e-5


# ----------------------------------------------------------------------------- binding
def test_use_and_restore_rebind_trls_module_global():
    use_posttrain_kernel()
    use_posttrain_kernel()  # idempotent
    assert trl_utils._ChunkedLogProbFunction is PosttrainLogProbFunction
    assert posttrain_kernel_active()
    with trl_kernel():
        assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert posttrain_kernel_active()
    restore_trl_kernel()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


def _qwen2(**kw):
    cfg = Qwen2Config(**{**TINY, **kw}, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).double().eval()


def _batch(vocab=100, rows=3, seq=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return ids, mask, labels


def test_the_patched_forward_calls_posttrains_kernel_and_matches_trls(monkeypatch):
    model = _qwen2().float()
    ids, mask, labels = _batch()
    install_fused_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    calls = []
    real = fused_head.head_stats
    monkeypatch.setattr(fused_head, "head_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert calls == [1]
    with trl_kernel():
        trls = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert calls == [1]
    for name in ("loss", "log_probs", "entropy", "mean_logits"):
        assert _rel(getattr(ours, name), getattr(trls, name)) <= 1e-5, name
    assert torch.equal(ours.is_top1, trls.is_top1) and torch.equal(ours.label_mask, trls.label_mask)
    assert ours.log_probs[labels[:, 1:] == -100].eq(0).all()


def test_install_recognises_an_existing_head_and_adds_missing_outputs():
    model = _qwen2()
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    patched = model.forward
    settings = fused_head_settings(model)
    assert (settings.temperature, settings.outputs) == (0.7, ("log_probs", "entropy"))
    assert settings.installed_by == "trl"
    assert install_fused_head(model) is model and model.forward is patched  # as installed
    assert install_fused_head(model, outputs=("entropy",)) is model and model.forward is patched
    with pytest.raises(ValueError, match=r"temperature 0\.7"):
        install_fused_head(model, temperature=1.0)
    install_fused_head(model, outputs=("is_top1",))  # patched again with the union
    settings = fused_head_settings(model)
    assert settings.outputs == ("log_probs", "entropy", "is_top1")
    assert (settings.temperature, settings.installed_by) == (0.7, "posttrain")
    assert posttrain_kernel_active()
    ids, mask, labels = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1] / 0.7
    assert torch.equal(out.is_top1, (logits.argmax(-1) == labels[:, 1:]) & out.label_mask)


# ----------------------------------------------------------------------------- model level
def _own_logp(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1))
    return logp.squeeze(-1) * (target != -100)


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_fused_equals_own_forward(model):
    ids, mask, labels = _batch()
    own = _own_logp(model, ids, mask, labels)
    own_grads = _param_grads(model, own.sum())
    install_fused_head(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.log_probs.dtype == F64
    assert (out.log_probs - own).abs().max().item() <= 1e-10
    for g, r in zip(_param_grads(model, out.log_probs.sum()), own_grads, strict=True):
        if r is None:
            assert g is None or g.eq(0).all()
        else:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    return out, own


def test_logit_scaled_granite_matches_its_own_forward():
    model = GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=8.0)).double().eval()
    _, own = _assert_fused_equals_own_forward(model)
    model.config.logits_scaling = 1.0  # the test has teeth: unscaled, the numbers differ
    trl_utils.add_fused_lm_head(model)
    ids, mask, labels = _batch()
    unscaled = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert (unscaled.log_probs - own).abs().max().item() > 1e-2


def test_soft_capped_gemma2_matches_its_own_forward():
    cfg = Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=3.0)
    model = Gemma2ForCausalLM(cfg).double().eval()
    out, own = _assert_fused_equals_own_forward(model)
    assert out.entropy is not None
    model.config.final_logit_softcapping = None  # without the cap the numbers differ
    trl_utils.add_fused_lm_head(model)
    ids, mask, labels = _batch()
    uncapped = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert (uncapped.log_probs - own).abs().max().item() > 1e-2


def test_moe_loss_and_aux_loss_match_its_own_forward():
    cfg = Qwen2MoeConfig(
        **TINY,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        experts_implementation="eager",  # the grouped-mm experts take no fp64
    )
    model = Qwen2MoeForCausalLM(cfg).double().eval()
    ids, mask, labels = _batch()
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    install_fused_head(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert (out.aux_loss - own.aux_loss).abs().item() <= 1e-12
    # transformers' loss upcasts the logits to fp32 (loss_utils), so rebuild it in fp64
    ce = F.cross_entropy(own.logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    assert (out.loss - (ce + 0.02 * own.aux_loss)).abs().item() <= 1e-10
    assert (out.loss - own.loss).abs().item() <= 1e-6 * own.loss.item()


# ----------------------------------------------------------------------------- LoRA
def test_lora_on_the_lm_head_is_refused():
    model = get_peft_model(_qwen2(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(LoraOnLMHeadError, match="LoRA on the LM head"):
        install_fused_head(model)
    with pytest.raises(LoraOnLMHeadError, match="silently ignored"):
        causal_lm_logprobs(model, *_batch()[::2])


def test_all_linear_lora_trains_through_the_fused_head():
    base = _qwen2()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # lora_B starts at 0; make the adapters act
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask, labels = _batch()
    own = _own_logp(model, ids, mask, labels)
    own_grads = _param_grads(model, own.sum())
    assert install_fused_head(model) is base
    res = causal_lm_logprobs(model, ids, labels, attention_mask=mask)
    assert (res.logp - own).abs().max().item() <= 1e-10
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("down_proj" in n for n in names) and not any("lm_head" in n for n in names)
    grads = _param_grads(model, res.logp.sum())
    for name, g, r in zip(names, grads, own_grads, strict=True):
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=name)


# ----------------------------------------------------------------------------- guard + mixin
def test_a_fused_training_step_never_calls_the_lm_head_module():
    model = _qwen2().float().train()
    install_fused_head(model)
    forbid_full_logits(model)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask, labels = _batch()
    before = model.lm_head.weight.detach().clone()
    model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss.backward()
    opt.step()
    assert calls == [] and not torch.equal(before, model.lm_head.weight)
    with pytest.raises(FullLogitsForbidden):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # evaluation and generation still get logits
        assert model(input_ids=ids).logits.shape == (*ids.shape, 100)


class _MixinTrainer(PosttrainTrainerMixin, Trainer):
    pass


def _trainer(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return _MixinTrainer(model=model, args=args)


def test_the_mixin_binds_the_kernel_installs_the_head_and_guards(tmp_path):
    restore_trl_kernel()
    model = _qwen2().float()
    trainer = _trainer(model, tmp_path)
    assert posttrain_kernel_active()
    assert fused_head_settings(model).installed_by == "posttrain"
    ids, mask, labels = _batch()
    res = trainer.token_logprobs(
        trainer.model, {"input_ids": ids, "attention_mask": mask, "labels": labels}
    )
    assert res.entropy is None and res.logp.shape == res.top1.shape == res.mask.shape == (3, 11)
    assert res.logp.requires_grad and torch.equal(res.mask, labels[:, 1:] != -100)
    with_ent = trainer.token_logprobs(
        trainer.model, {"input_ids": ids, "labels": labels}, return_entropy=True
    )
    assert with_ent.entropy is not None and with_ent.entropy[with_ent.mask].gt(0).all()
    model.train()
    with pytest.raises(FullLogitsForbidden):
        trainer.model(input_ids=ids)


def test_the_mixin_keeps_a_head_trl_installed_and_refuses_a_lora_head(tmp_path):
    model = _qwen2().float()
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    patched = model.forward
    _trainer(model, tmp_path)
    assert model.forward is patched and fused_head_settings(model).temperature == 0.9
    lora = get_peft_model(_qwen2().float(), LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(LoraOnLMHeadError):
        _trainer(lora, tmp_path)
