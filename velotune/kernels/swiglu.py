"""Gated MLP activations: SwiGLU `silu(g) * u` and GeGLU `gelu(g) * u` (erf or tanh), fused fwd/bwd.

    h  = act(g) * u
    dg = dh * u * act'(g)
    du = dh * act(g)

Activations by transformers' ACT2FN name (the `hidden_act` / `hidden_activation` config field):
    "silu", "swish"        silu(x) = x * sigmoid(x)                           (Llama, Mistral, Qwen)
    "gelu"                 0.5 x (1 + erf(x / sqrt 2)), exact                 (GELUActivation)
    "gelu_pytorch_tanh"    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))    (Gemma)
`gelu_new`/`gelu_fast` are the tanh formula written out in python; they are not accepted here so that a
config naming them takes the HF path rather than a kernel whose rounding differs (~1e-7).

Numerics: the kernel computes act(g) * u in fp32 and rounds once; HF rounds act(g) to the input dtype and
then the product (two roundings in bf16). `glu_reference` is HF's `act_fn(g) * u` bit for bit.

Memory: forward saves g and u (the inputs; no activation output is kept) and the backward recomputes
act(g). With `inplace_backward=True` the backward writes dg over g and du over u, so no new [.., I]
buffers exist beyond dh. Aliasing rule: that is safe only if nothing else will read g or u afterwards
(no other autograd node saved them, the caller keeps no reference, and backward runs once - no
retain_graph re-run); the decoder owns its gate/up projection outputs and meets it. The version
counters of g and u are bumped, so a second backward or another node that saved them raises
autograd's "modified by an inplace operation" error rather than computing with gradients. g and u may be
column slices of one fused gate_up buffer [.., 2I]: dg and du then land in the matching halves, which is
the fused projection's gradient with no concatenation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.kernels._utils import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None

# HF name -> kernel activation code (a constexpr: one compiled variant each).
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}
# 1024 elements per program: 8 per thread with 4 warps, enough in flight for a bandwidth-bound op.
_BLOCK = 1024


def _activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: activation={activation!r} has no fused kernel; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def glu_reference(g: torch.Tensor, u: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """HF's `ACT2FN[activation](g) * u`, differentiable. g, u: [..., I], same shape and dtype."""
    code = _activation_code(activation)
    if code == 0:
        a = F.silu(g)
    else:
        a = F.gelu(g, approximate="none" if code == 1 else "tanh")
    return a * u


