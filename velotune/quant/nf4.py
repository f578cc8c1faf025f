"""Read a bitsandbytes 4-bit weight (``bnb.nn.Linear4bit`` / ``Params4bit``) into a frozen dataclass.

We read bitsandbytes' storage as data and never call its matmul: the fast path dequantises with
``velotune.kernels.nf4`` (bit-identical to ``bitsandbytes.functional.dequantize_4bit``).

Layouts accepted (bitsandbytes 0.48-0.50):

* packed bytes as ``[(n+1)//2, 1]`` (what ``quantize_4bit`` returns), its transpose ``[1, (n+1)//2]`` or
  flat; any ``quant_storage`` dtype (uint8, or bf16/fp16/fp32 for FSDP) is viewed as uint8.
* absmax fp32, or double-quantised (``quant_state.nested``): uint8 codes + ``state2`` (fp32 absmax2,
  256-entry code2, blocksize2) + fp32 ``offset``.
* ``quant_state.shape == (out, in)`` (normal), or ``(in, out)`` when the weight was quantised from its
  transpose (bitsandbytes still accepts that with a DeprecationWarning): ``transposed=True``.
* quant_type ``"nf4"`` and ``"fp4"``: the same layout with a different 16-entry table, which the kernel
  reads from ``quant_state.code``, so both are supported.

Rejected with an error that names the fix: the AVX512-BF16 CPU repack (``packing_format_for_cpu``),
weights not yet quantised, meta tensors, and anything whose sizes do not add up.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..kernels.nf4 import BLOCKSIZES, OUT_DTYPES, dequantize_4bit

QUANT_TYPES = ("nf4", "fp4")


@dataclasses.dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class NestedAbsmax:
    """Second-level state of double quantisation: ``scale[b] = code[q[b]] * absmax[b // blocksize] + offset``.

    Attributes:
        absmax: fp32 ``[ceil(n_blocks / blocksize)]``.
        code: fp32 ``[256]`` (bitsandbytes' dynamic 8-bit map).
        blocksize: codes per ``absmax`` entry (256 in bitsandbytes).
        offset: fp32 0-dim tensor, the mean that was subtracted before quantising the scales.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    offset: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class NF4Weight:
    """A frozen 4-bit weight in bitsandbytes' storage, read without copying.

    Attributes:
        packed: uint8 ``[ceil(numel/2)]``; byte ``i`` holds element ``2i`` (high nibble) and ``2i+1``.
        absmax: fp32 ``[n_blocks]``, or uint8 ``[n_blocks]`` codes when ``state2`` is set.
        code: fp32 ``[16]`` value table (NF4 quantiles, or FP4 values when ``quant_type == "fp4"``).
        shape: the shape that was quantised: ``(out, in)``, or ``(in, out)`` when ``transposed``.
        blocksize: elements per absmax entry, over the flattened ``shape``.
        dtype: the dtype bitsandbytes dequantises to (the original weight's dtype).
        quant_type: ``"nf4"`` or ``"fp4"``.
        state2: double-quantisation state, or None.
        transposed: True when ``shape`` is ``(in, out)``.
        resident: the dequantised weight while held (:meth:`hold` / :meth:`release`), else None.
        bnb_state: bitsandbytes' own ``QuantState`` when read from a bitsandbytes module (its kernels take it).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    quant_type: str = "nf4"
    state2: Optional[NestedAbsmax] = None
    transposed: bool = False
    # the weight dequantised once and kept (hold / release), which the fused kernels read instead of
    # dequantising again (models/graphs.py: "auto" with memory left); None normally
    resident: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)
    bnb_state: Optional[object] = dataclasses.field(default=None, repr=False, compare=False)

    def hold(self, dtype: torch.dtype) -> None:
        """Keep :meth:`dequantize` ``(dtype)`` in ``resident`` (the same values, computed once)."""
        if self.resident is None or self.resident.dtype != dtype:
            object.__setattr__(self, "resident", None)  # free the old copy first
            object.__setattr__(self, "resident", self.dequantize(dtype))

    def release(self) -> None:
        object.__setattr__(self, "resident", None)

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Logical ``(out_features, in_features)``, as ``nn.Linear.weight``."""
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight as ``[out_features, in_features]`` (a transposed view when ``transposed``).

        ``dtype`` defaults to ``self.dtype`` (what bitsandbytes produces, bit for bit); ``out`` is an
        optional contiguous buffer of the *stored* ``shape``. Triton kernel on CUDA, torch reference on CPU.
        """
        s2 = self.state2
        w = dequantize_4bit(
            self.packed, self.absmax, self.code, self.shape, self.blocksize, dtype or self.dtype,
            absmax2=s2.absmax if s2 else None, code2=s2.code if s2 else None,
            blocksize2=s2.blocksize if s2 else None, offset=s2.offset if s2 else None, out=out,
        )
        return w.t() if self.transposed else w

    @classmethod
    def from_bnb(cls, obj) -> "NF4Weight":
        """Read a quantised ``bnb.nn.Linear4bit`` (or its ``Params4bit`` weight); no copies, no sync.

        Cheap, but build it once per module and keep it: it holds views of the module's tensors, which
        stay valid as long as the module is not re-quantised or moved (then read it again).
        A bare ``Params4bit`` without ``.module`` is taken as ``(out, in)`` = ``quant_state.shape``.
        """
        weight, module = _split_module(obj)
        qs = getattr(weight, "quant_state", None)
        if qs is None and module is not None:
            qs = getattr(module, "quant_state", None)  # bnb keeps a copy there (FSDP loses the param's)
        if qs is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError("the 4-bit weight is not quantised yet (no quant_state): move the module to its "
                             "device first (e.g. `.to('cuda')`), which is when bitsandbytes quantises")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "this weight was repacked by bitsandbytes for its AVX512-BF16 CPU inference path "
                "(quant_state.packing_format_for_cpu=True): the nibble order and absmax layout are no longer "
                "bitsandbytes' storage. Set `module.support_avx512bf16_for_cpu = False` on every Linear4bit "
                "before any no-grad forward on CPU, and reload the weights (bitsandbytes' own undo, run by "
                "Params4bit.cuda(), leaves a non-nested absmax transposed)")
        if weight.device.type == "meta":
            raise ValueError("the 4-bit weight is on the meta device: load it before reading it")
        shape = _read_shape(qs)
        n = shape[0] * shape[1]
        packed = _read_packed(weight, n)
        _check_state(qs, n)
        state2 = None
        if qs.nested:
            s2 = qs.state2
            state2 = NestedAbsmax(absmax=s2.absmax, code=s2.code, blocksize=int(s2.blocksize),
                                  offset=qs.offset.reshape(()))
        nw = cls(packed=packed, absmax=qs.absmax.reshape(-1), code=qs.code.reshape(-1), shape=shape,
                 blocksize=int(qs.blocksize), dtype=qs.dtype, quant_type=qs.quant_type, state2=state2,
                 transposed=_is_transposed(shape, module), bnb_state=qs)
        _check_devices(nw)
        return nw


def _split_module(obj):
    """(weight, module or None) from a Linear4bit-like module or a Params4bit."""
    if isinstance(obj, torch.nn.Module):
        weight = getattr(obj, "weight", None)
        if weight is None or not (hasattr(weight, "quant_state") or hasattr(obj, "quant_state")):
            raise TypeError(f"{type(obj).__name__} is not a bitsandbytes 4-bit module (no weight.quant_state); "
                            "pass a bnb.nn.Linear4bit or its Params4bit weight")
        return weight, obj
    if isinstance(obj, torch.Tensor) and hasattr(obj, "quant_state"):
        return obj, getattr(obj, "module", None)
    raise TypeError(f"expected a bnb.nn.Linear4bit or a Params4bit, got {type(obj).__name__}")


def _read_shape(qs) -> tuple[int, int]:
    shape = tuple(int(s) for s in (qs.shape or ()))
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape={shape}: only 2-D linear weights are supported")
    return shape


def _read_packed(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes as a flat uint8 view, whatever quant_storage dtype and [N,1]/[1,N] orientation."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    data = data.detach()
    if not data.is_contiguous():
        raise ValueError(f"packed 4-bit data must be contiguous (shape {tuple(data.shape)}, "
                         f"strides {data.stride()}): bitsandbytes never stores it otherwise")
    flat = data.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)  # quant_storage bf16/fp16/fp32 (FSDP): same bytes
    if flat.numel() < (n + 1) // 2:
        raise ValueError(f"packed weight has {flat.numel()} bytes but quant_state.shape needs {(n + 1) // 2}")
    return flat


def _check_state(qs, n: int) -> None:
    if qs.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={qs.quant_type!r} is not supported; expected one of {QUANT_TYPES}")
    if int(qs.blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize={qs.blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    if qs.dtype not in OUT_DTYPES:
        raise ValueError(f"quant_state.dtype={qs.dtype} is not one of {OUT_DTYPES}")
    if qs.code is None or qs.code.dtype != torch.float32 or qs.code.numel() != 16:
        raise ValueError("quant_state.code must be the 16-entry fp32 table")
    if qs.absmax.dim() != 1:
        raise ValueError(
            f"quant_state.absmax has shape {tuple(qs.absmax.shape)} where bitsandbytes stores a 1-D tensor: "
            "that is the layout its AVX512-BF16 CPU repack leaves (also after undoing it for a non-nested "
            "weight: absmax stays bf16 [in/blocksize, out]). Set `support_avx512bf16_for_cpu = False` on "
            "every Linear4bit before any no-grad CPU forward, and reload the weights")
    n_blocks = -(-n // int(qs.blocksize))
    if qs.absmax.numel() != n_blocks:
        raise ValueError(f"quant_state.absmax has {qs.absmax.numel()} entries, expected {n_blocks}: "
                         "the layout is not bitsandbytes' flat blockwise one")
    if qs.nested:
        s2 = qs.state2
        if qs.absmax.dtype != torch.uint8 or s2 is None or qs.offset is None:
            raise ValueError(f"nested quant_state needs uint8 absmax codes, state2 and offset; got absmax "
                             f"{qs.absmax.dtype}, state2={s2 is not None}, offset={qs.offset is not None}")
        if s2.absmax.dtype != torch.float32 or s2.code is None or s2.code.numel() != 256:
            raise ValueError("quant_state.state2 must hold fp32 absmax and the 256-entry fp32 code")
        if int(s2.blocksize) <= 0 or int(s2.blocksize) & (int(s2.blocksize) - 1):
            raise ValueError(f"state2.blocksize={s2.blocksize} must be a power of two (bitsandbytes uses 256)")
    elif qs.absmax.dtype != torch.float32:
        raise ValueError(f"quant_state.absmax is {qs.absmax.dtype}; fp32 expected (convert it with "
                         "`quant_state.absmax = quant_state.absmax.float()`)")


def _is_transposed(shape: tuple[int, int], module) -> bool:
    if module is None or not hasattr(module, "in_features"):
        return False
    out_f, in_f = int(module.out_features), int(module.in_features)
    if shape == (out_f, in_f):
        return False  # also the ambiguous square case, as bitsandbytes treats it
    if shape == (in_f, out_f):
        return True
    raise ValueError(f"quant_state.shape={shape} matches neither (out_features, in_features)=({out_f}, {in_f}) "
                     "nor its transpose")


def _check_devices(w: NF4Weight) -> None:
    tensors = [w.packed, w.absmax, w.code]
    if w.state2 is not None:
        tensors += [w.state2.absmax, w.state2.code, w.state2.offset]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"4-bit weight tensors are on several devices {sorted(map(str, devices))}: move the "
                         "module with `.to(device)` so bitsandbytes moves its quant_state too")
