"""RMSNorm: Triton kernel (interpreter on CPU, compiled on CUDA) vs float64 truth, and reference vs HF."""
from __future__ import annotations

import zlib

import pytest
import torch

from velotune.kernels._utils import errors_vs_truth, interpreting, poison_empty
from velotune.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference

# Tolerances, relative to max|truth| of the tensor compared, added to torch's own error (STYLE rule 3).
# fp32: 1e-6 (~17 fp32 ulps); the kernel's excess over torch measured <= 6e-8 (other summation orders
# of <= 1000 squares per row and <= 123 rows of dW), a wrong formula is off by > 1e-2.
# bf16: the interpreter casts fp32 -> bf16 by truncation (triton/runtime/interpreter.py passes no
# rounding mode) where compiled code rounds to nearest-even, so interpreted outputs may sit one bf16
# ulp (2^-7 relative) off instead of half of one: measured excess <= 5.1e-3 = 0.65 * 2^-7.
RTOL = {
    torch.float32: 1e-6,
    torch.bfloat16: 2.0**-7 if interpreting() else 2.0**-8,
}
ATOL = {torch.float32: 1e-7, torch.bfloat16: 1e-5}  # only matters where truth is ~0 everywhere

# name -> (offset, cast_before_weight)
FORMS = {"llama": (0.0, True), "gemma": (1.0, False), "olmo2": (0.0, False)}
SHAPES = [(1, 64), (7, 96), (123, 507), (2, 3, 1000)]


def _assert_no_worse(name, got, same_dtype, truth, dtype):
    err_k, err_t, scale = errors_vs_truth(got, same_dtype, truth)
    bound = err_t + ATOL[dtype] + RTOL[dtype] * scale
    assert err_k <= bound, f"{name}: kernel err {err_k:.3e} > torch err {err_t:.3e} + tol (max|truth| {scale:.3e})"


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


def _run_case(fn, x, w, dy, form, eps=1e-6):
    offset, cbw = FORMS[form]
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, eps, offset, cbw)
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    return y, dx, dw


def _check_all(shape, dtype, form, seed, device="cpu"):
    x, w, dy = (t.to(device) for t in _inputs(shape, dtype, seed))
    with poison_empty():
        got = _run_case(RMSNormFunction.apply, x, w, dy, form)
    same = _run_case(rms_norm_reference, x, w, dy, form)
    truth = _run_case(rms_norm_reference, x.double(), w.double(), dy.double(), form)
    for name, a, b, c in zip(("y", "dx", "dw"), got, same, truth):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        _assert_no_worse(f"{name} {shape} {dtype} {form}", a, b, c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_truth(shape, dtype, form):
    _check_all(shape, dtype, form, seed=zlib.crc32(repr((shape, form)).encode()))


def test_frozen_weight_gets_no_grad_and_strided_input(monkeypatch):
    """A LoRA setup freezes the norm weight: no dW pass. A row-strided view (a slice of a wider
    buffer) must be read through its stride, not as if contiguous."""
    import velotune.kernels.rms_norm as mod

    seen, bwd = [], mod._rms_norm_bwd

    def spy(*args, compute_dw):
        seen.append(compute_dw)
        return bwd(*args, compute_dw=compute_dw)

    monkeypatch.setattr(mod, "_rms_norm_bwd", spy)
    wide = torch.randn(9, 200, dtype=torch.float32, requires_grad=True)
    w = torch.randn(96)
    dy = torch.randn(9, 96)
    outs = []
    for fn in (RMSNormFunction.apply, rms_norm_reference):
        xs = wide[:, 50:146]  # non-contiguous view, row stride 200
        y = fn(xs, w, 1e-5, 0.0, True)
        outs.append((y, *torch.autograd.grad(y, (wide,), dy)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert seen == [False]


def test_public_dispatch_takes_reference_on_cpu():
    x, w, _ = _inputs((5, 64), torch.float32, 1)
    assert torch.equal(rms_norm(x, w, 1e-6, 1.0, False), rms_norm_reference(x, w, 1e-6, 1.0, False))


def test_reference_equals_hf_bitwise():
    """The reference is HF's expression: bit-identical for Llama and Gemma, in fp32 and bf16."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        x, w, _ = _inputs((11, 507), dtype, 3)
        llama = LlamaRMSNorm(507, eps=1e-5).to(dtype)
        gemma = GemmaRMSNorm(507, eps=1e-6).to(dtype)
        with torch.no_grad():
            llama.weight.copy_(w)
            gemma.weight.copy_(w - 1)
            assert torch.equal(rms_norm_reference(x, w, 1e-5), llama(x))
            assert torch.equal(rms_norm_reference(x, w - 1, 1e-6, 1.0, False), gemma(x))


def test_kernel_close_to_hf_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, _ = _inputs((7, 1000), torch.float32, 4)
    hf = LlamaRMSNorm(1000, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(w)
        # summation order differs: a few fp32 ulps (6e-8 relative each)
        torch.testing.assert_close(RMSNormFunction.apply(x, w, 1e-6, 0.0, True), hf(x), rtol=1e-6, atol=1e-6)


def test_bad_weight_shape_raises():
    with pytest.raises(ValueError, match="weight shape"):
        RMSNormFunction.apply(torch.randn(3, 64), torch.randn(63), 1e-6, 0.0, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(2, 4096, 4096), (4096 * 32, 128), (1000, 5376), (4097, 16384)],
                         ids=["llama8b", "qknorm", "gemma3_27b", "h16k"])
def test_gpu_matches_truth(shape, dtype, form):
    _check_all(shape, dtype, form, seed=7, device="cuda")


@pytest.mark.gpu
def test_gpu_bf16_mostly_bitwise_equal_to_hf():
    """Compiled Llama form in bf16 equals HF's bf16 output except where the fp32 rstd, summed in another
    order, moves xn across a bf16 rounding boundary."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, _ = (t.cuda() for t in _inputs((4096, 4096), torch.bfloat16, 5))
    hf = LlamaRMSNorm(4096, eps=1e-5).cuda().to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(w)
        same = (rms_norm(x, w, 1e-5) == hf(x)).float().mean().item()
    assert same > 0.999, f"only {same:.5f} of elements bitwise equal to HF"