if triton is not None:

    @triton.jit
    def _sigmoid_pair(x):
        """(sigmoid(x), sigmoid(-x)), each to ~1 ulp even where one is tiny: tanh-GELU needs
        1 - tanh(y)^2 = 4 sigmoid(2y) sigmoid(-2y), which 1 - t*t loses to cancellation (at g = 5,
        1 - t = 6e-8 is one fp32 ulp of 1). Triton 3.6 has no tl.tanh; this costs one exp, one div."""
        e = tl.exp(-tl.abs(x))
        big = 1.0 / (1.0 + e)
        small = e * big
        pos = x >= 0
        return tl.where(pos, big, small), tl.where(pos, small, big)

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in fp32."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))  # 1/sqrt(2)
            a = g * cdf
            da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)  # 1/sqrt(2*pi)
        else:
            # tanh(y) = s - sn with s, sn = sigmoid(+-2y): 0.5 (1 + tanh) = s, 1 - tanh^2 = 4 s sn.
            # 0.7978845608028654 = sqrt(2/pi); 0.134145 = 3 * 0.044715
            s, sn = _sigmoid_pair(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
            a = g * s
            da = s + 2.0 * g * s * sn * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return a, da

    @triton.jit
    def _glu_fwd_kernel(G, U, H, stride_g, stride_u, stride_h, n_cols, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        tl.store(H + row * stride_h + cols, (a * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        DH, G, U, DG, DU, H, stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_h, n_cols,
        ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # DG may alias G, DU may alias U and H may alias DH: each element is loaded before it is
        # overwritten, by the same program, so the in-place backward is race-free.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        tl.store(DG + row * stride_dg + cols, (dh * u * da).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, (dh * a).to(DU.dtype.element_ty), mask=mask)
        if STORE_H:  # the down projection's input, rebuilt for its LoRA-A gradient (lora.py)
            tl.store(H + row * stride_h + cols, (a * u).to(H.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., I] as a [R, I] view with unit column stride (a copy only if no such view exists)."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:  # leading dims not collapsible into one stride
            pass
    return x.reshape(-1, x.shape[-1]).contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    if n_rows > 2**31 - 1:
        raise ValueError(f"glu: {n_rows} rows exceed the launch grid; split the batch")
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def _glu_fwd(g2: torch.Tensor, u2: torch.Tensor, act: int) -> torch.Tensor:
    h = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    n_rows, n_cols = g2.shape
    if n_rows and n_cols:
        _glu_fwd_kernel[_grid(n_rows, n_cols)](
            g2, u2, h, g2.stride(0), u2.stride(0), h.stride(0), n_cols, ACT=act, BLOCK=_BLOCK, num_warps=4
        )
    return h


def _glu_bwd(dh2, g2, u2, act: int, inplace: bool, store_h: bool = False):
    """(dg, du) into g2/u2 if inplace else fresh buffers; with store_h, h = act(g) * u over dh2."""
    dg = g2 if inplace else torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    du = u2 if inplace else torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
    n_rows, n_cols = g2.shape
    if n_rows and n_cols:
        _glu_bwd_kernel[_grid(n_rows, n_cols)](
            dh2, g2, u2, dg, du, dh2, dh2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0),
            dh2.stride(0), n_cols, ACT=act, STORE_H=store_h, BLOCK=_BLOCK, num_warps=4,
        )
    return dg, du


class GLUFunction(torch.autograd.Function):
    """apply(g [..., I], u [..., I], activation: str, inplace_backward: bool) -> act(g) * u [..., I]."""

    @staticmethod
    def forward(ctx, g, u, activation, inplace_backward):
        if g.shape != u.shape or g.dtype != u.dtype:
            raise ValueError(f"glu: g {tuple(g.shape)} {g.dtype} and u {tuple(u.shape)} {u.dtype} must match")
        act = _activation_code(activation)
        g2, u2 = _rows(g), _rows(u)
        h = _glu_fwd(g2, u2, act)
        ctx.save_for_backward(g2, u2)
        ctx.act = act
        # g2 is u2 (glu(x, x)) would make dg and du race for one buffer: then use fresh buffers
        ctx.inplace = bool(inplace_backward) and g2.data_ptr() != u2.data_ptr()
        ctx.shape = g.shape
        return h.view(g.shape)

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        dg, du = _glu_bwd(_rows(dh), g2, u2, ctx.act, ctx.inplace)
        if ctx.inplace:
            # g and u now hold dg and du: bump their versions so a second backward (retain_graph) or
            # another node that saved g or u raises "modified by an inplace operation" instead of
            # silently reading gradients as activations
            torch.autograd.graph.increment_version(g2)
            torch.autograd.graph.increment_version(u2)
        return dg.view(ctx.shape), du.view(ctx.shape), None, None


def glu(g: torch.Tensor, u: torch.Tensor, activation: str = "silu", inplace_backward: bool = False) -> torch.Tensor:
    """act(g) * u for the gated MLP; g, u: [..., I] (gate_proj and up_proj outputs), same dtype.

    activation: an ACT2FN name in `ACTIVATIONS`. inplace_backward: write dg/du over g/u (see the
    aliasing rule in the module docstring). CUDA runs the Triton kernels, elsewhere `glu_reference`.
    Returns a new [..., I] tensor in g.dtype.
    """
    if use_triton(g):
        return GLUFunction.apply(g, u, activation, inplace_backward)
    return glu_reference(g, u, activation)


def swiglu(g: torch.Tensor, u: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """silu(g) * u (Llama/Mistral/Qwen MLP)."""
    return glu(g, u, "silu", inplace_backward)


def geglu(
    g: torch.Tensor, u: torch.Tensor, approximate: str = "tanh", inplace_backward: bool = False
) -> torch.Tensor:
    """gelu(g) * u; approximate="tanh" is Gemma's gelu_pytorch_tanh, "none" the exact erf form."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu: approximate={approximate!r}; use 'tanh' or 'none'")
    return glu(g, u, "gelu_pytorch_tanh" if approximate == "tanh" else "gelu", inplace_backward)


def _act_and_grad_torch(g: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(g), act'(g)) in torch, same formulas as the kernel's `_act_and_grad`."""
    if code == 0:
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if code == 1:
        cdf = 0.5 * (1 + torch.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * 0.3989422804014327 * torch.exp(-0.5 * g * g)
    y2 = 2 * 0.7978845608028654 * (g + 0.044715 * g**3)
    s, sn = torch.sigmoid(y2), torch.sigmoid(-y2)  # 1 - tanh^2 = 4 s sn without cancellation
    return g * s, s + 2 * g * s * sn * 0.7978845608028654 * (1 + 0.134145 * g * g)


def glu_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str = "silu"):
    """In place on three [R, I] buffers (lora.py's `_glu_backward_` contract, no autograd):
    dh <- h = act(g) * u, g <- dg = dh * u * act'(g), u <- du = dh * act(g). Returns (dh, g, u).

    The caller owns all three buffers (they must not be needed afterwards in their old meaning). h is
    the kernel's forward formula (fp32, one rounding), which may differ from HF's two-rounding bf16 h
    by one ulp. CUDA runs one fused kernel; elsewhere torch in fp32 (fp64 for fp64 inputs).
    """
    code = _activation_code(activation)
    if not (dh.shape == g.shape == u.shape and dh.dim() == 2):
        raise ValueError(f"glu_backward_: dh, g, u must be one [R, I] shape; got {dh.shape}, {g.shape}, {u.shape}")
    if any(t.stride(-1) != 1 for t in (dh, g, u)):
        raise ValueError("glu_backward_: the buffers are overwritten in place and need a unit column stride")
    if use_triton(g):
        _glu_bwd(dh, g, u, code, inplace=True, store_h=True)
        return dh, g, u
    acc = torch.promote_types(g.dtype, torch.float32)
    a, da = _act_and_grad_torch(g.to(acc), code)
    uf, dhf = u.to(acc), dh.to(acc)  # aliases of u and dh when they are already fp32:
    h, dg, du = a * uf, dhf * uf * da, dhf * a  # so every result exists before any buffer is written
    dh.copy_(h)
    g.copy_(dg)
    u.copy_(du)
    return dh, g, u


def glu_forward(g: torch.Tensor, u: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(g) * u without autograd, for callers that save g and u themselves (lora.py's MLP).
    CUDA: the fused kernel (fp32, one rounding); elsewhere `glu_reference` (HF's ops, bit for bit)."""
    if use_triton(g):
        if g.shape != u.shape or g.dtype != u.dtype:
            raise ValueError(f"glu_forward: g {tuple(g.shape)} {g.dtype} and u {tuple(u.shape)} {u.dtype} must match")
        return _glu_fwd(_rows(g), _rows(u), _activation_code(activation)).view(g.shape)
    return glu_reference(g, u, activation)
