"""NF4/FP4 dequantisation: bit-identity with bitsandbytes, reading Params4bit storage, clear errors.

Oracles (bitsandbytes 0.50.2):
* ``bnb_portable``: bitsandbytes' own portable backend (``backends/default``: flat blocks over the flattened
  weight, fp32 ``code * absmax`` then one cast). Its CUDA kernel has the same semantics.
* ``F.dequantize_4bit`` on CPU: its native AVX512 kernel indexes absmax per *row* (``n / blocksize`` blocks
  a row), so it disagrees with its own quantiser whenever ``in_features`` is even and not a multiple of
  ``blocksize`` (e.g. 48x496 at blocksize 64: max error 2.2 vs 0.48 for the portable path). We compare
  with it only where it is self-consistent (``in_features`` odd, which takes its portable fallback, or a
  multiple of ``blocksize``), and with ``bnb_portable`` everywhere.
bitsandbytes torch.compiles its portable path per shape (3-6 s each here); the oracle runs it eagerly.
"""
from __future__ import annotations

import zlib

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from velotune.kernels import nf4 as K  # noqa: E402
from velotune.quant import NF4Weight  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out, in): odd sizes where blocks cross rows (123x507), rows shorter than a block (7x37, 3x5),
# one element, even rows not a multiple of the blocksize (48x496, 40x96), and exact multiples.
SHAPES = [(123, 507), (7, 37), (3, 5), (1, 1), (48, 496), (40, 96), (64, 64), (33, 2048)]


def _seed(*case) -> None:
    torch.manual_seed(zlib.crc32(repr(case).encode()))  # fresh, reproducible inputs per case


def _quantize(shape, blocksize, nested, dtype, quant_type="nf4"):
    w = torch.randn(shape, dtype=dtype) * 3
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _bnb_portable(packed, qs, dtype=None):
    absmax = qs.absmax
    if qs.nested:  # as F.dequantize_4bit does it
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
    with torch.compiler.set_stance("force_eager"):
        return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, qs.code, qs.blocksize,
                                        qs.shape, dtype or qs.dtype)


def _bnb_native_ok(shape, blocksize) -> bool:
    return shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


def _bnb_dequant(packed, qs):
    with torch.compiler.set_stance("force_eager"):
        return F.dequantize_4bit(packed, qs)


def _kwargs(qs):
    if not qs.nested:
        return {}
    return dict(absmax2=qs.state2.absmax, code2=qs.state2.code, blocksize2=qs.state2.blocksize, offset=qs.offset)


def _linear4bit(out_f, in_f, nested=True, quant_type="nf4", storage=torch.uint8, device="cpu"):
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compress_statistics=nested, quant_type=quant_type,
                          quant_storage=storage)
    m.support_avx512bf16_for_cpu = False  # never let bnb repack for its CPU inference path
    return m.to(device)


