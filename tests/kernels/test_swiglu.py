"""SwiGLU / GeGLU: Triton kernels vs float64 truth, in-place backward, reference vs transformers' ACT2FN."""
from __future__ import annotations

import pytest
import torch

from velotune.kernels._utils import errors_vs_truth, interpreting, poison_empty
from velotune.kernels.swiglu import (
    ACTIVATIONS,
    GLUFunction,
    _glu_bwd,
    geglu,
    glu,
    glu_backward_,
    glu_forward,
    glu_reference,
    swiglu,
)

# Tolerances relative to max|truth|, added to torch's own error (STYLE rule 3). fp32: 1e-6 (~17 ulps):
# erf/exp/sigmoid differ between libm, numpy (interpreter) and CUDA by a few ulps, and the tanh form
# goes through 2*sigmoid(2x)-1 (<= 1 ulp of 1 absolute). bf16: one bf16 ulp (2^-7) under the
# interpreter, whose fp32 -> bf16 cast truncates instead of rounding to nearest-even.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7 if interpreting() else 2.0**-8}
ATOL = {torch.float32: 1e-7, torch.bfloat16: 1e-5}  # only matters where truth is ~0 everywhere
SHAPES = [(1, 64), (7, 96), (123, 507), (2, 3, 1000)]


def _inputs(shape, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) * 3
    g.view(-1)[:8] = torch.tensor([0.0, -0.0, 20.0, -20.0, 9.5, -9.5, 1e-4, -88.0])[: g.numel()]  # saturation
    u = torch.randn(shape, generator=gen)
    dh = torch.randn(shape, generator=gen)
    return (t.to(device, dtype) for t in (g, u, dh))


def _run(fn, g, u, dh, *args):
    g = g.detach().clone().requires_grad_()
    u = u.detach().clone().requires_grad_()
    h = fn(g * 1, u * 1, *args)  # * 1: a non-leaf, so an in-place backward never writes into a leaf
    dg, du = torch.autograd.grad(h, (g, u), dh)
    return h, dg, du


def _check(shape, dtype, activation, inplace, device="cpu"):
    g, u, dh = _inputs(shape, dtype, seed=sum(shape) + ACTIVATIONS[activation], device=device)
    with poison_empty():
        got = _run(GLUFunction.apply, g, u, dh, activation, inplace)
    same = _run(glu_reference, g, u, dh, activation)
    truth = _run(glu_reference, g.double(), u.double(), dh.double(), activation)
    for name, a, s, t in zip(("h", "dg", "du"), got, same, truth):
        err_k, err_t, scale = errors_vs_truth(a, s, t)
        bound = err_t + ATOL[dtype] + RTOL[dtype] * scale
        assert err_k <= bound, f"{name} {activation}: kernel err {err_k:.3e} > torch {err_t:.3e} + tol ({scale:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_truth(shape, dtype, activation):
    _check(shape, dtype, activation, inplace=shape[0] == 7)


def test_inplace_backward_lands_in_fused_gate_up_buffer():
    """g, u as the two halves of one gate_up output: in-place dg/du overwrite exactly those halves,
    and the weight gradient through them equals the reference's."""
    x = torch.randn(9, 32)
    w = torch.randn(2 * 100, 32, requires_grad=True)
    grads = []
    for fn, args in ((GLUFunction.apply, ("silu", True)), (glu_reference, ("silu",))):
        gu = x @ w.T  # [9, 200]
        h = fn(gu[:, :100], gu[:, 100:], *args)
        grads.append(torch.autograd.grad(h.pow(2).sum(), (w,))[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)

    gu = torch.randn(4, 200, requires_grad=True) * 1
    g, u = gu[:, :100], gu[:, 100:]
    h = GLUFunction.apply(g, u, "gelu", True)
    dh = torch.randn_like(h)
    ref_dg, ref_du = torch.autograd.grad(glu_reference(g, u, "gelu"), (g, u), dh)
    h.backward(dh)
    torch.testing.assert_close(gu[:, :100].detach(), ref_dg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gu[:, 100:].detach(), ref_du, rtol=1e-6, atol=1e-6)


def test_inplace_backward_twice_raises_instead_of_reading_gradients():
    g = torch.randn(4, 64, requires_grad=True)
    h = GLUFunction.apply(g * 1, g * 2, "silu", True)
    h.sum().backward(retain_graph=True)
    # autograd's version check, worded for saved views ("... has been modified inplace ...")
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified inplace"):
        h.sum().backward()
    x = torch.randn(3, 64, requires_grad=True)
    y = x * 1
    h = GLUFunction.apply(y, y, "gelu", True)  # g is u: falls back to fresh buffers, stays right
    (gx,) = torch.autograd.grad(h.pow(2).sum(), (x,))
    (rx,) = torch.autograd.grad(glu_reference(x, x, "gelu").pow(2).sum(), (x,))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_glu_backward_in_place_contract(activation, dtype):
    """lora.py's swap point: three [R, I] buffers in, overwritten with (h, dg, du), same objects back.
    Kernel (interpreted) and the torch fallback both against float64 truth."""
    g, u, dh = _inputs((37, 300), dtype, 11)
    truth = _run(glu_reference, g.double(), u.double(), dh.double(), activation)
    same = _run(glu_reference, g, u, dh, activation)
    kernel_bufs = [t.clone() for t in (dh, g, u)]
    _glu_bwd(kernel_bufs[0], kernel_bufs[1], kernel_bufs[2], ACTIVATIONS[activation], inplace=True, store_h=True)
    torch_bufs = [t.clone() for t in (dh, g, u)]
    out = glu_backward_(*torch_bufs, activation)
    assert all(a is b for a, b in zip(out, torch_bufs))
    for bufs in (kernel_bufs, torch_bufs):
        for name, a, s, t in zip(("h", "dg", "du"), bufs, same, truth):
            err_k, err_t, scale = errors_vs_truth(a, s, t)
            assert err_k <= err_t + ATOL[dtype] + RTOL[dtype] * scale, f"{name}: {err_k:.3e} vs {err_t:.3e}"
    assert torch.equal(glu_forward(g, u, activation), glu_reference(g, u, activation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_equals_hf_act2fn(dtype):
    from transformers.activations import ACT2FN

    g, u, _ = _inputs((5, 333), dtype, 1)
    for name in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        assert torch.equal(glu_reference(g, u, name), ACT2FN[name](g) * u), name


def test_public_functions_and_errors():
    g, u, _ = _inputs((3, 64), torch.float32, 2)
    assert torch.equal(swiglu(g, u), glu_reference(g, u, "silu"))
    assert torch.equal(geglu(g, u), glu_reference(g, u, "gelu_pytorch_tanh"))
    assert torch.equal(geglu(g, u, approximate="none"), glu_reference(g, u, "gelu"))
    with pytest.raises(ValueError, match="gelu_new"):
        glu(g, u, "gelu_new")
    with pytest.raises(ValueError, match="must match"):
        GLUFunction.apply(g, u[:, :32], "silu", False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_gpu_matches_truth(dtype, activation, inplace):
    _check((2, 4096, 14336), dtype, activation, inplace, device="cuda")
