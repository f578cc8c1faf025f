"""Blockwise 4-bit (NF4 / FP4) dequantisation, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

Storage (bitsandbytes 0.50, read from its CPU, default and CUDA backends):

* ``packed``: uint8, ``ceil(numel / 2)`` bytes over the row-major flattened weight; element ``2i`` sits in
  the HIGH nibble of byte ``i`` and element ``2i + 1`` in the low nibble.
* ``absmax``: one scale per ``blocksize`` consecutive elements of the flattened weight (blocks cross rows
  when the row length is not a multiple of ``blocksize``, e.g. 123x507). Either fp32, or with double
  quantisation uint8 codes into ``code2`` (256 entries, fp32) scaled per ``blocksize2`` (256) codes by
  ``absmax2`` (fp32), plus one fp32 ``offset``.
* ``code``: the 16-entry fp32 table (NF4 quantiles or FP4 values, already normalised to [-1, 1]).

Rounding order, which bit-identity depends on (all fp32, one rounding per operation):

* nested scale: ``s = code2[q] * absmax2[b // blocksize2]`` (rounded), then ``s = s + offset`` (rounded).
  bitsandbytes does these as two separate ops, so the Triton kernel is launched with
  ``enable_fp_fusion=False``: otherwise the compiler may contract them into one FMA (one rounding).
* value: ``code[nibble] * s`` in fp32, then ONE conversion to the output dtype (round to nearest even).

No autograd.Function here: the base weight is frozen, so dequantisation never needs a gradient.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._utils import interpreting, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the reference path still works
    triton = None

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts

# ~4096 elements per program: 32 per thread at 4 warps, 64 B of bf16 stores per thread. Memory bound:
# 14336x4096 reads 29 MiB of nibbles and writes 112 MiB of bf16 (~45 us at 3.3 TB/s on an H100).
_ELEMS_PER_PROGRAM = 4096
_NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _fp32_to_bf16_rtne(x):
        # Round to nearest even on the bits (what cvt.rn.bf16.f32 and torch do). Only used under
        # TRITON_INTERPRET=1: the interpreter's fp32->bf16 cast truncates, compiled code rounds.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _dequant_4bit_kernel(
        packed_ptr,  # uint8 [ceil(n/2)]
        absmax_ptr,  # fp32 [n_blocks], or uint8 [n_blocks] when NESTED
        code_ptr,  # fp32 [16]
        absmax2_ptr,  # fp32 [ceil(n_blocks / BLOCKSIZE2)] (NESTED only)
        code2_ptr,  # fp32 [256] (NESTED only)
        offset_ptr,  # fp32 [1] (NESTED only)
        out_ptr,  # bf16 / fp16 / fp32 [n]
        n_elements,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr,
        SOFT_BF16: tl.constexpr,
    ):
        # One program = BLOCKS_PER_PROGRAM absmax blocks laid out as a [blocks, BLOCKSIZE // 2] byte tile,
        # so each scale is loaded (and double-dequantised) once per block, not once per element.
        HALF: tl.constexpr = BLOCKSIZE // 2
        pid = tl.program_id(0).to(tl.int64)  # int64: n can exceed 2**31 for embedding-sized weights
        blk = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        n_blocks = (n_elements + BLOCKSIZE - 1) // BLOCKSIZE
        blk_ok = blk < n_blocks

        byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
        q = tl.load(packed_ptr + byte, mask=byte < (n_elements + 1) // 2, other=0)
        hi = (q >> 4).to(tl.int32)  # element 2i: high nibble
        lo = (q & 0xF).to(tl.int32)  # element 2i + 1: low nibble

        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=blk_ok, other=0.0)
            scale = tl.load(code2_ptr + a8) * a2  # rounded on its own: launched with fp fusion off
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)

        v_hi = tl.load(code_ptr + hi) * scale[:, None]
        v_lo = tl.load(code_ptr + lo) * scale[:, None]
        vals = tl.interleave(v_hi, v_lo)  # [blocks, BLOCKSIZE] in element order
        elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if SOFT_BF16:
            tl.store(out_ptr + elem, _fp32_to_bf16_rtne(vals), mask=elem < n_elements)
        else:
            tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < n_elements)


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _check_args(packed, absmax, code, shape, blocksize, dtype, absmax2, code2, blocksize2, offset, out):
    """Validate once for both paths; messages name the bad value and where it comes from."""
    n = _numel(shape)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (view other quant_storage dtypes as uint8), got {packed.dtype}")
    if packed.numel() < (n + 1) // 2:
        raise ValueError(f"packed holds {packed.numel()} bytes, shape {tuple(shape)} needs {(n + 1) // 2}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype={dtype} unsupported; dequantise to one of {OUT_DTYPES} and cast")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code must be 16 fp32 values, got {code.numel()} x {code.dtype}")
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n_blocks} expected for shape "
                         f"{tuple(shape)} and blocksize {blocksize}")
    nested = absmax2 is not None
    if nested != (code2 is not None) or nested != (offset is not None) or nested != (blocksize2 is not None):
        raise ValueError("double quantisation needs all of absmax2, code2, blocksize2 and offset, or none")
    if nested:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"nested absmax must hold uint8 codes, got {absmax.dtype}")
        if blocksize2 <= 0 or blocksize2 & (blocksize2 - 1):
            raise ValueError(f"blocksize2={blocksize2} must be a power of two (bitsandbytes uses 256)")
        if absmax2.dtype != torch.float32 or absmax2.numel() != -(-n_blocks // blocksize2):
            raise ValueError(f"absmax2 must be fp32 with {-(-n_blocks // blocksize2)} entries, got "
                             f"{absmax2.numel()} x {absmax2.dtype}")
        if code2.dtype != torch.float32 or code2.numel() != 256:
            raise ValueError(f"code2 must be 256 fp32 values, got {code2.numel()} x {code2.dtype}")
        if offset.dtype != torch.float32 or offset.numel() != 1:
            raise ValueError(f"offset must be one fp32 value, got {offset.numel()} x {offset.dtype}")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be fp32 without double quantisation, got {absmax.dtype}")
    tensors = [packed, absmax, code] + ([absmax2, code2, offset] if nested else [])
    if any(t.device != packed.device for t in tensors):
        raise ValueError(f"all quantisation tensors must be on {packed.device}, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if out is not None:
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != packed.device:
            raise ValueError(f"out must be {tuple(shape)} {dtype} on {packed.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")


def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: Sequence[int],
    blocksize: int,
    dtype: torch.dtype,
    *,
    absmax2: Optional[torch.Tensor] = None,
    code2: Optional[torch.Tensor] = None,
    blocksize2: Optional[int] = None,
    offset: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch dequantisation (the CPU path and the oracle); same math and rounding as the kernel.

    Returns a contiguous ``dtype`` tensor of ``shape``; arguments as in :func:`dequantize_4bit`.
    """
    _check_args(packed, absmax, code, shape, blocksize, dtype, absmax2, code2, blocksize2, offset, out)
    n = _numel(shape)
    n_blocks = absmax.numel()
    flat = packed.reshape(-1)[: (n + 1) // 2]
    nibbles = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)
    # pad to whole blocks so scales broadcast per row of a [n_blocks, blocksize] view
    nibbles = torch.nn.functional.pad(nibbles, (0, n_blocks * blocksize - nibbles.numel()))
    if absmax2 is not None:
        idx2 = torch.arange(n_blocks, device=absmax.device) // blocksize2
        scale = code2[absmax.long()] * absmax2[idx2]  # rounded, then the add is rounded: as bitsandbytes
        scale = scale + offset.reshape(())
    else:
        scale = absmax
    vals = code[nibbles.long()].view(n_blocks, blocksize) * scale[:, None]
    result = vals.reshape(-1)[:n].to(dtype).view(tuple(shape))
    if out is None:
        return result
    return out.copy_(result)


