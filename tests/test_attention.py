"""Which SDPA backend order velotune asks torch for (models/attention.py). The cuDNN-first order itself runs
on the GPU: tests/test_fast_forward_gpu.py::test_sdpa_prefers_cudnn."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from velotune.models import attention as A


def _fake(device: str, numel: int, t: int = 8):
    return SimpleNamespace(device=torch.device(device), numel=lambda: numel, shape=(1, 4, t, 16), dtype=torch.bfloat16)


def test_cudnn_first_only_for_causal_cuda_calls_within_32_bit_indexing(monkeypatch):
    assert A._cudnn_first() is not None  # the installed torch (2.13) takes a priority order
    q, k = _fake("cuda", 1000), _fake("cuda", 250)
    assert A.prefers_cudnn(q, k, None)
    assert not A.prefers_cudnn(q, k, torch.ones(1, 1, 2, 2, dtype=torch.bool))  # explicit masks: torch's order
    assert not A.prefers_cudnn(_fake("cpu", 1000), _fake("cpu", 250), None)
    assert not A.prefers_cudnn(_fake("cuda", 2**31), k, None)  # past cuDNN's 32-bit offsets
    assert not A.prefers_cudnn(q, _fake("cuda", 2**31), None)
    assert A.prefers_cudnn(_fake("cuda", 2**31 - 1), k, None)
    monkeypatch.setattr(A, "PREFER_CUDNN", False)
    assert not A.prefers_cudnn(q, k, None)


def test_cudnn_first_without_a_priority_order_is_torchs_order(monkeypatch):
    import torch.nn.attention as nn_attention

    def old_sdpa_kernel(backends):  # torch < 2.6: no set_priority
        raise AssertionError("not called")

    A._cudnn_first.cache_clear()
    monkeypatch.setattr(nn_attention, "sdpa_kernel", old_sdpa_kernel)
    try:
        assert A._cudnn_first() is None
        assert not A.prefers_cudnn(_fake("cuda", 1000), _fake("cuda", 250), None)
    finally:
        A._cudnn_first.cache_clear()


def test_cudnn_first_for_at_most_a_few_shapes_said_once(monkeypatch, notices):
    """cuDNN builds a plan per shape: the first CUDNN_MAX_SHAPES distinct shapes keep it (and keep it when
    they come back), later ones take torch's order, and the notice says why and what to do, once."""
    from velotune import _notices

    monkeypatch.setattr(_notices, "_said", set())
    monkeypatch.setattr(A, "CUDNN_MAX_SHAPES", 3)
    k = _fake("cuda", 250)
    assert [A.prefers_cudnn(_fake("cuda", 1000, t), k, None) for t in (8, 16, 8, 24)] == [True] * 4
    assert not A.prefers_cudnn(_fake("cuda", 1000, 32), k, None)
    assert not A.prefers_cudnn(_fake("cuda", 1000, 40), k, None)
    assert A.prefers_cudnn(_fake("cuda", 1000, 16), k, None)  # seen: still cuDNN
    said = [m for m in notices if "distinct batch shapes" in m]
    assert len(said) == 1 and "Pad batches to a few lengths" in said[0]


@pytest.mark.parametrize("gqa", [True, False])
def test_sdpa_under_the_cudnn_first_order_is_unchanged_and_restores_torchs_order(monkeypatch, gqa):
    """On the CPU the priority order changes nothing (no cuDNN there): the same bits as a plain call,
    gradients too, and the process's backend order is torch's again afterwards."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 16, requires_grad=True)
    k, v = (torch.randn(2, 2 if gqa else 4, 37, 16, requires_grad=True) for _ in "kv")
    before = _cur_sdpa_kernel_backends(with_priority=True)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=gqa)
    grads = torch.autograd.grad(plain.sum(), (q, k, v))
    calls = []
    monkeypatch.setattr(A, "prefers_cudnn", lambda *a: calls.append(a) or True)
    ours = A.sdpa(q, k, v, None, 0.3, 0.0)
    assert calls and torch.equal(ours, plain)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)), grads):
        assert torch.equal(a, b)
    assert _cur_sdpa_kernel_backends(with_priority=True) == before
