"""Fused linear cross-entropy: Triton row kernel + chunked matmuls vs float64 truth; edge cases."""
from __future__ import annotations

import pytest
import torch

from velotune.kernels._utils import errors_vs_truth, interpreting, poison_empty
from velotune.kernels.cross_entropy import (
    CHUNK_BYTES_TRAINABLE_W,
    LinearCrossEntropyFunction,
    chunk_rows_for,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# Tolerances relative to max|truth|, added to torch's own error (STYLE rule 3).
# fp32: 1e-6 (~17 ulps): the kernel's logsumexp runs in BLOCK_V slices and the loss sums rows in
# another order than F.cross_entropy. bf16: logits and dlogits are rounded to bf16 where torch rounds
# them too; on top, each chunk's dW product is rounded to bf16 before the fp32 sum (torch: one GEMM),
# and the interpreter truncates fp32 -> bf16 casts instead of rounding to nearest: 2^-7, one bf16 ulp.
# Measured excess over torch: <= 1.5e-3 of max|truth| (bf16), <= 8.1e-8 (fp32).
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7 if interpreting() else 2.0**-8}

CASES = [  # (N, H, V, chunk_rows, softcap, num_items_in_batch)
    (1, 64, 1000, None, None, None),
    (7, 96, 4097, 3, 30.0, None),
    (123, 507, 1000, 32, None, 500),
    (37, 1000, 4097, 16, 5.0, "tensor"),
]


def _inputs(n, h, v, dtype, seed, device="cpu", ignore_frac=0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (4.0 / h**0.5)  # logits std ~4: a peaked softmax
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    labels[0] = v - 1  # the last vocab entry sits in a masked tail slice of the kernel
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def _run(fn, hidden, weight, labels, *args, weight_grad=True):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(weight_grad)
    loss = fn(hidden, weight, labels, *args)
    grads = torch.autograd.grad(loss, (hidden, weight) if weight_grad else (hidden,))
    return (loss, *grads)


def _check(case, dtype, weight_grad, device="cpu"):
    n, h, v, chunk, softcap, num_items = case
    hidden, weight, labels = _inputs(n, h, v, dtype, seed=n * 7 + v, device=device)
    if num_items == "tensor":  # HF Trainer passes a device tensor
        num_items = torch.tensor(3 * n, device=device)
    args = (-100, softcap, num_items)
    with poison_empty():
        got = _run(LinearCrossEntropyFunction.apply, hidden, weight, labels, *args, chunk, weight_grad=weight_grad)
    same = _run(linear_cross_entropy_reference, hidden, weight, labels, *args, weight_grad=weight_grad)
    truth = _run(linear_cross_entropy_reference, hidden.double(), weight.double(), labels, *args,
                 weight_grad=weight_grad)
    for name, a, s, t in zip(("loss", "dhidden", "dweight"), got, same, truth):
        assert a.dtype == s.dtype, f"{name}: {a.dtype} != {s.dtype}"
        err_k, err_t, scale = errors_vs_truth(a, s, t)
        bound = err_t + RTOL[dtype] * scale
        assert err_k <= bound, f"{name}: kernel err {err_k:.3e} > torch {err_t:.3e} + tol ({scale:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_truth(case, dtype):
    _check(case, dtype, weight_grad=case[0] != 1)


def test_frozen_weight_forms_no_weight_grad(monkeypatch):
    import velotune.kernels.cross_entropy as ce

    class _NoWeightGrad:
        def __init__(self, weight):
            raise AssertionError("a dW accumulator was built for a frozen lm_head")

    monkeypatch.setattr(ce, "_WeightGrad", _NoWeightGrad)
    _check((9, 64, 1000, 4, None, None), torch.float32, weight_grad=False)


@pytest.mark.parametrize("num_items", [None, 0, 17])
def test_all_ignored_gives_zero_loss_and_zero_grads(num_items):
    hidden, weight, labels = _inputs(5, 64, 1000, torch.float32, 2)
    labels[:] = -100
    for fn in (LinearCrossEntropyFunction.apply, linear_cross_entropy_reference):
        extra = (None,) if fn == LinearCrossEntropyFunction.apply else ()
        loss, dh, dw = _run(fn, hidden, weight, labels, -100, None, num_items, *extra)
        assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_num_items_in_batch_divides_the_sum():
    """Gradient accumulation: two micro-batches with num_items = total count sum to the full-batch loss."""
    hidden, weight, labels = _inputs(40, 64, 1000, torch.float32, 3)
    total = int((labels != -100).sum())
    full = LinearCrossEntropyFunction.apply(hidden, weight, labels, -100, None, None, None)
    halves = sum(
        LinearCrossEntropyFunction.apply(hidden[sl], weight, labels[sl], -100, None, total, None)
        for sl in (slice(0, 13), slice(13, 40))
    )
    torch.testing.assert_close(halves, full, rtol=1e-6, atol=0)


def test_chunking_does_not_change_the_result():
    hidden, weight, labels = _inputs(50, 96, 1000, torch.float32, 4)
    outs = [_run(LinearCrossEntropyFunction.apply, hidden, weight, labels, -100, 10.0, None, c) for c in (1, 7, 64)]
    for other in outs[1:]:
        # Only summation orders change: dW adds the chunks differently, and BLAS picks other kernels for
        # other row counts (gemv for 1 row); measured <= 1.3e-6 of max|grad|, i.e. a few fp32 ulps.
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=4e-6 * b.abs().max().item())


