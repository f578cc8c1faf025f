"""Few-row 4-bit matmul ``y = x @ W^T`` straight from bitsandbytes' packed storage (decoding).

A decode step multiplies 1-16 token rows by every weight of the model. Dequantising each 4-bit weight to
bf16 first (kernels/nf4.py) writes and then re-reads 2 bytes per weight where the storage holds half a
byte, so the step is bound by that traffic. Here a program dequantises tiles of ``W`` in registers and
multiplies them with the rows of ``x`` on the tensor cores (rows padded to 16), fp32 accumulation.

Numerics: the weight values are those of :func:`velotune.kernels.nf4.dequantize_4bit` (fp32
``code[nibble] * scale``, the nested scale rounded as bitsandbytes does, one rounding to ``x.dtype``), so
the operands are exactly those of dequantise + GEMM; only the fp32 summation order differs. ``K`` is split
over programs when ``N`` alone gives too few (the partial sums are added in a fixed order: deterministic).

Storage layout: see kernels/nf4.py. This kernel takes weights whose rows are whole absmax blocks
(``in_features % blocksize == 0``), ``blocksize`` dividing ``BLOCK_K`` (256), and ``in_features`` a multiple
of ``BLOCK_K``: every Llama / Mistral / Qwen / Gemma projection. :func:`supported` says whether a weight
qualifies; callers dequantise otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import interpreting, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works
    triton = None

# Where kernels/lora.py takes this kernel for few-row products (else dequantise + GEMM, same operands).
# Off on CUDA: correct there (tests/kernels/test_nf4_matmul.py's compiled cases and the recorded decode vs HF
# passed on an H200, 2026-11-28) but slower: bench/decode.py 8B at batch 1, 14.7 tok/s with it vs 40.7
# without (batch 8: 115 vs 348), same run. Its per-element code-table gathers and byte loads are the
# suspects; it needs a faster inner loop before it is worth switching on. ON_CPU: tests run it through
# Triton's interpreter (TRITON_INTERPRET=1).
ON_CUDA = False
ON_CPU = False

BLOCK_K = 256
BLOCK_M = 16  # tensor-core tile height: rows of x beyond M are masked to zero
MAX_ROWS = BLOCK_M
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if triton is not None:
    from .nf4 import _fp32_to_bf16_rtne

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr,  # [M, K] x.dtype, row stride stride_xm
        packed_ptr,  # uint8 [N * K // 2]
        absmax_ptr,  # fp32 [N * K // BLOCKSIZE], or uint8 codes when NESTED
        code_ptr,  # fp32 [16]
        absmax2_ptr, code2_ptr, offset_ptr,  # NESTED only
        part_ptr,  # fp32 [SPLIT, M, N]
        M, N, K, stride_xm, k_per_split,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
        IEEE: tl.constexpr, SOFT_BF16: tl.constexpr,
    ):
        BPT: tl.constexpr = BLOCK_K // BLOCKSIZE  # absmax blocks per row of a tile
        HB: tl.constexpr = BLOCKSIZE // 2  # bytes per block
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        blocks_per_row = K // BLOCKSIZE
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            # [BLOCK_N, BPT] absmax blocks of this tile, then [BLOCK_N, BPT, HB] bytes
            blk = n[:, None] * blocks_per_row + (k0 // BLOCKSIZE + tl.arange(0, BPT))[None, :]
            byte = blk[:, :, None] * HB + tl.arange(0, HB)[None, None, :]
            q = tl.load(packed_ptr + byte, mask=n_ok[:, None, None], other=0)
            if NESTED:
                a8 = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0).to(tl.int32)
                a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=n_ok[:, None], other=0.0)
                scale = tl.load(code2_ptr + a8) * a2  # rounded on its own (launched without fp fusion)
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + blk, mask=n_ok[:, None], other=0.0)
            v_hi = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, :, None]
            v_lo = tl.load(code_ptr + (q & 0xF).to(tl.int32)) * scale[:, :, None]
            w = tl.reshape(tl.interleave(v_hi, v_lo), (BLOCK_N, BLOCK_K))  # element order along K
            if SOFT_BF16:
                w = _fp32_to_bf16_rtne(w)
            else:
                w = w.to(x_ptr.dtype.element_ty)
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None], other=0.0)
            if IEEE:  # fp32 compute; and under the interpreter, whose dot mishandles 16-bit floats: their
                # products are exact in fp32, so the sums are the same
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        out = part_ptr + pid_k * M * N + m[:, None] * N + n[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def wanted(x2: torch.Tensor) -> bool:
    """Whether this device's switch is on and ``x2`` has few enough rows to gain from the kernel."""
    on = ON_CUDA if x2.is_cuda else (ON_CPU and interpreting())
    return on and x2.dim() == 2 and x2.shape[0] <= MAX_ROWS


