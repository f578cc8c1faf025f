"""GGUF tensor quantizers in torch, byte-identical to ggml's reference quantizer.

Algorithms ported from ggml (MIT licence, Copyright (c) 2023-2024 The ggml authors):
``quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0,q2_K,q3_K,q4_K,q5_K,q6_K}_ref``, ``make_qkx2_quants``,
``make_qx_quants`` and ``make_q3_quants`` of ``ggml/src/ggml-quants.c``. This is our own vectorised
port: every block of a tensor is processed at once (rows x blocks), on whatever device the tensor is
on; on CPU in chunks of ``_CPU_CHUNK`` weights so memory stays bounded.

Why the code looks the way it does (each point cost blocks when it was missed):
- sqrt goes through float64: torch's CPU float32 sqrt is not correctly rounded.
- All maths is float32, one rounding per C operation, in C's evaluation order (``w*x*l`` is
  ``(w*x)*l``). Sums over a group are strictly sequential (``_seqsum``); torch/numpy reductions
  are pairwise and do not round the same way.
- ``nearest_int`` is ggml's bit trick (``_nearest_int``): round-half-even for |v| < 2**22, and
  the same garbage as C outside that range.
- Q8_0 uses C ``roundf`` (half away from zero); float -> int8/uint8 casts truncate toward zero.
- f32 -> f16 rounds to nearest-even (torch ``.half()`` does; so do ggml's F16C and software paths).
- Divisions never use a Python scalar operand: torch computes ``scalar / t`` as
  ``t.reciprocal() * scalar`` and CUDA computes ``t / cpu_scalar`` as ``t * (1/scalar)``; both
  differ from C's division in the last bit. ``_div`` divides by/into a 0-d tensor on the device.
- ``make_qkx2_quants``' search loop uses the CURRENT (possibly already improved) min in its
  iscale; Q2_K/Q4_K/Q5_K/Q3_K/Q6_K keep the search's L for a group whose ``d*scale`` is 0.
- Max/min searches keep C's tie rule (first occurrence; ``argmax`` / ``argmin`` do the same) and
  the sign of a zero result.

Public: :func:`quantize`, :func:`row_nbytes`, :data:`QK_K`, :data:`SUPPORTED`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256
_GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 to an integer, half to even
_NI_SAFE = 4194303.0  # 2**22 - 1: nearest_int's exact range
# CPU chunk: 512K weights. ~10 float32 buffers of this size stay live (~20 MiB), and the per-group
# vectors (512K/16 = 32K) stay at torch's 32K-element grain, so the ~1-3K small ops of a K-quant
# run on one thread while full-size ops use all: measured 1.3-2x faster than 256K or 1M chunks.
_CPU_CHUNK = 1 << 19
# GPU chunk: big enough that the ~3K small kernel launches of a K-quant amortise (16M weights).
_CUDA_CHUNK = 1 << 24


def _f32(v: float) -> float:
    """A Python float holding exactly the float32 value of ``v``."""
    return float(np.float32(v))


def _c(v: float, like: torch.Tensor) -> torch.Tensor:
    """0-d float32 tensor on ``like``'s device (keeps torch from turning a division into a multiply).

    torch.full, not torch.tensor: on CUDA it is a fill kernel, not a blocking host-to-device copy.
    """
    return torch.full((), _f32(v), dtype=torch.float32, device=like.device)


def _div(a, b) -> torch.Tensor:
    """IEEE float32 ``a / b`` with either side a Python number or a tensor."""
    ref = a if isinstance(a, torch.Tensor) else b
    a = a if isinstance(a, torch.Tensor) else _c(a, ref)
    b = b if isinstance(b, torch.Tensor) else _c(b, ref)
    return torch.div(a, b)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: float32 -> int32 via the 1.5*2**23 trick (round half to even)."""
    return ((v + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), exact in float32: trunc, then step away if |frac| >= .5."""
    t = torch.trunc(v)
    return torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sum over dim 0 of [n, G], as C's ``float s = 0; s += t[i]``."""
    acc = t[0] + 0.0  # 0 + t[0]: turns -0.0 into +0.0 as C's does
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _f16(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even)."""
    return v.to(torch.float16)


def _f16_bytes(v16: torch.Tensor) -> torch.Tensor:
    """[G] float16 -> [G, 2] uint8, little endian."""
    return v16.contiguous().view(torch.int16).view(torch.uint8).reshape(-1, 2)


def _first_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, signed value of the first element reaching it); ``max`` is +0.0 when amax is 0."""
    ax = x.abs()
    idx = ax.argmax(dim=dim, keepdim=True)
    amax = ax.gather(dim, idx).squeeze(dim)
    mx = x.gather(dim, idx).squeeze(dim)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def _first_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.gather(dim, x.argmin(dim=dim, keepdim=True)).squeeze(dim)


def _first_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.gather(dim, x.argmax(dim=dim, keepdim=True)).squeeze(dim)


def _positive_max(v: torch.Tensor) -> torch.Tensor:
    """C's ``m = 0; if (v[j] > m) m = v[j];`` over dim 1: +0.0 (never -0.0) when nothing is > 0."""
    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _to_u8(v: torch.Tensor) -> torch.Tensor:
    """C conversion of an int to uint8_t (modulo 256)."""
    return (v & 0xFF).to(torch.uint8)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[nb, 256] values 0..3 -> [nb, 64]: qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | ... (j in 0, 128)."""
    q = L.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return _to_u8(out.reshape(-1, 64))


# ---------------------------------------------------------------- 32-weight block types
def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 B per 32 weights: d f16 (amax/127), qs int8[32] = roundf(x * (1/d))."""
    amax = x.abs().amax(dim=1)
    d = _div(amax, 127.0)
    idv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    q = _roundf(x * idv[:, None]).to(torch.int32)
    return torch.cat([_f16_bytes(_f16(d)), _to_u8(q)], dim=1)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 B per 32: d f16 (= signed absmax / -8), qs[16]: x[j] low nibble, x[j+16] high."""
    _, mx = _first_absmax(x, 1)
    d = _div(mx, -8.0)
    idv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    q = torch.trunc(x * idv[:, None] + 8.5).to(torch.int32).clamp(max=15)
    return torch.cat([_f16_bytes(_f16(d)), _to_u8(q[:, :16] | (q[:, 16:] << 4))], dim=1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 B per 32: d f16 ((max-min)/15), m f16 (min), qs[16] nibbles as Q4_0."""
    mn, mx = _first_min(x, 1), _first_max(x, 1)
    d = _div(mx - mn, 15.0)
    idv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    q = torch.trunc((x - mn[:, None]) * idv[:, None] + 0.5).to(torch.int32).clamp(max=15)
    head = [_f16_bytes(_f16(d)), _f16_bytes(_f16(mn))]
    return torch.cat(head + [_to_u8(q[:, :16] | (q[:, 16:] << 4))], dim=1)


def _qh_bytes(q: torch.Tensor) -> torch.Tensor:
    """5th bits of [G, 32] values -> uint32 qh (bit j = value j) as [G, 4] little-endian bytes."""
    bits = (q >> 4) & 1
    shifts = torch.arange(8, device=q.device, dtype=torch.int32)
    by = (bits.reshape(-1, 4, 8) << shifts).sum(dim=2)
    return _to_u8(by)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22 B per 32: d f16 (signed absmax / -16), qh u32 (5th bits), qs[16] low nibbles."""
    _, mx = _first_absmax(x, 1)
    d = _div(mx, -16.0)
    idv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    q = torch.trunc(x * idv[:, None] + 16.5).to(torch.int32).clamp(max=31)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    return torch.cat([_f16_bytes(_f16(d)), _qh_bytes(q), _to_u8(qs)], dim=1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    """Q5_1, 24 B per 32: d f16 ((max-min)/31), m f16 (min), qh u32, qs[16]."""
    mn, mx = _first_min(x, 1), _first_max(x, 1)
    d = _div(mx - mn, 31.0)
    idv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    q = torch.trunc((x - mn[:, None]) * idv[:, None] + 0.5).to(torch.int32) & 0xFF
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    head = [_f16_bytes(_f16(d)), _f16_bytes(_f16(mn))]
    return torch.cat(head + [_qh_bytes(q), _to_u8(qs)], dim=1)


# ---------------------------------------------------------------- group solvers (layout [n, G])
def _rint_clamp_(v: torch.Tensor, lo: float, hi: float, safe: bool) -> torch.Tensor:
    """In place: v <- float(clamp(nearest_int(v), lo, hi)).

    ``safe``: the caller proved every element that matters has |v| <= 2**22 - 1 (finite); then
    ``(v + 1.5*2**23) - 1.5*2**23`` is exactly ggml's result (two float passes instead of four;
    torch.round gives the same values but is 3x slower on CPU).
    """
    if safe:
        return v.add_(_MAGIC).sub_(_MAGIC).clamp_(lo, hi)
    return v.copy_(_nearest_int(v).clamp_(int(lo), int(hi)))


def _in_range(*ends: torch.Tensor, ignore: torch.Tensor) -> bool:
    """All per-group extreme values within nearest_int's exact range (groups in ``ignore`` aside)."""
    ok = ignore.clone()
    both = torch.ones_like(ignore)
    for e in ends:
        both &= e.abs() <= _NI_SAFE  # False for inf/NaN
    return bool((ok | both).all())


