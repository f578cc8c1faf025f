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