def test_return_logits_and_public_dispatch():
    hidden, weight, labels = _inputs(6, 64, 1000, torch.float32, 5)
    loss, logits = linear_cross_entropy(hidden.view(2, 3, 64), weight, labels.view(2, 3), softcap=30.0,
                                        return_logits=True)
    assert logits.shape == (2, 3, 1000)
    torch.testing.assert_close(logits, 30.0 * torch.tanh(hidden.view(2, 3, 64) @ weight.T / 30.0))
    ref = linear_cross_entropy_reference(hidden, weight, labels, softcap=30.0)
    torch.testing.assert_close(loss, ref)
    assert torch.equal(linear_cross_entropy(hidden, weight, labels, softcap=30.0), ref)


def test_reference_equals_hf_loss():
    """The reference is HF's ForCausalLMLoss on the (already shifted) labels, incl. num_items_in_batch."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, labels = _inputs(12, 64, 1000, torch.bfloat16, 6)
    logits = hidden @ weight.T
    for num_items in (None, torch.tensor(20)):
        hf = ForCausalLMLoss(logits, None, 1000, num_items_in_batch=num_items, shift_labels=labels)
        assert torch.equal(linear_cross_entropy_reference(hidden, weight, labels, num_items_in_batch=num_items), hf)


def test_errors():
    hidden, weight, labels = _inputs(4, 64, 1000, torch.float32, 7)
    labels[1] = 1000
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1000\)"):
        LinearCrossEntropyFunction.apply(hidden, weight, labels, -100, None, None, None)
    with pytest.raises(ValueError, match="softcap=0.0 must be > 0"):
        LinearCrossEntropyFunction.apply(hidden, weight, labels, -100, 0.0, None, None)
    with pytest.raises(ValueError, match="weight is torch.bfloat16"):
        LinearCrossEntropyFunction.apply(hidden, weight.bfloat16(), labels, -100, None, None, None)
    labels = labels.clamp(max=999)
    loss = LinearCrossEntropyFunction.apply(hidden.requires_grad_(), weight, labels, -100, None, None, None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunk_rows_budget():
    assert chunk_rows_for(128256, 4096) == 384  # 256 MiB / (4 B * 132352) = 507 rows -> 384
    assert chunk_rows_for(1000, 64) * 4 * 1064 <= 256 * 2**20
    assert chunk_rows_for(128256, 4096, CHUNK_BYTES_TRAINABLE_W) == 1920  # dW's GEMM reduces over 1920 tokens


@pytest.mark.gpu
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("case", [(4096, 4096, 128256, None, None, None), (2048, 3584, 256000, None, 30.0, 3000)],
                         ids=["llama3_8b", "gemma2_9b"])
def test_gpu_bf16_matches_truth(case, weight_grad):
    _check(case, torch.bfloat16, weight_grad, device="cuda")


@pytest.mark.gpu
def test_gpu_fp32_matches_truth():
    _check((1000, 2048, 32000, 256, 50.0, None), torch.float32, True, device="cuda")


def test_rows_found_early_give_the_same_loss_and_grads(monkeypatch):
    """valid= (the decoder finds the rows before its layers run) changes nothing, and skips the search."""
    import velotune.kernels.cross_entropy as ce

    hidden, weight, labels = _inputs(33, 64, 1000, torch.float32, 6, ignore_frac=0.5)
    valid = ce.valid_rows(labels, -100, 1000)
    assert torch.equal(valid[0], (labels != -100).nonzero().squeeze(1)) and torch.equal(valid[1], labels[valid[0]])
    plain = _run(LinearCrossEntropyFunction.apply, hidden, weight, labels, -100, None, None, 8)

    def no_search(*a):
        raise AssertionError("valid rows were searched again")

    monkeypatch.setattr(ce, "valid_rows", no_search)
    early = _run(LinearCrossEntropyFunction.apply, hidden, weight, labels, -100, None, None, 8, valid)
    for a, b in zip(plain, early):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ignore_frac", [0.0, 0.4], ids=["every-row", "some-ignored"])
def test_scratch_holds_only_temporaries(ignore_frac):
    """scratch= (graphs.loss_scratch: the CUDA graphs' pool between replays) is entered once around the chunks;
    what is allocated within is only temporaries: the loss and the hidden state's gradient were allocated
    before it (the next replay writes over the pool's free blocks), and the results are bitwise those without.
    A trainable weight's gradient buffers outlive the chunks: then the scratch is not used."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    class NewStorages(TorchDispatchMode):
        """The storages that ops create (not those they are given, as out= or in place)."""

        def __init__(self):
            super().__init__()
            self.made = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                    self.made.add(t.untyped_storage().data_ptr())
            return out

    entered = []

    @contextlib.contextmanager
    def scratch():
        entered.append(1)
        with NewStorages() as mode:
            yield
        entered.append(mode.made)

    hidden, weight, labels = _inputs(45, 64, 1000, torch.float32, 11, ignore_frac=ignore_frac)
    hidden.requires_grad_()
    loss = LinearCrossEntropyFunction.apply(hidden, weight, labels, -100, None, None, 8, None, scratch)
    (dh,) = torch.autograd.grad(loss, hidden)
    made = entered.pop()
    assert entered == [1] and made, "the chunks ran once inside the scratch and allocated there"
    assert loss.untyped_storage().data_ptr() not in made and dh.untyped_storage().data_ptr() not in made
    plain = _run(LinearCrossEntropyFunction.apply, hidden, weight, labels, -100, None, None, 8, weight_grad=False)
    assert torch.equal(loss, plain[0]) and torch.equal(dh, plain[1])

    entered.clear()
    _run(LinearCrossEntropyFunction.apply, hidden, weight, labels, -100, None, None, 8, None, scratch)
    assert entered == [], "a trainable weight's gradient is not accumulated in the scratch"