def _seqsum_rows(P: torch.Tensor, stacked: bool | None = None) -> torch.Tensor:
    """[k, n, G] -> [k, G]: k sequential sums (same rounding as k separate ones).

    On GPU one add per element row for all k (a third of the kernel launches); on CPU k separate
    sums over contiguous rows (strided [k, G] slices cost 1.7x more there).
    """
    if not (P.is_cuda if stacked is None else stacked):
        return torch.stack([_seqsum(p) for p in P])
    acc = P[:, 0] + 0.0
    for i in range(1, P.shape[1]):
        acc += P[:, i]
    return acc


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """ggml make_qkx2_quants over groups: x, w [n, G] -> (L int32 [n, G], scale [G], the_min [G]).

    Each search step is kept exactly (its iscale uses the min of the last accepted step); instead
    of carrying L, the (iscale, min) that produced the best L are kept and L recomputed once.
    """
    xmin = _first_min(x, 0)
    mx = x.amax(dim=0)
    wx = w * x
    sum_w, sum_x = w[0].clone(), wx[0].clone()
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += wx[i]
    mn = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    flat = mx == mn
    la, err = torch.empty_like(x), torch.empty_like(x)
    P = x.new_empty((3, *x.shape))

    def quantize_into(out, iscale, cmin, x_minus_cmin=None):
        if x_minus_cmin is None:
            torch.sub(x, cmin, out=out).mul_(iscale)
        else:
            torch.mul(x_minus_cmin, iscale, out=out)
        safe = _in_range(iscale * (mx - cmin), iscale * (xmin - cmin), ignore=flat)
        return _rint_clamp_(out, 0.0, float(nmax), safe)

    def error(scale, cmin):
        torch.mul(la, scale, out=err).add_(cmin).sub_(x)
        err.abs_() if use_mad else err.mul_(err)
        return _seqsum(err.mul_(w))

    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    quantize_into(la, iscale, mn)
    best = error(scale, mn)
    use_is, use_min, cur_min = iscale, mn, mn
    xm = x - cur_min  # x - cur_min, refreshed only when some group's min moved
    for step in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = _div(float(num), mx - cur_min)
        quantize_into(la, iscale, cur_min, xm)
        torch.mul(w, la, out=P[0])
        torch.mul(P[0], la, out=P[1])
        torch.mul(P[0], x, out=P[2])
        sum_l, sum_l2, sum_xl = _seqsum_rows(P)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, _div(sum_xl, sum_l2), this_scale)
        cur = error(this_scale, this_min)
        take = (D > 0) & (cur < best)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        use_is = torch.where(take, iscale, use_is)
        use_min = torch.where(take, cur_min, use_min)
        cur_min = torch.where(take, this_min, cur_min)
        if x.is_cuda or bool(take.any()):  # on GPU a pass costs less than a host sync
            torch.sub(x, cur_min, out=xm)
    L = quantize_into(la, use_is, use_min)
    L = torch.where(flat, torch.zeros_like(L), L).to(torch.int32)
    return L, torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, -mn, -cur_min)