# ---------------------------------------------------------------------------------------------------
# bit-identity
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reference_bit_identical_to_bnb(shape, blocksize, nested, dtype):
    _seed(shape, blocksize, nested, dtype)
    packed, qs = _quantize(shape, blocksize, nested, dtype)
    got = K.dequantize_4bit_reference(packed, qs.absmax, qs.code, qs.shape, blocksize, dtype, **_kwargs(qs))
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, _bnb_portable(packed, qs))
    if _bnb_native_ok(shape, blocksize):
        assert torch.equal(got, _bnb_dequant(packed, qs))
    # the dispatcher takes the reference for CPU tensors
    assert torch.equal(K.dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, blocksize, dtype, **_kwargs(qs)), got)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("shape", [(123, 507), (40, 128), (3, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp4_reference_bit_identical_to_bnb(shape, nested):
    _seed(shape, nested)
    packed, qs = _quantize(shape, 64, nested, torch.bfloat16, quant_type="fp4")
    got = K.dequantize_4bit_reference(packed, qs.absmax, qs.code, qs.shape, 64, torch.bfloat16, **_kwargs(qs))
    assert torch.equal(got, _bnb_portable(packed, qs))
    if _bnb_native_ok(shape, 64):
        assert torch.equal(got, _bnb_dequant(packed, qs))


# ~1 ms per program under the interpreter: these shapes launch 1-16 programs each
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(123, 507), (7, 37), (3, 5), (48, 496)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_kernel_bit_identical_to_bnb(shape, blocksize, nested, dtype):
    if K.triton is None:
        pytest.skip("triton is not installed")
    _seed(shape, blocksize, nested, dtype)
    packed, qs = _quantize(shape, blocksize, nested, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: every element must be written
    got = K.dequantize_4bit_triton(packed, qs.absmax, qs.code, qs.shape, blocksize, dtype, out=out,
                                   **_kwargs(qs))
    assert got is out
    assert torch.equal(got, _bnb_portable(packed, qs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_kernel_blocksize_extremes(quant_type):
    if K.triton is None:
        pytest.skip("triton is not installed")
    for blocksize in (32, 4096):
        _seed(quant_type, blocksize)
        packed, qs = _quantize((5, 1001), blocksize, True, torch.bfloat16, quant_type)
        got = K.dequantize_4bit_triton(packed, qs.absmax, qs.code, qs.shape, blocksize, torch.bfloat16,
                                       **_kwargs(qs))
        assert torch.equal(got, _bnb_portable(packed, qs))


def test_reference_writes_every_element_of_out():
    packed, qs = _quantize((37, 123), 64, True, torch.float16)
    out = torch.full((37, 123), float("nan"), dtype=torch.float16)
    got = K.dequantize_4bit_reference(packed, qs.absmax, qs.code, qs.shape, 64, torch.float16, out=out,
                                      **_kwargs(qs))
    assert got is out and torch.equal(out, _bnb_portable(packed, qs))


# ---------------------------------------------------------------------------------------------------
# reading bitsandbytes storage
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("shape", [(40, 128), (123, 507), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_from_linear4bit(shape, nested, quant_type):
    _seed(shape, nested, quant_type)
    m = _linear4bit(*shape, nested=nested, quant_type=quant_type)
    w = NF4Weight.from_bnb(m)
    qs = m.weight.quant_state
    assert w.weight_shape == shape and not w.transposed and w.nested == nested and w.quant_type == quant_type
    assert w.packed.data_ptr() == m.weight.data_ptr()  # a view, not a copy
    got = w.dequantize()
    assert torch.equal(got, _bnb_portable(m.weight.data, qs))
    if _bnb_native_ok(shape, qs.blocksize):
        assert torch.equal(got, _bnb_dequant(m.weight.data, qs))
    assert NF4Weight.from_bnb(m.weight).shape == w.shape  # the Params4bit alone works too
    # other output dtypes: bnb's values computed in fp32, rounded once
    assert torch.equal(w.dequantize(torch.bfloat16), _bnb_portable(m.weight.data, qs, torch.bfloat16))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=str)
def test_quant_storage_dtypes(storage):
    m = _linear4bit(64, 128, storage=storage)
    assert m.weight.dtype == storage
    w = NF4Weight.from_bnb(m)
    assert w.packed.dtype == torch.uint8
    assert torch.equal(w.dequantize(), _bnb_dequant(m.weight.data, m.weight.quant_state))


def test_transposed_storage():
    """A weight quantised from its [in, out] transpose (bnb still accepts it, with a DeprecationWarning)."""
    out_f, in_f = 40, 128
    m = _linear4bit(out_f, in_f)
    wt = torch.randn(in_f, out_f)
    m.weight = bnb.nn.Params4bit(wt, requires_grad=False, quant_type="nf4", module=m).to("cpu")
    qs = m.weight.quant_state
    assert tuple(qs.shape) == (in_f, out_f)
    w = NF4Weight.from_bnb(m)
    assert w.transposed and w.weight_shape == (out_f, in_f)
    got = w.dequantize()
    assert tuple(got.shape) == (out_f, in_f)
    assert torch.equal(got, _bnb_dequant(m.weight.data, qs).t())  # what bnb's matmul_4bit uses


def test_packed_as_row_vector():
    """[1, N] packed data (the transposed form bnb's BC shim still accepts) reads the same bytes."""
    m = _linear4bit(40, 128)
    expected = NF4Weight.from_bnb(m).dequantize()
    m.weight.data = m.weight.data.t()
    assert torch.equal(NF4Weight.from_bnb(m).dequantize(), expected)


def test_cpu_repack_is_rejected():
    m = _linear4bit(64, 128)
    m.weight.quant_state.packing_format_for_cpu = True  # what bnb sets after repacking
    with pytest.raises(ValueError, match="support_avx512bf16_for_cpu"):
        NF4Weight.from_bnb(m)


def test_inference_call_with_repack_disabled_keeps_layout():
    """With support_avx512bf16_for_cpu=False an eval/no-grad forward (a generate) leaves storage alone."""
    m = _linear4bit(64, 128).eval()
    before = NF4Weight.from_bnb(m).dequantize()
    with torch.no_grad():
        m(torch.randn(3, 128))
    assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(NF4Weight.from_bnb(m).dequantize(), before)


def test_undone_cpu_repack_is_rejected():
    """bnb's repack inverse leaves a non-nested absmax as bf16 [in/blocksize, out]: not readable."""
    m = _linear4bit(64, 128, nested=False)
    w = m.weight
    w.data, w.quant_state = F._convert_weight_packed_for_cpu(w.data, w.quant_state)
    w.data, w.quant_state = F._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    assert not w.quant_state.packing_format_for_cpu and w.quant_state.absmax.dim() == 2
    with pytest.raises(ValueError, match="support_avx512bf16_for_cpu"):
        NF4Weight.from_bnb(m)


def test_real_cpu_repack_is_rejected():
    if not F.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    m = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4").to("cpu").eval()
    with torch.no_grad():
        m(torch.randn(2, 128))  # the inference call that repacks
    assert m.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="repacked"):
        NF4Weight.from_bnb(m)


def test_errors_name_the_problem():
    m = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4")  # never moved: not quantised
    with pytest.raises(ValueError, match="not quantised"):
        NF4Weight.from_bnb(m)
    with pytest.raises(TypeError, match="Linear4bit"):
        NF4Weight.from_bnb(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Linear4bit"):
        NF4Weight.from_bnb(torch.zeros(3))
    m = _linear4bit(64, 128, nested=False)
    m.weight.quant_state.absmax = m.weight.quant_state.absmax.half()
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight.from_bnb(m)
    m = _linear4bit(64, 128)
    m.out_features = 32
    with pytest.raises(ValueError, match="out_features"):
        NF4Weight.from_bnb(m)
    m = _linear4bit(64, 128)
    m.weight.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="int4"):
        NF4Weight.from_bnb(m)


def test_kernel_argument_errors():
    packed, qs = _quantize((8, 64), 64, True, torch.float32)
    with pytest.raises(ValueError, match="absmax2"):
        K.dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, 64, torch.float32, absmax2=qs.state2.absmax)
    with pytest.raises(ValueError, match="bytes"):
        K.dequantize_4bit(packed[:10], qs.absmax, qs.code, qs.shape, 64, torch.float32, **_kwargs(qs))
    with pytest.raises(ValueError, match="dtype"):
        K.dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, 64, torch.float64, **_kwargs(qs))
    with pytest.raises(ValueError, match="out must be"):
        K.dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, 64, torch.float32,
                          out=torch.empty(8, 63), **_kwargs(qs))


# ---------------------------------------------------------------------------------------------------
# GPU (the lead runs `pytest -m gpu` on an H100): compiled kernel vs bitsandbytes' CUDA kernel
# ---------------------------------------------------------------------------------------------------

def _cpu_state(qs):
    s2 = qs.state2
    state2 = None
    if qs.nested:
        state2 = F.QuantState(absmax=s2.absmax.cpu(), code=s2.code.cpu(), blocksize=s2.blocksize, dtype=s2.dtype)
    return F.QuantState(absmax=qs.absmax.cpu(), shape=qs.shape, code=qs.code.cpu(), blocksize=qs.blocksize,
                        quant_type=qs.quant_type, dtype=qs.dtype,
                        offset=qs.offset.cpu() if qs.nested else None, state2=state2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (123, 507)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_kernel_bit_identical_to_bnb_cuda(shape, blocksize, nested, dtype):
    _seed(shape, blocksize, nested, dtype)
    w = torch.randn(shape, dtype=dtype, device="cuda")
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    expected = F.dequantize_4bit(packed, qs)
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    got = K.dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, blocksize, dtype, out=out, **_kwargs(qs))
    torch.cuda.synchronize()
    assert torch.equal(got, expected)
    if shape[0] * shape[1] <= 1 << 22:  # the eager CPU oracle takes ~1 s per 58M elements
        assert torch.equal(got.cpu(), _bnb_portable(packed.cpu(), _cpu_state(qs)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (123, 507)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_fp4_bit_identical_to_bnb_cuda(shape):
    """bnb's CUDA FP4 path computes lut[q & 7] * sign: equal to its code table (-0.0 == 0.0)."""
    _seed("fp4", shape)
    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="fp4")
    got = K.dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, 64, torch.bfloat16, **_kwargs(qs))
    assert torch.equal(got, F.dequantize_4bit(packed, qs))


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_gpu_from_linear4bit(nested):
    m = bnb.nn.Linear4bit(4096, 14336, bias=False, compress_statistics=nested, quant_type="nf4")
    m.weight.data = m.weight.data.to(torch.bfloat16)
    m = m.to("cuda")
    w = NF4Weight.from_bnb(m)
    assert w.device.type == "cuda" and w.weight_shape == (14336, 4096)
    assert torch.equal(w.dequantize(), F.dequantize_4bit(m.weight.data, m.weight.quant_state))

