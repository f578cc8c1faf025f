"""RMSNorm over the last dimension: fused Triton forward/backward, a pure-torch reference, dispatch.

Math (per row x of width H, accumulation in fp32):
    rstd = 1 / sqrt(mean(x^2) + eps)
    xn   = x * rstd
    Llama form  (cast_before_weight=True):   y = (w + offset) * xn.to(x.dtype)
    Gemma form  (cast_before_weight=False):  y = (xn * (offset + w)).to(x.dtype)   with offset = 1.0

Which families use which (transformers 5.17):
    LlamaRMSNorm (Llama, Mistral, Qwen2/3, Phi3...): offset=0.0, cast_before_weight=True
        `self.weight * hidden_states.to(input_dtype)`: xn is rounded to the input dtype *before*
        the weight multiply.
    GemmaRMSNorm (Gemma 1/2/3): offset=1.0, cast_before_weight=False
        `(output * (1.0 + self.weight.float())).type_as(x)`: the weight multiply happens in fp32.
    Olmo2-style `(w * xn).to(dtype)`: offset=0.0, cast_before_weight=False.

Numerics against HF:
    fp32 inputs: the reference is HF's expression, bit for bit. The kernel sums x^2 in a different
        order, so rstd may differ by ~1 ulp of fp32 (relative 6e-8).
    bf16/fp16 inputs, Llama form: the kernel rounds xn to the input dtype and multiplies by w in fp32;
        the product of two bf16 values is exact in fp32, so this equals HF's bf16*bf16 multiply except
        where the ~1-ulp rstd difference moves xn across a bf16 rounding boundary (a few elements in
        10^4). Output dtype is always x.dtype: with an fp32 weight and a bf16 x, HF would promote the
        output to fp32 (type promotion in `weight * x`); we return bf16 of the same value.
    Gemma form: fp32 all the way, one rounding at the end, as HF.

Backward saves x, the weight and rstd (fp32, one float per row), never xn or y. dW is reduced without
atomics: each program accumulates a partial sum over its rows in fp32, then torch sums the [P, H]
partials, so the result is deterministic for a given device. A frozen weight (LoRA) gets no dW pass.
"""
from __future__ import annotations

import torch

from velotune.kernels._utils import next_power_of_2, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - platforms without triton take the reference path only
    triton = None