def _make_qx(x, nmax: int):
    """ggml make_qx_quants(rmse_type=1, no weights): x [n, G] -> (L int32 0..2*nmax-1, scale [G])."""
    amax, mx = _first_absmax(x, 0)
    zero = amax < _GROUP_MAX_EPS
    xmin, xmax = x.amin(dim=0), x.amax(dim=0)
    w = x * x
    wx = w * x
    la = torch.empty_like(x)
    P = x.new_empty((2, *x.shape))

    def quantize_into(iscale):
        torch.mul(x, iscale, out=la)
        return _rint_clamp_(la, float(-nmax), float(nmax - 1), _in_range(iscale * xmax, iscale * xmin, ignore=zero))

    def trial(num: float):
        iscale = _div(num, mx)
        quantize_into(iscale)
        torch.mul(wx, la, out=P[0])
        torch.mul(w, la, out=P[1]).mul_(la)
        sumlx, suml2 = _seqsum_rows(P)
        return iscale, sumlx, suml2

    use_is, sumlx, suml2 = trial(float(-nmax))
    scale = torch.where(suml2 != 0, _div(sumlx, suml2), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        iscale, sumlx, suml2 = trial(float(num))
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        use_is = torch.where(take, iscale, use_is)
        scale = torch.where(take, _div(sumlx, suml2), scale)
        best = torch.where(take, scale * sumlx, best)
    L = quantize_into(use_is).to(torch.int32) + nmax
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


def _descend_q3(x, w, wx, L, sumlx, suml2, nmax: int):
    """One pass of make_q3_quants' coordinate descent over the 16 weights of every group (in place).

    Returns which groups changed. All [G] vectors, float32; L holds integers as float32.
    """
    changed = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for i in range(x.shape[0]):
        li = L[i]
        slx = sumlx - wx[i] * li
        sl2 = suml2 - w[i] * li * li
        new_l = _nearest_int(_div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1).float()
        slx2 = slx + wx[i] * new_l
        sl22 = sl2 + w[i] * new_l * new_l
        take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
        L[i] = torch.where(take, new_l, li)
        sumlx.copy_(torch.where(take, slx2, sumlx))
        suml2.copy_(torch.where(take, sl22, suml2))
        changed |= take
    return changed


def _make_q3(x, nmax: int):
    """ggml make_q3_quants(do_rmse=true): x [n, G] -> (L int32, scale [G]); coordinate descent.

    C stops a group after a pass that changed nothing (a pass over an unchanged group changes
    nothing); we run each pass on the groups the previous pass changed, up to C's 5 passes.
    """
    amax, mx = _first_absmax(x, 0)
    zero = amax < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    iscale = _div(float(-nmax), mx)
    L = torch.mul(x, iscale)
    safe = _in_range(iscale * x.amax(dim=0), iscale * x.amin(dim=0), ignore=zero)
    _rint_clamp_(L, float(-nmax), float(nmax - 1), safe)
    P = torch.stack([wx * L, w * L * L])
    sumlx, suml2 = _seqsum_rows(P)
    active = torch.arange(x.shape[1], device=x.device)
    for _ in range(5):
        if active.numel() == 0:
            break
        sub = (x[:, active], w[:, active], wx[:, active], L[:, active], sumlx[active], suml2[active])
        changed = _descend_q3(*sub, nmax)
        L[:, active], sumlx[active], suml2[active] = sub[3], sub[4], sub[5]
        active = active[changed]
    L = L.to(torch.int32) + nmax
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """[nb, 256] -> [n, nb*256/n]: group g = block*(256/n) + j, element-major (contiguous rows)."""
    return x.reshape(-1, n).t().contiguous()


def _ungroup(L: torch.Tensor) -> torch.Tensor:
    return L.t().reshape(-1, QK_K)


def _requant(x, L_keep, d, dm, lo: int, hi: int, offset: int = 0):
    """L = clamp(nearest_int((x + dm)/d), lo, hi) + offset where d != 0, else the solver's L.

    x [nb, g, n]; d, dm [nb, g]. (x + dm)/d is monotone in x, so a group's extremes bound it.
    """
    def v_of(t):
        return _div(t if dm is None else t + dm[..., None], d[..., None])

    ends = (v_of(x.amax(dim=-1, keepdim=True)), v_of(x.amin(dim=-1, keepdim=True)))
    v = v_of(x)
    L = _rint_clamp_(v, float(lo), float(hi), _in_range(*ends, ignore=(d == 0)[..., None])).to(torch.int32)
    return torch.where((d != 0)[..., None], L + offset, L_keep)


# ---------------------------------------------------------------- K-quants (256-weight blocks)
def _q2_k(x: torch.Tensor) -> torch.Tensor:
    """Q2_K, 84 B per 256: scales[16] (low nibble scale, high nibble min), qs[64] (4 per byte),
    d f16, dmin f16. 16 groups of 16; w = |x|; make_qkx2(nmax 3, rmin -.5, rdelta .1, 15 steps, MAD)."""
    nb = x.shape[0]
    xg = _groups(x, 16)
    L, scales, mins = _make_qkx2(xg, xg.abs(), 3, -0.5, 0.1, 15, True)
    L, scales, mins = _ungroup(L).reshape(nb, 16, 16), scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    zero = torch.zeros_like(max_scale)
    ls = torch.where((max_scale > 0)[:, None], _nearest_int(_div(15.0, max_scale)[:, None] * scales), 0)
    d16 = _f16(torch.where(max_scale > 0, _div(max_scale, 15.0), zero))
    lm = torch.where((max_min > 0)[:, None], _nearest_int(_div(15.0, max_min)[:, None] * mins), 0)
    m16 = _f16(torch.where(max_min > 0, _div(max_min, 15.0), zero))
    sc = (ls & 0xFF) | (lm << 4)
    sc = torch.where((max_min > 0)[:, None], sc, ls) & 0xFF
    d = d16.float()[:, None] * (sc & 0xF).float()
    dm = m16.float()[:, None] * (sc >> 4).float()
    xb = x.reshape(nb, 16, 16)
    L = _requant(xb, L, d, dm, 0, 3)
    return torch.cat([_to_u8(sc), _pack_2bit(L.reshape(nb, QK_K)), _f16_bytes(d16), _f16_bytes(m16)], dim=1)


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    """Q3_K, 110 B per 256: hmask[32] (bit j//32 of byte j%32 = high bit of weight j), qs[64] (low
    2 bits, packed as Q2_K), scales[12] (16 signed 6-bit scales + 32), d f16. make_q3_quants(4)."""
    nb = x.shape[0]
    L, scales = _make_q3(_groups(x, 16), 4)
    L, scales = _ungroup(L).reshape(nb, 16, 16), scales.reshape(nb, 16)
    _, max_scale = _first_absmax(scales, 1)
    has = max_scale != 0
    iscale = _div(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    l = _nearest_int(iscale[:, None] * scales)
    l = (((l & 0xFF) ^ 0x80) - 0x80).clamp(-32, 31) + 32  # int8_t cast, then clamp
    l = torch.where(has[:, None], l, torch.zeros_like(l))
    lo, hi = l & 0xF, l >> 4
    sc = torch.cat([lo[:, :8] | (lo[:, 8:] << 4),
                    hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)], dim=1)
    d16 = _f16(torch.where(has, _div(1.0, iscale), torch.zeros_like(iscale)))
    d = d16.float()[:, None] * torch.where(has[:, None], l - 32, 0).float()
    L = _requant(x.reshape(nb, 16, 16), L, d, None, -4, 3, 4).reshape(nb, QK_K)
    high = L > 3
    L = torch.where(high, L - 4, L)
    hm = high.reshape(nb, 8, 32).to(torch.int32) << torch.arange(8, device=x.device, dtype=torch.int32)[:, None]
    return torch.cat([_to_u8(hm.sum(dim=1)), _pack_2bit(L), _to_u8(sc), _f16_bytes(d16)], dim=1)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 (6-bit scale, 6-bit min) pairs -> scales[12] (ggml get_scale_min_k4 layout)."""
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return _to_u8(torch.cat([first, second, third], dim=1))


def _k45_common(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K: 8 groups of 32, w = sqrt(sum x^2/32) + |x|, make_qkx2, 6-bit scales."""
    nb = x.shape[0]
    xg = _groups(x, 32)
    # torch's CPU sqrt (SLEEF, 0.5001 ulp) is not correctly rounded; float64 sqrt rounded to
    # float32 is (53 >= 2*24 + 2 bits), as C's sqrtf is.
    av = torch.sqrt(_div(_seqsum(xg * xg), 32.0).double()).float()
    L, scales, mins = _make_qkx2(xg, av + xg.abs(), nmax, rmin, 0.1, nstep, False)
    L, scales, mins = _ungroup(L).reshape(nb, 8, 32), scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    zero = torch.zeros_like(max_scale)
    inv_s = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
    inv_m = torch.where(max_min > 0, _div(63.0, max_min), zero)
    ls = (_nearest_int(inv_s[:, None] * scales) & 0xFF).clamp(max=63)
    lm = (_nearest_int(inv_m[:, None] * mins) & 0xFF).clamp(max=63)
    d16, m16 = _f16(_div(max_scale, 63.0)), _f16(_div(max_min, 63.0))
    d = d16.float()[:, None] * ls.float()
    dm = m16.float()[:, None] * lm.float()
    L = _requant(x.reshape(nb, 8, 32), L, d, dm, 0, nmax).reshape(nb, QK_K)
    head = torch.cat([_f16_bytes(d16), _f16_bytes(m16), _pack_k4_scales(ls, lm)], dim=1)
    return head, L


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144 B per 256: d f16, dmin f16, scales[12] (8 x 6-bit scale/min), qs[128]: for each
    64-weight chunk, 32 bytes with weight l in the low nibble and weight l+32 in the high one.
    make_qkx2(nmax 15, rmin -1, rdelta .1, 20 steps)."""
    head, L = _k45_common(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)
    return torch.cat([head, _to_u8((q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128))], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    """Q5_K, 176 B per 256: d, dmin, scales[12] as Q4_K, qh[32] (bit 2c / 2c+1 of byte l = 5th bit
    of weight 64c+l / 64c+32+l), qs[128] low nibbles as Q4_K. make_qkx2(31, -.5, .1, 15 steps)."""
    head, L = _k45_common(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32)
    low = q & 0xF
    hb = (q >> 4) & 1
    shifts = (2 * torch.arange(4, device=x.device, dtype=torch.int32))[:, None]
    qh = ((hb[:, :, 0] << shifts) | (hb[:, :, 1] << (shifts + 1))).sum(dim=1)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, _to_u8(qh), _to_u8(qs)], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210 B per 256: ql[128] (low nibbles), qh[64] (high 2 bits), scales int8[16], d f16.
    Per 128 weights: ql[l] = w[l] | w[l+64]<<4, ql[l+32] = w[l+32] | w[l+96]<<4, qh[l] = the four
    high pairs. make_qx_quants(nmax 32, rmse_type 1) per 16 weights."""
    nb = x.shape[0]
    L, scales = _make_qx(_groups(x, 16), 32)
    L, scales = _ungroup(L).reshape(nb, 16, 16), scales.reshape(nb, 16)
    amax, max_scale = _first_absmax(scales, 1)
    blank = amax < _GROUP_MAX_EPS
    safe = torch.where(blank, torch.ones_like(max_scale), max_scale)
    iscale = _div(-128.0, safe)
    q_sc = _nearest_int(iscale[:, None] * scales).clamp(max=127)
    q_sc = ((q_sc & 0xFF) ^ 0x80) - 0x80  # int8 storage
    d16 = _f16(_div(1.0, iscale))
    d = d16.float()[:, None] * q_sc.float()
    L = _requant(x.reshape(nb, 16, 16), L, d, None, -32, 31, 32).reshape(nb, 2, 4, 32)
    lo, hi = L & 0xF, L >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = torch.cat([_to_u8(ql.reshape(nb, 128)), _to_u8(qh.reshape(nb, 64)),
                     _to_u8(q_sc), _f16_bytes(d16)], dim=1)
    return torch.where(blank[:, None], torch.zeros_like(out), out)


_BLOCK_FNS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
SUPPORTED: tuple[T, ...] = tuple(_FLOAT_TYPES) + tuple(_BLOCK_FNS)


def as_qtype(qtype: T | str) -> T:
    """``"q4_k"`` / ``"Q4_K"`` / ``GGMLQuantizationType.Q4_K`` -> GGMLQuantizationType."""
    if isinstance(qtype, T):
        return qtype
    try:
        return T[str(qtype).upper()]
    except KeyError:
        raise ValueError(f"unknown GGML tensor type {qtype!r}; known: {[t.name for t in SUPPORTED]}") from None


def row_nbytes(qtype: T | str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights in ``qtype`` (ValueError if not a block multiple)."""
    qtype = as_qtype(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"a row of {n_per_row} weights is not a multiple of the {qtype.name} block ({block})")
    return n_per_row // block * size


def quantize(t: torch.Tensor, qtype: T | str, chunk: int | None = None) -> torch.Tensor:
    """Quantize ``t`` (any float dtype, any device, last dim = row) to GGML ``qtype``.

    Returns uint8 ``[*t.shape[:-1], row_nbytes(qtype, t.shape[-1])]`` on ``t.device``: the bytes
    ggml's reference quantizer writes for the float32 values of ``t``. F32/F16/BF16 are plain casts
    (round to nearest even). ``chunk``: weights quantized per step (default 1M on CPU, 16M on GPU).
    """
    qtype = as_qtype(qtype)
    if not t.is_floating_point():
        raise TypeError(f"quantize expects a floating tensor, got {t.dtype}")
    if qtype in _FLOAT_TYPES:
        out = t.to(_FLOAT_TYPES[qtype]).contiguous()
        return out.view(torch.uint8).reshape(*t.shape[:-1], -1)
    if qtype not in _BLOCK_FNS:
        raise ValueError(f"no quantizer for {qtype.name}; supported: {[q.name for q in SUPPORTED]}")
    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = row_nbytes(qtype, t.shape[-1])
    flat = t.reshape(-1, block)
    out = torch.empty((flat.shape[0], size), dtype=torch.uint8, device=t.device)
    if chunk is None:
        chunk = _CUDA_CHUNK if t.is_cuda else _CPU_CHUNK
    step = max(1, chunk // QK_K) * (QK_K // block)  # whole 256-weight super-blocks per step
    fn = _BLOCK_FNS[qtype]
    for s in range(0, flat.shape[0], step):
        out[s:s + step] = fn(flat[s:s + step].to(torch.float32))
    return out.reshape(*t.shape[:-1], nbytes)
