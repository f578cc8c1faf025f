"""Few-row 4-bit matmul (kernels/nf4_matmul.py) through Triton's interpreter against its oracle:
dequantise with bitsandbytes' values, then a GEMM accumulated in fp32.

Tolerances: the operands are identical (the weight tile is dequantised with the same math and rounding as
kernels/nf4.py), only the fp32 summation order differs, so the results agree to fp32 rounding before the
final cast: fp32 rtol 1e-5; bf16 / fp16 within one unit in the last place of the output dtype.
"""
from __future__ import annotations

import zlib

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from velotune.kernels import nf4_matmul as K  # noqa: E402
from velotune.quant import NF4Weight  # noqa: E402

pytestmark = pytest.mark.skipif(K.triton is None, reason="triton not installed")


def _weight(n, k, blocksize, nested, quant_type="nf4", seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    w[0, :7] = 0.0  # a zero run and an outlier row
    if n > 1:
        w[1] *= 40
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return NF4Weight(packed=packed.reshape(-1), absmax=qs.absmax.reshape(-1), code=qs.code, shape=(n, k),
                     blocksize=blocksize, dtype=torch.float32, quant_type=quant_type,
                     state2=None if not nested else _state2(qs))


def _state2(qs):
    from velotune.quant.nf4 import NestedAbsmax

    return NestedAbsmax(absmax=qs.state2.absmax, code=qs.state2.code, blocksize=int(qs.state2.blocksize),
                        offset=qs.offset.reshape(()))


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of ``t`` (its dtype)."""
    mant = {torch.bfloat16: 8, torch.float16: 11}[t.dtype]
    e = torch.floor(torch.log2(t.float().abs().clamp_min(torch.finfo(t.dtype).tiny)))
    return torch.pow(2.0, e - (mant - 1))


# (M, N, K): one row, a batch of 8, 16 rows (the limit), N below one tile and not a multiple of it, K
# from one tile up to several splits
CASES = [(1, 17, 256), (3, 96, 512), (8, 300, 768), (16, 40, 256), (5, 1, 1024)]


@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("blocksize,nested", [(64, True), (64, False), (128, True), (256, False), (32, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_dequantise_then_gemm(m, n, k, blocksize, nested, dtype):
    torch.manual_seed(zlib.crc32(repr((m, n, k, blocksize, nested, str(dtype))).encode()))
    w = _weight(n, k, blocksize, nested, seed=n + k)
    x = (torch.randn(m, k) * 2).to(dtype)
    assert K.supported(x, w)
    got = K.nf4_matmul(x, w, block_n=32)
    want = K.nf4_matmul_reference(x, w)
    assert got.dtype == dtype and got.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        assert ((got.float() - want.float()).abs() <= _ulp(want) + 1e-6).all()


def test_fp4_and_split_k_and_strided_rows():
    """FP4 tables, K split over programs (partial sums added in order), x a row-strided view."""
    w = _weight(64, 2048, 64, True, quant_type="fp4", seed=3)
    big = torch.randn(4, 4096).to(torch.bfloat16)
    x = big[:, 1024:3072]  # row stride 4096
    got = K.nf4_matmul(x, w, block_n=32)
    want = K.nf4_matmul_reference(x.contiguous(), w)
    assert ((got.float() - want.float()).abs() <= _ulp(want) + 1e-6).all()


def test_not_supported_says_why():
    w = _weight(16, 320, 64, True)  # K not a multiple of 256
    x = torch.randn(1, 320)
    assert not K.supported(x, w)
    with pytest.raises(ValueError, match="not supported here; dequantise"):
        K.nf4_matmul(x, w)
    w = _weight(16, 256, 64, True)
    assert not K.supported(torch.randn(17, 256), w)  # more rows than one tile
    assert not K.supported(torch.randn(2, 256).to(torch.int32), w)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (8, 1024, 4096), (1, 4096, 14336), (16, 28672, 4096),
                                   (3, 14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compiled_matches_dequantise_then_gemm(m, n, k, dtype):
    """The compiled kernel at Llama-8B widths (q / k,v / down / 70B gate / up), double-quantised NF4: the
    oracle's operands, fp32 sums (bf16: one ulp of the output plus fp32 summation-order error, below;
    fp32: the kernel's ieee dot, rtol 1e-5)."""
    w = _weight(n, k, 64, True, seed=n + k)
    w = NF4Weight(packed=w.packed.cuda(), absmax=w.absmax.cuda(), code=w.code.cuda(), shape=w.shape,
                  blocksize=64, dtype=torch.float32, state2=_cuda_state2(w.state2))
    x = torch.randn(m, k, device="cuda").to(dtype)
    got = K.nf4_matmul(x, w)
    want = K.nf4_matmul_reference(x, w)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        # K up to 14336: where the sum cancels, the fp32 sums' orders (split-K tiles vs cuBLAS) differ by more
        # than one bf16 ulp of a small output; allowed: one ulp + 2^-16 of the sum of |x_i w_i| (a wrong nibble
        # or scale moves an output by ~1/K of that sum or more: 7e-5 at K=14336)
        scale = x.float().abs() @ w.dequantize(torch.float32).abs().t()
        assert ((got.float() - want.float()).abs() <= _ulp(want) + scale * 2.0**-16).all()


def _cuda_state2(s2):
    from velotune.quant.nf4 import NestedAbsmax

    return NestedAbsmax(absmax=s2.absmax.cuda(), code=s2.code.cuda(), blocksize=s2.blocksize, offset=s2.offset.cuda())
