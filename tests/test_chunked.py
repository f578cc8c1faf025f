"""Long-context memory: the MLP in row chunks (models/chunked.py) and exact-size pinned host buffers
for offloaded checkpointing (models/offload.py PinnedPool)."""
from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from tests.tiny_models import randomize_lora_b
from velotune import FastLanguageModel, set_cuda_graphs
from velotune.kernels.lora import lora_mlp
from velotune.models import chunked, offload


def _projection(out_f, in_f, r, g):
    base = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    a = (torch.randn(r, in_f, generator=g) / in_f**0.5).requires_grad_(True)
    b = (torch.randn(out_f, r, generator=g) * 0.1).requires_grad_(True)
    return base, a, b, 1.7


def test_row_chunked_mlp_equals_whole_mlp_outputs_and_grads():
    g = torch.Generator().manual_seed(0)
    projs = [_projection(24, 16, 4, g), _projection(24, 16, 4, g), _projection(16, 24, 4, g)]
    params = [t for p in projs for t in p[1:3]]
    x = torch.randn(2, 11, 16, generator=g, requires_grad=True)  # 22 rows in chunks of 5: a ragged last one
    dy = torch.randn(2, 11, 16, generator=g)

    def run(chunk):
        y = (chunked.row_chunked(lambda rows: lora_mlp(rows, *projs), x, params, rows=5) if chunk
             else lora_mlp(x, *projs))
        grads = torch.autograd.grad(y, [x] + params, dy)
        return y.detach(), grads

    y_c, g_c = run(True)
    y_w, g_w = run(False)
    torch.testing.assert_close(y_c, y_w, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_c, g_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no grad: just the chunk loop, same values
        torch.testing.assert_close(chunked.row_chunked(lambda rows: lora_mlp(rows, *projs), x, params, rows=5), y_w,
                                   rtol=1e-6, atol=1e-6)


def _model(tiny_dir, gc_mode):
    model, _ = FastLanguageModel.from_pretrained(tiny_dir("llama"), max_seq_length=128, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3,
                                             use_gradient_checkpointing=gc_mode)
    randomize_lora_b(model, seed=11, std=0.1)
    set_cuda_graphs(model, False)
    model.train()
    return model


@pytest.mark.parametrize("gc_mode", [True, "unsloth"])
def test_decoder_with_chunked_mlp_trains_like_whole_mlp(tiny_dir, monkeypatch, gc_mode):
    monkeypatch.setattr(offload, "ON_CPU", True)  # "unsloth": the offload Function's recompute path
    ids = torch.randint(4, 500, (2, 30), generator=torch.Generator().manual_seed(5))
    results, calls = [], []
    real = chunked._RowChunked.backward
    monkeypatch.setattr(chunked._RowChunked, "backward", staticmethod(lambda ctx, dy: calls.append(1) or real(ctx, dy)))
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 7)
    for chunk_rows in (0, 16):  # 0: off; 16: 60 rows > 16 -> chunks of 7
        monkeypatch.setattr(chunked, "MLP_CHUNK_ROWS", chunk_rows)
        calls.clear()
        model = _model(tiny_dir, gc_mode)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                        len(calls)))
    (l0, g0, c0), (l1, g1, c1) = results
    assert c0 == 0 and c1 == 2  # chunking off, then on in both layers
    assert abs(l0 - l1) < 1e-6
    assert g0.keys() == g1.keys() and any("mlp" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("gc_mode", [True, "unsloth"])
def test_recomputed_chunked_mlp_runs_no_forward(tiny_dir, monkeypatch, gc_mode):
    """In a checkpoint's recompute (torch's checkpoint; the offloaded checkpoint's backward) the chunked MLP
    runs no forward chunk (its backward recomputes them from the input anyway): one chunk loop fewer per
    recomputed layer, and the loss and every gradient bit for bit those with the skip off."""
    from velotune.models import recompute

    monkeypatch.setattr(offload, "ON_CPU", True)
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 7)
    monkeypatch.setattr(chunked, "MLP_CHUNK_ROWS", 16)
    ids = torch.randint(4, 500, (2, 30), generator=torch.Generator().manual_seed(5))
    real, loops = chunked._chunks_nograd, []
    monkeypatch.setattr(chunked, "_chunks_nograd", lambda *a: loops.append(1) or real(*a))
    runs = {}
    for skip in (False, True):
        monkeypatch.setattr(recompute, "SKIP_MLP_OUTPUT", skip)
        loops.clear()
        model = _model(tiny_dir, gc_mode)
        loss = model(input_ids=ids, labels=ids).loss
        forward_loops = len(loops)
        loss.backward()
        runs[skip] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                      forward_loops, len(loops) - forward_loops)
    (l0, g0, f0, b0), (l1, g1, f1, b1) = runs[False], runs[True]
    layers = model.config.num_hidden_layers
    assert f0 == f1 == layers  # the forward runs every layer's chunks
    assert b0 >= 1 and b1 == 0  # the recomputes ran them again only with the skip off
    assert l0 == l1 and g0.keys() == g1.keys()
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