def dequantize_4bit_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: Sequence[int],
    blocksize: int,
    dtype: torch.dtype,
    *,
    absmax2: Optional[torch.Tensor] = None,
    code2: Optional[torch.Tensor] = None,
    blocksize2: Optional[int] = None,
    offset: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``): one launch, nested or not."""
    if triton is None:
        raise RuntimeError("triton is not installed; use dequantize_4bit_reference (CPU) instead")
    _check_args(packed, absmax, code, shape, blocksize, dtype, absmax2, code2, blocksize2, offset, out)
    n = _numel(shape)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if n == 0:
        return out
    nested = absmax2 is not None
    blocks_per_program = next_power_of_2(max(1, _ELEMS_PER_PROGRAM // blocksize))
    grid = (triton.cdiv(absmax.numel(), blocks_per_program),)
    # unused pointers when not nested: pass absmax so every argument is a valid tensor
    _dequant_4bit_kernel[grid](
        packed.reshape(-1), absmax.reshape(-1), code,
        absmax2 if nested else absmax, code2 if nested else code, offset.reshape(1) if nested else code,
        out, n,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        SOFT_BF16=interpreting() and dtype == torch.bfloat16,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # bit-identity: no FMA contraction of code2 * absmax2 + offset
    )
    return out


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: Sequence[int],
    blocksize: int,
    dtype: torch.dtype,
    *,
    absmax2: Optional[torch.Tensor] = None,
    code2: Optional[torch.Tensor] = None,
    blocksize2: Optional[int] = None,
    offset: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantise a bitsandbytes 4-bit weight; bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        packed: uint8, at least ``ceil(prod(shape) / 2)`` bytes, high nibble = even element.
        absmax: fp32 ``[ceil(prod(shape) / blocksize)]``, or uint8 codes when double-quantised.
        code: fp32 ``[16]`` value table (NF4 or FP4).
        shape: the shape that was quantised (row-major).
        blocksize: elements per absmax entry (64 by default in bitsandbytes).
        dtype: output dtype, one of bf16 / fp16 / fp32.
        absmax2, code2, blocksize2, offset: double quantisation (fp32 ``[ceil(n_blocks / blocksize2)]``,
            fp32 ``[256]``, int, fp32 scalar tensor), all or none.
        out: optional contiguous ``shape`` x ``dtype`` buffer to write into (every element is written).

    Dispatch: the compiled Triton kernel for CUDA tensors, the pure-torch reference otherwise.
    """
    fn = dequantize_4bit_triton if use_triton(packed) else dequantize_4bit_reference
    return fn(packed, absmax, code, shape, blocksize, dtype, absmax2=absmax2, code2=code2,
              blocksize2=blocksize2, offset=offset, out=out)