def supported(x2: torch.Tensor, weight) -> bool:
    """Whether :func:`nf4_matmul` takes ``x2 [M, K]`` times this NF4Weight (else: dequantise + GEMM)."""
    if triton is None or not triton_available():
        return False
    if not (x2.is_cuda or interpreting()) or x2.dim() != 2 or not 1 <= x2.shape[0] <= MAX_ROWS:
        return False
    if not hasattr(weight, "packed") or x2.dtype not in _DTYPES or weight.transposed or weight.device != x2.device:
        return False
    n, k = weight.shape
    return (k == x2.shape[1] and k % BLOCK_K == 0 and BLOCK_K % weight.blocksize == 0
            and (weight.state2 is None or weight.state2.blocksize & (weight.state2.blocksize - 1) == 0))


def _split_k(n_tiles: int, k: int, device: torch.device) -> int:
    """K splits so the grid has about two programs per SM (1 when N already gives that)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    k_tiles = k // BLOCK_K
    return max(1, min(k_tiles, -(-2 * sms // n_tiles)))


def nf4_matmul(x2: torch.Tensor, weight, block_n: Optional[int] = None) -> torch.Tensor:
    """``x2 @ weight.dequantize(x2.dtype).T`` for ``x2 [M <= 16, K]`` and a 4-bit ``NF4Weight [N, K]``,
    without materialising the weight; ``[M, N]`` in ``x2.dtype``. Needs :func:`supported`."""
    if not supported(x2, weight):
        raise ValueError(f"nf4_matmul: x {tuple(x2.shape)} {x2.dtype} on {x2.device} with a 4-bit weight "
                         f"{weight.shape} (blocksize {weight.blocksize}, transposed={weight.transposed}) is not "
                         "supported here; dequantise and use a GEMM (see nf4_matmul.supported)")
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    block_n = block_n or 32  # 32 x 256 fp32 tiles: 64 registers a thread for the dequantised tile at 4 warps
    n_tiles = triton.cdiv(n, block_n)
    split = _split_k(n_tiles, k, x2.device)
    k_per_split = triton.cdiv(k // BLOCK_K, split) * BLOCK_K
    split = triton.cdiv(k, k_per_split)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    s2 = weight.state2
    nested = s2 is not None
    _nf4_matmul_kernel[(n_tiles, split)](
        x2, weight.packed, weight.absmax, weight.code,
        s2.absmax if nested else weight.absmax, s2.code if nested else weight.code,
        s2.offset.reshape(1) if nested else weight.code,
        part, m, n, k, x2.stride(0), k_per_split,
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=s2.blocksize if nested else 1, NESTED=nested,
        BLOCK_N=block_n, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
        IEEE=x2.dtype == torch.float32 or interpreting(), SOFT_BF16=interpreting() and x2.dtype == torch.bfloat16,
        num_warps=4, enable_fp_fusion=False,
    )
    out = part[0] if split == 1 else part.sum(0)
    return out.to(x2.dtype)


def nf4_matmul_reference(x2: torch.Tensor, weight) -> torch.Tensor:
    """The oracle: dequantise to ``x2.dtype`` (bitsandbytes' values), then a GEMM with fp32 accumulation."""
    w = weight.dequantize(x2.dtype)
    return (x2.float() @ w.float().t()).to(x2.dtype)
