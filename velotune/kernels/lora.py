"""Fused LoRA linear layers over a frozen base weight: one projection, fused q/k/v, and the gated MLP.

Math per projection (PEFT's LoRA, dropout 0): ``y = x W^T + s (x A^T) B^T`` with ``W [out, in]`` frozen,
``A [r, in]``, ``B [out, r]``, ``s`` the scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
Backward, with ``xa = x A^T`` saved from the forward (``[tokens, r]``, small):

    dx = dy W + s (dy B) A        dA = s (dy B)^T x        dB = s dy^T xa

The base weight ``W`` is either a plain frozen tensor (16-bit LoRA) or any object with
``weight_shape``/``dtype``/``dequantize()`` (``velotune.quant.NF4Weight`` for QLoRA). A 4-bit weight is
dequantised right before each matmul that needs it, in forward and again in backward, and dropped after
(never saved); no gradient is ever formed for ``W``. The scaling is folded into GEMM ``alpha``.

Precision: matmuls run in ``x.dtype`` (cuBLAS); ``A``/``B`` are cast to it (PEFT keeps them in fp32 and
upcasts ``x`` instead; we trade that for bf16 tensor-core GEMMs) and their gradients are returned in their
own dtype. The MLP activation's backward is computed in fp32 (fp64 for fp64 inputs).

Matmuls use torch; the Triton code on this path is the NF4 dequantisation (``kernels/nf4.py``), the
few-row 4-bit matmul of decoding (``kernels/nf4_matmul.py``, forward only: same operands, fp32
accumulation) and the fused SwiGLU/GeGLU at the single marked place in :func:`_glu_backward_`.
Unsupported here (the caller keeps PEFT's path): LoRA dropout > 0, DoRA, and 3-D+ weights.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F

from . import nf4_matmul, swiglu
from ._utils import use_triton


class FrozenWeight(Protocol):
    """A quantised frozen weight that can produce its ``[out, in]`` matrix (e.g. ``NF4Weight``)."""

    weight_shape: tuple[int, int]
    dtype: torch.dtype

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor: ...


Base = Union[torch.Tensor, FrozenWeight]
# (base, A, B, scaling); A and B None for a projection without an adapter.
Projection = tuple[Base, Optional[torch.Tensor], Optional[torch.Tensor], float]


def _empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Every buffer this file fills in place comes from here (tests poison it with NaN)."""
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under ``torch.autocast`` run in its dtype, as ``nn.Linear`` would (HF Trainer's bf16/fp16 modes)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(dev))
    return x


def _autocast_off(backward):
    """Backward computes in the dtypes the forward chose, whatever autocast state it is called under."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        dev = next(g for g in grads if g is not None).device.type
        with torch.autocast(dev, enabled=False):
            return backward(ctx, *grads)
    return wrapper


# ----------------------------------------------------------------------------------------------------
# checks and small helpers shared by the three Functions
# ----------------------------------------------------------------------------------------------------

def _base_shape(base: Base) -> tuple[int, int]:
    if isinstance(base, torch.Tensor):
        return tuple(base.shape)
    return tuple(base.weight_shape)


def _check_projection(name: str, proj: Projection, in_features: int, x: torch.Tensor) -> None:
    """Validate ``(base, A, B, scaling)`` for an input of ``in_features`` with ``x``'s dtype and device."""
    base, A, B, scaling = proj
    if isinstance(base, torch.Tensor):
        if base.dim() != 2:
            raise ValueError(f"{name}: base weight must be [out, in], got shape {tuple(base.shape)}")
        if base.requires_grad:
            raise ValueError(f"{name}: base weight requires grad, but the fused LoRA path never forms a "
                             "gradient for it; freeze it (`weight.requires_grad_(False)`) or use full fine-tuning")
        if base.dtype != x.dtype or base.device != x.device:
            raise ValueError(f"{name}: base weight is {base.dtype} on {base.device} but x is {x.dtype} on "
                             f"{x.device}; cast the frozen weight once at load time, not per call")
    elif not hasattr(base, "dequantize") or not hasattr(base, "weight_shape"):
        raise TypeError(f"{name}: base must be a tensor or a quantised weight with dequantize() "
                        f"(velotune.quant.NF4Weight), got {type(base).__name__}")
    elif getattr(base, "device", x.device) != x.device:
        raise ValueError(f"{name}: quantised base weight is on {base.device} but x is on {x.device}")
    out_f, in_f = _base_shape(base)
    if in_f != in_features:
        raise ValueError(f"{name}: base weight takes {in_f} input features but x has {in_features}")
    if (A is None) != (B is None):
        raise ValueError(f"{name}: pass both LoRA A and B, or neither")
    if A is not None:
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or tuple(B.shape) != (out_f, r):
            raise ValueError(f"{name}: LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                             f"[r, {in_f}] and [{out_f}, r]")
        if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise TypeError(f"{name}: scaling must be a finite Python number, got {scaling!r}")


def _weight(base: Base, dtype: torch.dtype) -> torch.Tensor:
    """The frozen ``[out, in]`` weight in ``dtype``; a 4-bit one is dequantised now (bitsandbytes' values)."""
    if isinstance(base, torch.Tensor):
        return base
    held = getattr(base, "resident", None)  # kept dequantised (NF4Weight.hold): the same values
    if held is not None and held.dtype == dtype:
        return held
    w = base.dequantize()
    return w if w.dtype == dtype else w.to(dtype)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * a @ b`` with alpha in the GEMM epilogue (no extra rounding, no extra pass)."""
    out = _empty((a.shape[0], b.shape[1]), a)
    return out.addmm_(a, b, beta=0, alpha=alpha)  # beta=0: the uninitialised buffer is never read


# One row (decoding at batch 1) times a 4-bit weight, without gradients: bitsandbytes' own 4-bit GEMV
# (bnb.matmul_4bit's inference path, what transformers + bitsandbytes run for such a product: it reads the
# 4-bit storage only, dequantising in registers) instead of dequantise + GEMM. On CUDA since its GPU test
# (recorded decode at batch 1 = HF's greedy tokens) passed and it measured 65.8 vs 42.2 tok/s at batch 1 (8B
# shape, r16, H200, bench/decode.py run of 2026-11-28, 7e306d4); ON_CPU: tests, through bitsandbytes' CPU
# implementation of the same op.
BNB_GEMV_ON_CUDA = True
BNB_GEMV_ON_CPU = False


def _bnb_gemv_wanted(x2: torch.Tensor, base) -> bool:
    if x2.shape[0] != 1 or torch.is_grad_enabled() or getattr(base, "bnb_state", None) is None or base.transposed:
        return False
    if not (BNB_GEMV_ON_CUDA if x2.is_cuda else BNB_GEMV_ON_CPU):
        return False
    return x2.dtype == base.bnb_state.dtype and x2.shape[1] % base.blocksize == 0


def _base_mm(x2: torch.Tensor, base: Base) -> torch.Tensor:
    """``x2 W^T``: for one row (decoding, batch 1) times a 4-bit weight, bitsandbytes' 4-bit GEMV where
    switched on; for a few rows the 4-bit matmul that never materialises W (kernels/nf4_matmul.py, where
    switched on); otherwise W dequantised (if 4-bit) and a GEMM."""
    if not isinstance(base, torch.Tensor):
        if _bnb_gemv_wanted(x2, base):
            import bitsandbytes as bnb

            return bnb.matmul_4bit(x2, base.packed.reshape(-1, 1).t(), quant_state=base.bnb_state)
        if nf4_matmul.wanted(x2) and nf4_matmul.supported(x2, base):
            return nf4_matmul.nf4_matmul(x2, base)
    return x2 @ _weight(base, x2.dtype).t()


def _linear(x2: torch.Tensor, base: Base, b: Optional[torch.Tensor], xa: Optional[torch.Tensor],
            s: float) -> torch.Tensor:
    """``x2 W^T + s xa B^T``; ``xa = x2 A^T`` already computed (possibly a column slice of a wider GEMM)."""
    y = _base_mm(x2, base)
    if xa is not None:
        y.addmm_(xa, b.t(), alpha=s)
    return y


def _pack_projections(projs: Sequence[Projection]):
    """Tensors to save (plain bases, A, B) and the Python-side state needed to rebuild them."""
    tensors, meta = [], []
    for base, A, B, s in projs:
        plain = isinstance(base, torch.Tensor)
        tensors += ([base] if plain else []) + ([A, B] if A is not None else [])
        meta.append((None if plain else base, plain, A is not None, s))
    return tensors, meta


def _unpack_projections(saved, meta):
    projs, i = [], 0
    for obj, plain, has_lora, s in meta:
        base = saved[i] if plain else obj
        i += plain
        A, B = (saved[i], saved[i + 1]) if has_lora else (None, None)
        i += 2 * has_lora
        projs.append((base, A, B, s))
    return projs, i


def _lora_a_cat(projs: Sequence[Projection], dtype: torch.dtype):
    """Stack the A matrices of projections sharing an input: one ``x A_cat^T`` GEMM reads ``x`` once."""
    As = [_cast(A, dtype) for _, A, _, _ in projs if A is not None]
    if not As:
        return None, []
    ranks = [A.shape[0] if A is not None else 0 for _, A, _, _ in projs]
    return (As[0] if len(As) == 1 else torch.cat(As, 0)), ranks


def _slices(ranks):
    out, start = [], 0
    for r in ranks:
        out.append(slice(start, start + r) if r else None)
        start += r
    return out


def _shared_input_backward(ctx_needs_dx: bool, x2: torch.Tensor, xa_cat: Optional[torch.Tensor],
                           a_cat: Optional[torch.Tensor], ranks, projs, dys):
    """Backward of several LoRA projections of one input ``x2`` with output grads ``dys``.

    Returns ``dx`` (or None) and per projection ``(dA, dB)`` (None without adapter). Each 4-bit base is
    dequantised just before its ``dy W`` GEMM and freed after, so at most one is alive at a time.
    """
    dtype = x2.dtype
    dx = None
    if ctx_needs_dx:
        for (base, _, _, _), dy in zip(projs, dys):
            w = _weight(base, dtype)
            dx = dy @ w if dx is None else dx.addmm_(dy, w)
            del w
    grads = [(None, None)] * len(projs)
    if a_cat is None:
        return dx, grads
    sl = _slices(ranks)
    # dyB_cat[:, p] = s_p * dy_p B_p  ([tokens, sum r], small): scaling applied once here
    dyb_parts = [torch.mm(dy, _cast(B, dtype)).mul_(s)
                 for (_, A, B, s), dy in zip(projs, dys) if A is not None]
    dyb_cat = dyb_parts[0] if len(dyb_parts) == 1 else torch.cat(dyb_parts, 1)
    if dx is not None:
        dx.addmm_(dyb_cat, a_cat)
    da_cat = dyb_cat.t() @ x2  # [sum r, in]: one GEMM reads x once for all A grads
    for p, ((_, A, B, s), dy) in enumerate(zip(projs, dys)):
        if A is None:
            continue
        da = da_cat[sl[p]].to(A.dtype)
        db = _scaled_mm(dy.t(), xa_cat[:, sl[p]], s).to(B.dtype)
        grads[p] = (da, db)
    return dx, grads


# ----------------------------------------------------------------------------------------------------
# one projection
# ----------------------------------------------------------------------------------------------------

class LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + s (x A^T) B^T (+ bias)``; saves ``x``, ``xa = x A^T`` and references to A, B, W."""

    @staticmethod
    def forward(ctx, x, base, A, B, scaling, bias):
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)
        proj = (base, A, B, float(scaling))
        a = _cast(A, x.dtype)
        xa = x2 @ a.t() if a is not None else None
        y = _linear(x2, base, _cast(B, x.dtype), xa, proj[3])
        if bias is not None:
            y += bias.to(y.dtype)
        tensors, meta = _pack_projections([proj])
        ctx.meta, ctx.has_bias = meta, bias is not None
        ctx.save_for_backward(x, xa, *tensors)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        x, xa, *rest = ctx.saved_tensors
        projs, _ = _unpack_projections(rest, ctx.meta)
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        a_cat, ranks = _lora_a_cat(projs, x.dtype)
        dx, [(da, db)] = _shared_input_backward(ctx.needs_input_grad[0], x2, xa, a_cat, ranks, projs, [dy2])
        dbias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
        return (dx.view(x.shape) if dx is not None else None), None, da, db, None, dbias


def lora_linear(x: torch.Tensor, base: Base, A: Optional[torch.Tensor], B: Optional[torch.Tensor],
                scaling: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused LoRA projection.

    Args:
        x: ``[..., in]`` activations (bf16/fp16/fp32/fp64).
        base: frozen ``[out, in]`` tensor in ``x.dtype`` (requires_grad False), or an ``NF4Weight``.
        A: ``[r, in]`` LoRA A (PEFT's ``lora_A.weight``), or None for no adapter.
        B: ``[out, r]`` LoRA B (PEFT's ``lora_B.weight``), or None.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA), a Python number.
        bias: optional ``[out]`` bias of the base layer (gets a gradient only if it requires one).

    Returns ``[..., out]`` in ``x.dtype``.
    """
    x = _autocast_input(x)
    _check_projection("lora_linear", (base, A, B, scaling), x.shape[-1], x)
    with torch.autocast(x.device.type, enabled=False):
        return LoRALinearFunction.apply(x, base, A, B, scaling, bias)


def lora_linear_reference(x, base, A, B, scaling, bias=None):
    """Plain-autograd oracle of :func:`lora_linear` (same casts, no fusion)."""
    y = x @ _weight(base, x.dtype).t()
    if A is not None:
        y = y + scaling * ((x @ A.to(x.dtype).t()) @ B.to(x.dtype).t())
    return y if bias is None else y + bias.to(y.dtype)


# ----------------------------------------------------------------------------------------------------
# q, k, v from one input
# ----------------------------------------------------------------------------------------------------

class LoRAQKVFunction(torch.autograd.Function):
    """q, k, v projections of one ``x``: one ``x A_cat^T`` GEMM forward, one ``dx`` accumulated backward."""

    @staticmethod
    def forward(ctx, x, *flat):
        projs = [tuple(flat[i:i + 4]) for i in range(0, 12, 4)]
        x2 = x.reshape(-1, x.shape[-1])
        a_cat, ranks = _lora_a_cat(projs, x.dtype)
        xa_cat = x2 @ a_cat.t() if a_cat is not None else None
        outs = []
        for (base, _, B, s), sl in zip(projs, _slices(ranks) if ranks else [None] * 3):
            xa = xa_cat[:, sl] if sl is not None else None
            y = _linear(x2, base, _cast(B, x.dtype), xa, float(s))
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        tensors, meta = _pack_projections(projs)
        ctx.meta = meta
        ctx.save_for_backward(x, xa_cat, *tensors)
        return tuple(outs)

    @staticmethod
    @_autocast_off
    def backward(ctx, dq, dk, dv):
        x, xa_cat, *rest = ctx.saved_tensors
        projs, _ = _unpack_projections(rest, ctx.meta)
        x2 = x.reshape(-1, x.shape[-1])
        dys = [d.reshape(-1, d.shape[-1]).to(x.dtype) for d in (dq, dk, dv)]
        a_cat, ranks = _lora_a_cat(projs, x.dtype)
        dx, grads = _shared_input_backward(ctx.needs_input_grad[0], x2, xa_cat, a_cat, ranks, projs, dys)
        flat_grads = []
        for da, db in grads:
            flat_grads += [None, da, db, None]
        return (dx.view(x.shape) if dx is not None else None, *flat_grads)


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection):
    """Fused q/k/v LoRA projections of one input.

    Args:
        x: ``[..., hidden]``.
        q, k, v: ``(base, A, B, scaling)`` each, as in :func:`lora_linear` (A, B may be None).

    Returns ``(q, k, v)``, each ``[..., out_p]`` in ``x.dtype``.
    """
    x = _autocast_input(x)
    for name, p in zip("qkv", (q, k, v)):
        _check_projection(f"lora_qkv[{name}]", p, x.shape[-1], x)
    with torch.autocast(x.device.type, enabled=False):
        return LoRAQKVFunction.apply(x, *q, *k, *v)


def lora_qkv_reference(x, q, k, v):
    """Plain-autograd oracle of :func:`lora_qkv`."""
    return tuple(lora_linear_reference(x, *p) for p in (q, k, v))


# ----------------------------------------------------------------------------------------------------
# gated MLP: down(act(gate(x)) * up(x))
# ----------------------------------------------------------------------------------------------------

def _silu_and_grad(g):
    sig = torch.sigmoid(g)
    return g * sig, sig * (1 + g * (1 - sig))


def _gelu_and_grad(g):
    cdf = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))
    return g * cdf, cdf + g * pdf


def _gelu_tanh_and_grad(g):
    k, c = math.sqrt(2 / math.pi), 0.044715
    t = torch.tanh(k * (g + c * g * g * g))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * c * g * g)


_GELU_TANH = (functools.partial(F.gelu, approximate="tanh"), _gelu_tanh_and_grad)
# name -> (forward exactly as HF's ACT2FN[name] computes it, (act, act') for the backward). HF's own
# hidden_act names are rows too, so a config's value can be passed through. Not "gelu_new"/"gelu_fast":
# HF writes those out in Python and their rounding differs.
_ACTIVATIONS = {
    "silu": (F.silu, _silu_and_grad),
    "swish": (F.silu, _silu_and_grad),
    "gelu": (F.gelu, _gelu_and_grad),  # erf
    "gelu_tanh": _GELU_TANH,
    "gelu_pytorch_tanh": _GELU_TANH,
}


# lora.py's activation names -> kernels/swiglu.py's (HF ACT2FN names)
_KERNEL_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
               "gelu_pytorch_tanh": "gelu_pytorch_tanh"}


def _glu_forward(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(g) * u`` with the same torch ops as HF's MLP (differentiable; bit for bit HF's)."""
    return _ACTIVATIONS[activation][0](g) * u


def _glu_forward_nograd(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(g) * u`` inside the MLP Function (no autograd). CUDA: the fused SwiGLU/GeGLU kernel (fp32,
    one rounding: one pass instead of two, within one ulp of HF's two-rounding result; the backward
    kernel rebuilds h with the same formula). Elsewhere HF's ops."""
    if use_triton(g):
        return swiglu.glu_forward(g, u, _KERNEL_ACT[activation])
    return _glu_forward(g, u, activation)


# torch path of the GLU backward: row chunks keep its ~6 fp32 temporaries at <= 64 MiB each
# (unchunked at 4096 x 14336 they would take 1.4 GiB; the fused kernel needs none).
_GLU_CHUNK_ELEMS = 1 << 24


def _glu_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str):
    """In place: ``dh <- h = act(g) * u``, ``g <- dg = dh * u * act'(g)``, ``u <- du = dh * act(g)``.

    CUDA: the fused SwiGLU/GeGLU backward kernel (velotune/kernels/swiglu.py), one pass over the three
    buffers. Elsewhere this torch version, in fp32 (fp64 for fp64 inputs), chunk by chunk of rows.
    """
    if use_triton(g):
        return swiglu.glu_backward_(dh, g, u, _KERNEL_ACT[activation])
    rows = max(1, _GLU_CHUNK_ELEMS // max(1, g.shape[-1]))
    for i in range(0, g.shape[0], rows):
        _glu_backward_chunk_(dh[i:i + rows], g[i:i + rows], u[i:i + rows], activation)
    return dh, g, u


def _glu_backward_chunk_(dh, g, u, activation):
    h = _glu_forward(g, u, activation)  # recomputed with the forward's ops: identical to the forward's h
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    act, dact = _ACTIVATIONS[activation][1](g.to(acc))
    dhf = dh.to(acc)
    du = dhf * act
    dg = dhf * u.to(acc) * dact
    dh.copy_(h)
    g.copy_(dg)
    u.copy_(du)


class LoRAMLPFunction(torch.autograd.Function):
    """Gated MLP with LoRA on gate, up and down.

    Saved for backward (Llama-3.1-8B: hidden 4096, intermediate 14336, r 16, bf16), per token:
      g = gate(x), u = up(x)   2 x 14336 x 2 B = 57,344 B   needed for act'(g), du and to rebuild h
      x (the input, normally also held by its producer)   8,192 B   for dA_gate, dA_up
      x [Ag;Au]^T and h Ad^T   (16 + 16 + 16) x 2 B = 96 B   for dB_gate, dB_up, dB_down
    = 65,632 B/token (256 MiB per layer at 4096 tokens). Not saved: h = act(g) * u (the down input,
    another 28,672 B/token), rebuilt in backward from g and u, and act(g). Plain autograd (HF + PEFT)
    keeps g, act(g), u and h: 4 x 28,672 B. Backward overwrites g and u with their gradients and the
    [tokens, 14336] buffer of dh with h, so its only extra large buffer is dh. Because g and u are
    overwritten, a second backward through the same graph (retain_graph=True) raises autograd's
    in-place modification error instead of returning wrong gradients.
    """

    @staticmethod
    def forward(ctx, x, activation, need_output, *flat):
        gate, up, down = [tuple(flat[i:i + 4]) for i in range(0, 12, 4)]
        x2 = x.reshape(-1, x.shape[-1])
        dt = x.dtype
        a_gu, ranks = _lora_a_cat([gate, up], dt)
        xa_gu = x2 @ a_gu.t() if a_gu is not None else None
        sl = _slices(ranks) if ranks else [None, None]
        g, u = [_linear(x2, b, _cast(B, dt), xa_gu[:, s_] if s_ is not None else None, float(s))
                for (b, _, B, s), s_ in zip((gate, up), sl)]
        h = _glu_forward_nograd(g, u, activation)
        base_d, A_d, B_d, s_d = down
        ha = h @ _cast(A_d, dt).t() if A_d is not None else None
        if need_output:
            y = _linear(h, base_d, _cast(B_d, dt), ha, float(s_d))
        else:  # a recompute whose output only roots the backward (models/recompute.py): nothing reads it
            y = h.new_zeros(h.shape[0], _base_shape(base_d)[0])
        del h
        tensors, meta = _pack_projections([gate, up, down])
        ctx.meta, ctx.activation = meta, activation
        ctx.save_for_backward(x, g, u, xa_gu, ha, *tensors)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        x, g, u, xa_gu, ha, *rest = ctx.saved_tensors
        (gate, up, down), _ = _unpack_projections(rest, ctx.meta)
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)
        base_d, A_d, B_d, s_d = down
        w = _weight(base_d, dt)
        dh = dy2 @ w
        del w
        da_d = db_d = None
        if A_d is not None:
            dyb_d = dy2 @ _cast(B_d, dt)
            dh.addmm_(dyb_d, _cast(A_d, dt), alpha=s_d)
            db_d = _scaled_mm(dy2.t(), ha, s_d).to(B_d.dtype)
        h, dg, du = _glu_backward_(dh, g, u, ctx.activation)
        if A_d is not None:
            da_d = _scaled_mm(dyb_d.t(), h, s_d).to(A_d.dtype)
        del h, dh
        a_gu, ranks = _lora_a_cat([gate, up], dt)
        dx, ((da_g, db_g), (da_u, db_u)) = _shared_input_backward(
            ctx.needs_input_grad[0], x2, xa_gu, a_gu, ranks, [gate, up], [dg, du])
        return (dx.view(x.shape) if dx is not None else None, None, None,
                None, da_g, db_g, None, None, da_u, db_u, None, None, da_d, db_d, None)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection,
             activation: str = "silu", need_output: bool = True) -> torch.Tensor:
    """Fused gated MLP ``down(act(gate(x)) * up(x))`` with LoRA on each projection.

    Args:
        x: ``[..., hidden]``.
        gate, up: ``(base, A, B, scaling)`` with base ``[intermediate, hidden]``.
        down: ``(base, A, B, scaling)`` with base ``[hidden, intermediate]``.
        activation: ``"silu"`` (SwiGLU; HF ``silu``/``swish``), ``"gelu"`` (GeGLU, erf; HF ``gelu``) or
            ``"gelu_tanh"`` (HF ``gelu_pytorch_tanh``, also accepted by that name).
        need_output: False when nothing will read the output's values, only backpropagate through it (a
            checkpoint's recompute, models/recompute.py): the down projection is skipped and zeros are
            returned; every gradient is the same as with the output computed.

    Returns ``[..., hidden]`` in ``x.dtype``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported by the fused MLP; use one of "
                         f"{sorted(_ACTIVATIONS)} (HF hidden_act names), or keep the HF MLP for this family")
    x = _autocast_input(x)
    _check_projection("lora_mlp[gate]", gate, x.shape[-1], x)
    _check_projection("lora_mlp[up]", up, x.shape[-1], x)
    if _base_shape(gate[0]) != _base_shape(up[0]):
        raise ValueError(f"lora_mlp: gate {_base_shape(gate[0])} and up {_base_shape(up[0])} shapes differ")
    _check_projection("lora_mlp[down]", down, _base_shape(gate[0])[0], x)
    if _base_shape(down[0])[0] != x.shape[-1]:
        raise ValueError(f"lora_mlp: down projects to {_base_shape(down[0])[0]} features, x has {x.shape[-1]}")
    with torch.autocast(x.device.type, enabled=False):
        return LoRAMLPFunction.apply(x, activation, bool(need_output), *gate, *up, *down)


def lora_mlp_reference(x, gate, up, down, activation="silu"):
    """Plain-autograd oracle of :func:`lora_mlp` (HF's ``down(act(gate(x)) * up(x))``)."""
    h = _glu_forward(lora_linear_reference(x, *gate), lora_linear_reference(x, *up), activation)
    return lora_linear_reference(h, *down)