# One program holds a [BLOCK_ROWS, BLOCK_H] tile; 64K fp32 elements is 256 KiB of registers/SMEM at most,
# above which the one-pass row reduction would spill. Llama-405B's H=16384 fits easily.
_MAX_BLOCK_H = 65536
# Aim for ~4096 elements per tile: one row at H=4096, 32 rows for a qk-norm of head_dim 128.
_TILE_ELEMS = 4096


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """Pure-torch RMSNorm, differentiable; the CPU path and the test oracle.

    Args:
        x: [..., H], any float dtype. fp16/bf16/fp32 compute in fp32; fp64 computes in fp64 (oracle).
        weight: [H], any float dtype.
        eps: added to mean(x^2) before the rsqrt.
        offset: added to the weight (1.0 for Gemma's `1 + w`).
        cast_before_weight: Llama form (round xn to x.dtype, then multiply) if True; Gemma form
            (multiply in fp32, round once) if False.
    Returns:
        y: [..., H] in x.dtype.
    """
    cdtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cdtype)
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(cdtype)
    if offset != 0.0:
        w = offset + w
    if cast_before_weight:
        y = w * xn.to(x.dtype).to(cdtype)
    else:
        y = xn * w
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, RSTD,
        stride_x, stride_y, n_rows, n_cols, eps, offset,
        CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_H)
        rmask = rows < n_rows
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)  # rows * stride exceeds 2^31 past 512K rows of H=4096
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        xn = x * rstd[:, None]
        if CAST_BEFORE_WEIGHT:
            xn = xn.to(Y.dtype.element_ty).to(tl.float32)
        y = xn * w[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program, offset,
        CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < n_cols
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        for r0 in range(row_start, row_end, BLOCK_ROWS):
            rows = r0 + tl.arange(0, BLOCK_ROWS)
            rmask = rows < row_end
            mask = rmask[:, None] & cmask[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xn = x * rstd[:, None]
            dxn = dy * w[None, :]
            # d/dx of x*rstd(x): rstd * (dxn - xn * mean(dxn * xn)); the bf16 cast of the Llama form
            # is treated as identity, as autograd does for HF's `.to(input_dtype)`.
            dot = tl.sum(dxn * xn, axis=1) / n_cols
            dx = rstd[:, None] * (dxn - xn * dot[:, None])
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if CAST_BEFORE_WEIGHT:
                    xn = xn.to(X.dtype.element_ty).to(tl.float32)  # y = w * round(xn): d y / d w = round(xn)
                dw_acc += tl.sum(dy * xn, axis=0)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=cmask)


def _launch_shape(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_ROWS, num_warps) for a row width."""
    if n_cols > _MAX_BLOCK_H:
        raise ValueError(
            f"rms_norm: hidden size {n_cols} exceeds the kernel's one-pass limit {_MAX_BLOCK_H}; "
            "use rms_norm_reference for such rows"
        )
    block_h = next_power_of_2(n_cols)
    block_rows = max(1, min(64, _TILE_ELEMS // block_h))
    # ~8 fp32 per thread per live tile: the backward keeps x, dy, xn, dxn live, and at 16 per thread
    # ptxas (sm_90, triton 3.6) needs 149 registers for H=4096 and spills from H=8192 on 8 warps.
    num_warps = min(32, max(4, block_h * block_rows // 256))
    return block_h, block_rows, num_warps


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, H] with unit column stride, copying only if no such view exists."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm_fwd(x2, weight, eps, offset, cast_before_weight):
    """x2: [R, H] -> (y [R, H] in x2.dtype, rstd [R] fp32)."""
    n_rows, n_cols = x2.shape
    block_h, block_rows, num_warps = _launch_shape(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return y, rstd
    grid = (triton.cdiv(n_rows, block_rows),)
    _rms_norm_fwd_kernel[grid](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps, offset,
        CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_ROWS=block_rows, BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return y, rstd


def _num_programs(n_rows: int, block_rows: int, device: torch.device) -> int:
    """Programs for the backward: ~4 per SM on CUDA so each streams many rows and the [P, H] partial
    dW stays small (H100: 132 SMs -> 528 x 4096 x 4 B = 8.6 MiB); 8 under the CPU interpreter."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(target, triton.cdiv(n_rows, block_rows)))


def _rms_norm_bwd(dy2, x2, weight, rstd, offset, cast_before_weight, compute_dw):
    """dy2, x2: [R, H] -> (dx [R, H] in x2.dtype, dw [H] in weight.dtype or None)."""
    n_rows, n_cols = x2.shape
    block_h, block_rows, num_warps = _launch_shape(n_cols)
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    n_prog = _num_programs(n_rows, block_rows, x2.device)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_prog), block_rows) * block_rows
    n_prog = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((n_prog if compute_dw else 1, n_cols), dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(n_prog,)](
        dy2, x2, weight, rstd, dx, partial,
        dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program, offset,
        CAST_BEFORE_WEIGHT=cast_before_weight, COMPUTE_DW=compute_dw,
        BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
    )
    dw = partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm. apply(x [..., H], weight [H], eps, offset, cast_before_weight) -> y [..., H]."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
        x2 = _as_rows(x)
        y, rstd = _rms_norm_fwd(x2, weight, float(eps), float(offset), bool(cast_before_weight))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = float(offset)
        ctx.cast_before_weight = bool(cast_before_weight)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(
            _as_rows(dy), x2, weight, rstd, ctx.offset, ctx.cast_before_weight,
            compute_dw=ctx.needs_input_grad[1],
        )
        dx = dx.view(dy.shape) if ctx.needs_input_grad[0] else None
        return dx, dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., H]) with weight [H]; returns x.dtype, same shape.

    Defaults are LlamaRMSNorm; Gemma is offset=1.0, cast_before_weight=False (see module docstring).
    CUDA tensors run the Triton kernel; anything else runs `rms_norm_reference`.
    """
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps, offset, cast_before_weight)
    return rms_norm_reference(x, weight, eps, offset, cast_before_weight)
