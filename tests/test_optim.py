"""training/optim.py: bitsandbytes' optimizer step without its per-parameter host sync, same results."""
from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch

from velotune.training.optim import _StepWithoutHostSyncs, without_host_syncs


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    # awkward sizes: one below bitsandbytes' 4096-element minimum for 8-bit state, one not a block multiple
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (7, 300, 5000, 4096 * 3 + 17)]


@pytest.mark.parametrize("make", [
    lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.01),
    lambda ps: bnb.optim.AdamW(ps, lr=1e-2, optim_bits=8),  # what TrainingArguments(optim="adamw_8bit") builds
    lambda ps: bnb.optim.Lion8bit(ps, lr=1e-3),
    lambda ps: bnb.optim.AdamW32bit(ps, lr=1e-2),
], ids=["AdamW8bit", "AdamW-optim_bits8", "Lion8bit", "AdamW32bit"])
def test_same_updates_without_syncs(make, monkeypatch):
    syncs = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(t))
    ref_ps, our_ps = _params(0), _params(0)
    ref, ours = make(ref_ps), without_host_syncs(make(our_ps))
    assert isinstance(ours, _StepWithoutHostSyncs) and isinstance(ours, type(ref))
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(ref_ps, our_ps):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        our_ps[0].grad = ref_ps[0].grad = None if step == 2 else ref_ps[0].grad  # a parameter without grad
        n_before = len(syncs)
        ref.step()
        assert len(syncs) > n_before  # bitsandbytes' own step does sync (so the count below means something)
        n_before = len(syncs)
        ours.step()
        assert len(syncs) == n_before, "the optimizer step synchronised with the host"
        for a, b in zip(ref_ps, our_ps):
            assert torch.equal(a, b)
    for a, b in zip(ref_ps, our_ps):
        for k, v in ref.state[a].items():
            w = ours.state[b][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def test_other_optimizers_are_left_alone():
    ps = _params(0)
    paged = bnb.optim.PagedAdamW8bit(ps, lr=1e-3)
    assert without_host_syncs(paged) is paged and not isinstance(paged, _StepWithoutHostSyncs)
    adamw = torch.optim.AdamW(ps, lr=1e-3)
    assert without_host_syncs(adamw) is adamw and type(adamw) is torch.optim.AdamW
    once = without_host_syncs(bnb.optim.AdamW8bit(ps, lr=1e-3))
    assert without_host_syncs(once) is once and type(once).__mro__.count(_StepWithoutHostSyncs) == 1


def _c(v):
    """A ctypes argument as a comparable Python value (floats rounded to fp32 as ctypes.c_float does)."""
    import ctypes

    if isinstance(v, torch.Tensor):
        return v.data_ptr()
    if isinstance(v, float):
        return ctypes.c_float(v).value
    return getattr(v, "value", v)


def test_direct_8bit_update_passes_bitsandbytes_its_own_arguments(monkeypatch):
    """The step's direct call of the 8-bit blockwise C function (optim.DIRECT_ON_CUDA): per parameter the same
    function (optimizer name, gradient dtype) with the same 19 arguments bitsandbytes' own path passes it
    (its CUDA impl's order), across steps, two parameter groups with their own lr / weight decay, an lr that
    changes, a parameter without a gradient and one small enough for 32-bit state (that one, and nothing
    else, still goes through bitsandbytes' update_step). CPU: the C function is replaced by a recorder."""
    from velotune.training import optim

    calls = {"F8": [], "F32": [], "direct": []}

    def f8(name, g, p, s1, s2, b1, b2, b3, alpha, eps, step, lr, q1, q2, a1, a2, wd=0.0, gnorm_scale=1.0,
           skip_zeros=False):
        calls["F8"].append(((name, g.dtype), tuple(_c(v) for v in (p, g, s1, s2, b1, b2, b3, alpha, eps, step, lr,
                                                                   q1, q2, a1, a2, wd, gnorm_scale, skip_zeros,
                                                                   g.numel()))))

    monkeypatch.setattr(bnb_optimizer.F, "optimizer_update_8bit_blockwise", f8)
    monkeypatch.setattr(bnb_optimizer.F, "optimizer_update_32bit",
                        lambda name, g, p, *a, **k: calls["F32"].append((name, g.data_ptr(), p.data_ptr())))
    monkeypatch.setattr(optim, "_DIRECT_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(optim, "_update_fn", lambda name, dtype: lambda *a: calls["direct"].append(
        ((name, dtype), tuple(_c(v) for v in a))))
    ps = _params(0)
    opt = without_host_syncs(bnb.optim.AdamW8bit(ps[:3], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01))
    opt.add_param_group({"params": [ps[3]], "lr": 3e-3, "weight_decay": 0.0})
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        for p in ps:
            p.grad = None if (step == 1 and p is ps[2]) else torch.randn(p.shape, generator=g)
        opt.param_groups[0]["lr"] = 1e-2 * (1 - step / 3)  # a linear schedule
        runs = {}
        for direct in (False, True):
            steps = {id(p): opt.state[p]["step"] for p in ps if opt.state[p]}
            monkeypatch.setattr(optim, "DIRECT_ON_CUDA", direct)
            for k in calls:
                calls[k].clear()
            opt.step()
            runs[direct] = {k: list(v) for k, v in calls.items()}
            if not direct:
                for p in ps:  # the same step again, as if the first pass had not happened
                    if id(p) in steps:
                        opt.state[p]["step"] = steps[id(p)]
                    elif opt.state[p]:
                        opt.state[p]["step"] = 0
        ref, ours = runs[False], runs[True]
        assert len(ref["F8"]) == (1 if step == 1 else 2) and ref["direct"] == [] and len(ref["F32"]) == 2
        assert ours["direct"] == ref["F8"] and ours["F8"] == [] and ours["F32"] == ref["F32"]
    # an optimizer with an update of its own (AdEMAMix: a third state, its own arguments) keeps bitsandbytes' path
    monkeypatch.setattr(optim, "DIRECT_ON_CUDA", True)
    other = without_host_syncs(bnb.optim.AdEMAMix8bit(_params(2)[2:], lr=1e-3))
    for p in other.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=g)
    for k in calls:
        calls[k].clear()
    other.step()
    assert calls["direct"] == [] and len(calls["F8"]) == 2