class _FakePin:
    def __init__(self):
        self.registered, self.unregistered = [], []

    def register(self, t):
        assert t.data_ptr() % offload._PAGE == 0 and t.numel() % offload._PAGE == 0  # whole pages only
        self.registered.append(t.numel())
        return True

    def unregister(self, t):
        self.unregistered.append(t.numel())


def _plenty():
    return 2**40, 2**41


def test_pinned_pool_exact_sizes_reuse_and_release():
    pin = _FakePin()
    pool = offload.PinnedPool(pin.register, pin.unregister, _plenty)
    mib = 2**20
    bufs = [pool.take((3, mib // 4 + 5), torch.bfloat16) for _ in range(3)]  # 1.5 MiB + 30 B each
    for buf, t in bufs:
        assert t.shape == (3, mib // 4 + 5) and t.dtype == torch.bfloat16
        assert buf.numel() == 6 * mib // 4 + 4096  # rounded to whole pages, not to a power of two (2 MiB)
    assert pool.held_bytes == 3 * bufs[0][0].numel()
    bufs[0][1].fill_(1.0)
    for buf, _ in bufs:
        pool.give(buf)
    again = [pool.take((3, mib // 4 + 5), torch.bfloat16)[0] for _ in range(3)]
    assert {b.data_ptr() for b in again} == {b.data_ptr() for b, _ in bufs} and len(pin.registered) == 3  # reused
    for b in again:
        pool.give(b)
    small = pool.take((10,), torch.float32)[0]  # fits in a free buffer: the smallest that fits is reused
    assert len(pin.registered) == 3 and small.numel() == again[0].numel()
    pool.give(small)
    big = pool.take((4 * mib,), torch.uint8)  # nothing fits: the free (smaller) buffers go, one new buffer
    assert pin.unregistered == [bufs[0][0].numel()] * 3 and len(pin.registered) == 4
    assert pool.held_bytes == big[0].numel() == 4 * mib


def test_pinned_lease_comes_back_without_backward():
    pin = _FakePin()
    pool = offload.PinnedPool(pin.register, pin.unregister, _plenty)
    lease = pool.lease((8, 8), torch.float32)
    assert lease.tensor.shape == (8, 8) and not pool.free
    del lease
    gc.collect()
    assert len(pool.free) == 1  # a forward whose backward never ran gives its buffer back
    lease = pool.lease((8, 8), torch.float32)
    lease.back()
    lease.back()  # twice: once only
    assert len(pool.free) == 1 and len(pin.registered) == 1


def test_pinned_pool_keeps_the_host_reserve(notices, monkeypatch):
    """No new page-locked buffer that would leave the machine less than its reserve (max(4 GiB, 5%)): take
    says so once and returns None (the caller keeps the activation on the GPU), instead of the process
    being killed by the kernel's out-of-memory killer. Free smaller buffers it would release count."""
    from velotune import _notices

    monkeypatch.setattr(_notices, "_said", set())
    pin, mib, gib = _FakePin(), 2**20, 2**30
    state = {"available": 5 * gib + 3 * mib}  # total 100 GiB: the reserve is 5 GiB
    pool = offload.PinnedPool(pin.register, pin.unregister, lambda: (state["available"], 100 * gib))
    first = pool.take((2 * mib,), torch.uint8)
    assert first is not None
    state["available"] -= 2 * mib
    assert pool.take((2 * mib,), torch.uint8) is None and len(pin.registered) == 1  # 1 MiB left above reserve
    assert pool.lease((2 * mib,), torch.uint8) is None
    assert sum("host memory is short" in m for m in notices) == 1
    pool.give(first[0])
    assert pool.take((3 * mib,), torch.uint8) is not None  # the free 2 MiB buffer goes back to the machine
    assert pin.unregistered == [2 * mib] and pool.held_bytes == 3 * mib


class _SlowPin(_FakePin):
    """Page-locking that takes a while and records the thread it ran on."""

    def __init__(self, delay=0.05):
        super().__init__()
        self.delay, self.threads = delay, []

    def register(self, t):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return super().register(t)


def test_pinned_pool_locks_the_next_buffer_ahead(monkeypatch):
    """A growing pool (the first step at a new length) page-locks the next layer's buffer on a helper thread
    while the current layer runs: the next take finds it ready; once every layer has its buffer (the next
    steps), nothing more is locked, ahead or not."""
    monkeypatch.setattr(offload, "PIN_AHEAD", True)
    pin = _SlowPin()
    pool = offload.PinnedPool(pin.register, pin.unregister, _plenty)
    shape = (3, 1000)
    for step in range(2):
        taken = []
        for layer in range(3):  # as OffloadedCheckpoint.forward: take, then prefetch if a layer follows
            taken.append(pool.take(shape, torch.float32))
            if layer < 2:
                pool.prefetch(shape, torch.float32)
            time.sleep(0.15)  # the layer's own work
        for buf, _ in taken:
            pool.give(buf)
        assert len(pin.registered) == 3 and pool.held_bytes == 3 * taken[0][0].numel(), step
    main = threading.current_thread().name
    assert pin.threads == [main, "velotune-pin-ahead", "velotune-pin-ahead"]  # only the first inline
    assert pool.wait_s < 0.05 + 0.04  # the first lock's 0.05 s; the other two were ready when asked for


def test_pinned_pool_waits_for_a_buffer_still_being_locked(monkeypatch):
    monkeypatch.setattr(offload, "PIN_AHEAD", True)
    pin = _SlowPin(delay=0.2)
    pool = offload.PinnedPool(pin.register, pin.unregister, _plenty)
    first = pool.take((64,), torch.float32)
    pool.prefetch((64,), torch.float32)
    pool.prefetch((64,), torch.float32)  # one ahead at a time
    second = pool.take((64,), torch.float32)  # asked at once: waits for the helper instead of locking another
    assert len(pin.registered) == 2 and first[0].data_ptr() != second[0].data_ptr()
    assert pin.threads[1] == "velotune-pin-ahead" and pool.ahead is None


def test_pinned_pool_ahead_respects_the_host_reserve_and_the_switch(notices, monkeypatch):
    from velotune import _notices

    monkeypatch.setattr(_notices, "_said", set())
    gib = 2**30
    pin = _FakePin()
    pool = offload.PinnedPool(pin.register, pin.unregister, lambda: (5 * gib + 2**20, 100 * gib))
    monkeypatch.setattr(offload, "PIN_AHEAD", True)
    pool.prefetch((2 * 2**20,), torch.uint8)  # would leave less than the 5 GiB reserve: nothing, silently
    pool._join_ahead()
    assert pin.registered == [] and not pool.free and not any("host memory is short" in m for m in notices)
    monkeypatch.setattr(offload, "PIN_AHEAD", False)
    roomy = offload.PinnedPool(pin.register, pin.unregister, _plenty)
    roomy.prefetch((64,), torch.float32)
    assert roomy.ahead is None and pin.registered == []