@pytest.mark.gpu
def test_direct_update_on_cuda_is_bitwise_bitsandbytes(monkeypatch):
    """On a GPU the step's direct call (optim.DIRECT_ON_CUDA) runs bitsandbytes' own 8-bit kernels: 4 AdamW8bit
    steps (fp32 parameters, and bf16 ones) leave parameters and 8-bit states bitwise equal to bitsandbytes'
    step, and the 8-bit parameters never went through its Python path (optim.DIRECT_ON_CUDA is on because
    this passed on an H200)."""
    from velotune.training import optim

    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(optim, "DIRECT_ON_CUDA", True)  # whatever the default says
        ref_ps = [torch.nn.Parameter(p.detach().to("cuda", dtype)) for p in _params(0)]
        our_ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_ps]
        ref = bnb.optim.AdamW8bit(ref_ps, lr=1e-2, weight_decay=0.01)
        ours = without_host_syncs(bnb.optim.AdamW8bit(our_ps, lr=1e-2, weight_decay=0.01))
        real, slow = bnb_optimizer.F.optimizer_update_8bit_blockwise, []
        monkeypatch.setattr(bnb_optimizer.F, "optimizer_update_8bit_blockwise",
                            lambda *a, **k: slow.append(1) or real(*a, **k))
        g = torch.Generator(device="cuda").manual_seed(1)
        for step in range(4):
            for a, b in zip(ref_ps, our_ps):
                grad = torch.randn(a.shape, generator=g, device="cuda").to(dtype)
                a.grad, b.grad = grad.clone(), grad.clone()
            ref.param_groups[0]["lr"] = ours.param_groups[0]["lr"] = 1e-2 * (1 - step / 4)
            ref.step()
            n_ref = len(slow)
            ours.step()
            assert len(slow) == n_ref  # ours: no 8-bit parameter through bitsandbytes' Python path
        for a, b in zip(ref_ps, our_ps):
            assert torch.equal(a, b)
            for k, v in ref.state[a].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, ours.state[b][k]), k
        monkeypatch.undo()
