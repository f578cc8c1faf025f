"""Rotary position embedding applied in place to q and k in one launch; cos/sin tables from HF's RoPE init.

Convention (transformers' `apply_rotary_pos_emb`, "rotate_half"): with R = cos.shape[-1] rotary dims
(R = D normally, R < D for partial rotary) and the two halves x1 = x[..., :R/2], x2 = x[..., R/2:R],
    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
where cos1/cos2 (sin1/sin2) are the two halves of the table row at the token's position
(equal to each other for HF's tables, which are cat(freqs, freqs)). Dims R..D pass through unchanged.
The backward applies the transposed map to the gradients (the same rotation with -sin when the halves
are equal), also in place.

Positions come from `position_ids` [B, T] (int32/int64), so packed sequences whose positions restart
mid-row rotate exactly like separate sequences. Each position must be < cos.shape[0]: the kernel does
not bounds-check (checking on the host costs a sync per call; an out-of-range position reads out of
bounds), so build the tables for the longest sequence with `rope_cos_sin`.

Numerics: the kernel loads q/k in their dtype and the tables in theirs, rotates in fp32 and rounds
once. HF casts cos/sin to q.dtype and rounds after each of its three bf16 ops, so in bf16 the kernel is
closer to the exact rotation than HF; in fp32 both agree to ~1 ulp. `rope_reference` is HF's
expression (including the cast of the tables to q.dtype) and equals HF bit for bit.
"""
from __future__ import annotations

import torch

from velotune.kernels._utils import next_power_of_2, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None

_LAYOUTS = ("bhtd", "bthd")
# A program rotates [BLOCK_H, R/2] tiles; 4096 fp32 elements (32 heads x 64 for head_dim 128) keeps
# each tile in registers with 4 warps.
_TILE_ELEMS = 4096


def rope_cos_sin(
    config,
    max_positions: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    layer_type: str | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, R] for a transformers config, equal to HF's rotary embedding.

    The inverse frequencies and the attention scaling come from
    `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]` (linear, dynamic, yarn, longrope,
    llama3, ...); "default" RoPE, which transformers 5 keeps per model class, is 1 / theta^(2i/R).
    The cos/sin expression is HF's `LlamaRotaryEmbedding.forward` in fp32, then cast to `dtype`.

    Args:
        config: a transformers config with `rope_parameters` (transformers >= 5).
        max_positions: table rows; the largest position id + 1 (the training max_seq_length, not
            necessarily config.max_position_embeddings: 131072 rows x 128 x 2 tables is 128 MiB in fp32).
        device, dtype: of the returned tables. fp32 keeps the kernel's rotation exact to fp32; pass the
            model dtype to get exactly what HF's rotary module returns.
        layer_type: key into per-layer-type rope_parameters (Gemma 3: "sliding_attention"/"full_attention").
        seq_len: forwarded to dynamic/longrope init functions. HF recomputes those frequencies from the
            longest batch seen; a static table equals HF's only for sequences of this length (or, when
            None, up to original_max_position_embeddings, where no scaling applies).
    Returns:
        (cos, sin), each [max_positions, R] of `dtype` on `device`.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    kwargs = {k: v for k, v in (("seq_len", seq_len), ("layer_type", layer_type)) if v is not None}
    if rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
    elif rope_type == "default":
        inv_freq, attention_scaling = _default_inv_freq(config, params, device), 1.0
    else:
        raise ValueError(
            f"rope_cos_sin: rope_type={rope_type!r} is not in transformers' ROPE_INIT_FUNCTIONS "
            f"({sorted(ROPE_INIT_FUNCTIONS)}) nor 'default'; upgrade transformers or use the HF forward"
        )
    positions = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    # HF's expression: a k=1 matmul (one fp32 rounding per element), duplicated halves, then scaling.
    # Autocast off, as in HF's rotary module: under bf16 autocast the matmul would round
    # position x frequency to 8 bits (angle errors of several radians at position 2048).
    with torch.autocast(positions.device.type, enabled=False):
        freqs = (inv_freq.float().to(positions.device)[None, :, None] @ positions[None, None, :]).transpose(1, 2)[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _default_inv_freq(config, params: dict, device) -> torch.Tensor:
    """Unscaled RoPE frequencies 1 / theta^(2i/R), i < R/2, as each HF model's default init computes them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (params["rope_theta"] ** exponents)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layout: str = "bhtd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb on gathered table rows, out of place and differentiable.

    Args:
        q: [B, Hq, T, D] ("bhtd") or [B, T, Hq, D] ("bthd"); k the same with Hk heads.
        cos, sin: [max_pos, R], R even and <= D.
        position_ids: [B, T] or [1, T] integer positions; None means 0..T-1 for every row.
    Returns:
        (q_rot, k_rot), new tensors of q's and k's shapes and dtypes.
    """
    pos = _positions(q, position_ids, layout)
    head_axis = 1 if layout == "bhtd" else 2
    c = cos[pos].to(q.dtype).unsqueeze(head_axis)  # [B, 1, T, R] or [B, T, 1, R]
    s = sin[pos].to(q.dtype).unsqueeze(head_axis)
    r = cos.shape[-1]

    def rot(x):
        y = x[..., :r] * c + _rotate_half(x[..., :r]) * s
        return y if r == x.shape[-1] else torch.cat((y, x[..., r:]), dim=-1)

    return rot(q), rot(k)


def _positions(q: torch.Tensor, position_ids: torch.Tensor | None, layout: str) -> torch.Tensor:
    """Validate the layout and return position ids [B, T] (possibly a stride-0 expand)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"rope: layout={layout!r}; use one of {_LAYOUTS}")
    b, t = (q.shape[0], q.shape[2]) if layout == "bhtd" else (q.shape[0], q.shape[1])
    if position_ids is None:
        return torch.arange(t, device=q.device).expand(b, t)
    if position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
        raise ValueError(
            f"rope: position_ids shape {tuple(position_ids.shape)} does not match [B={b}, T={t}] "
            f"for layout {layout!r} and q shape {tuple(q.shape)}"
        )
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope: position_ids must be int32/int64, got {position_ids.dtype}")
    return position_ids.to(q.device).expand(b, t)


if triton is not None:

    @triton.jit
    def _rotate_heads(base, stride_h, n_heads, d, dmask, half, c1, c2, s1, s2,
                      BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr):
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h < n_heads)[:, None] & dmask[None, :]
            p1 = base + h[:, None].to(tl.int64) * stride_h + d[None, :]
            x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:  # transpose of the forward map: [[c1, -s1], [s2, c2]]^T
                y1 = x1 * c1[None, :] + x2 * s2[None, :]
                y2 = x2 * c2[None, :] - x1 * s1[None, :]
            else:
                y1 = x1 * c1[None, :] - x2 * s1[None, :]
                y2 = x2 * c2[None, :] + x1 * s2[None, :]
            tl.store(p1, y1.to(base.dtype.element_ty), mask=mask)
            tl.store(p1 + half, y2.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q, K, COS, SIN, POS,
        q_sb, q_sh, q_st, k_sb, k_sh, k_st, pos_sb, pos_st, cos_st, sin_st,
        seq_len, n_qh, n_kh, half,
        BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one program per token (b, t), all heads of q and k
        b = (pid // seq_len).to(tl.int64)
        t = (pid % seq_len).to(tl.int64)
        pos = tl.load(POS + b * pos_sb + t * pos_st).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        c1 = tl.load(COS + pos * cos_st + d, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + pos * cos_st + half + d, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + pos * sin_st + d, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + pos * sin_st + half + d, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(Q + b * q_sb + t * q_st, q_sh, n_qh, d, dmask, half, c1, c2, s1, s2, BACKWARD, BLOCK_QH)
        _rotate_heads(K + b * k_sb + t * k_st, k_sh, n_kh, d, dmask, half, c1, c2, s1, s2, BACKWARD, BLOCK_KH)


def _bht_strides(x: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, time) strides of a 4-D q/k in either layout."""
    s = x.stride()
    return (s[0], s[1], s[2]) if layout == "bhtd" else (s[0], s[2], s[1])


def _check_args(q, k, cos, sin, layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"rope: layout={layout!r}; use one of {_LAYOUTS}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    t_axis = 2 if layout == "bhtd" else 1
    if q.shape[0] != k.shape[0] or q.shape[t_axis] != k.shape[t_axis] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, T or D ({layout})")
    r = cos.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 2 or r % 2 or r > q.shape[-1]:
        raise ValueError(
            f"rope: cos/sin must both be [max_pos, R] with R even and <= head_dim {q.shape[-1]}; "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.device != q.device or k.device != q.device:
        raise ValueError(f"rope: q ({q.device}), k ({k.device}) and cos/sin ({cos.device}) must share a device")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope: q and k need a unit stride in head_dim to be rotated in place")


def _rope_launch(q, k, cos, sin, pos, layout, backward):
    """Rotate q and k in place (forward map, or its transpose when backward=True)."""
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    batch, seq = pos.shape
    if batch * seq == 0:
        return
    half = cos.shape[-1] // 2
    n_qh = q.shape[1] if layout == "bhtd" else q.shape[2]
    n_kh = k.shape[1] if layout == "bhtd" else k.shape[2]
    block_d = next_power_of_2(half)
    cap = max(1, _TILE_ELEMS // block_d)
    q_sb, q_sh, q_st = _bht_strides(q, layout)
    k_sb, k_sh, k_st = _bht_strides(k, layout)
    _rope_kernel[(batch * seq,)](
        q, k, cos, sin, pos,
        q_sb, q_sh, q_st, k_sb, k_sh, k_st, pos.stride(0), pos.stride(1), cos.stride(0), sin.stride(0),
        seq, n_qh, n_kh, half,
        BACKWARD=backward, BLOCK_QH=min(next_power_of_2(n_qh), cap), BLOCK_KH=min(next_power_of_2(n_kh), cap),
        BLOCK_D=block_d, num_warps=4,
    )


def _writable_grad(g: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """g itself if the kernel may rotate it in place, else a private copy: a grad that is expanded
    (stride 0, e.g. from `.sum()`), lacks a unit head_dim stride, or shares storage with `other`
    (AddBackward hands one tensor to both q and k) would be corrupted or rotated twice."""
    aliased = other is not None and g.data_ptr() == other.data_ptr()  # slices of one dqkv buffer differ
    expanded = any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape))
    return g.clone(memory_format=torch.contiguous_format) if aliased or expanded or g.stride(-1) != 1 else g


class RoPEFunction(torch.autograd.Function):
    """apply(q, k, cos, sin, position_ids [B, T], layout) -> (q, k) rotated in place, one launch.

    Not `ctx.mark_dirty`: autograd refuses a Function that modifies a *view* input in place and has
    two outputs, and q/k are nearly always views (`proj(x).view(B, T, H, D).transpose(1, 2)`). Instead
    the inputs are returned as-is (autograd wraps them as views carrying this node's backward) and their
    version counters are bumped, so a node that saved the unrotated q or k raises at backward
    ("modified by an inplace operation") instead of silently reading rotated values.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, layout):
        _check_args(q, k, cos, sin, layout)
        for x, name in ((q, "q"), (k, "k")):
            if x.is_leaf and x.requires_grad:
                raise ValueError(f"rope: {name} is a leaf that requires grad and cannot be rotated in place; "
                                 "pass the projection output (or a clone)")
        pos = _positions(q, position_ids, layout)
        _rope_launch(q, k, cos, sin, pos, layout, backward=False)
        for x in (q, k):
            torch.autograd.graph.increment_version(x)
        ctx.save_for_backward(cos, sin, pos)
        ctx.layout = layout
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, pos = ctx.saved_tensors
        dq = _writable_grad(dq)
        dk = _writable_grad(dk, other=dq)
        _rope_launch(dq, dk, cos, sin, pos, ctx.layout, backward=True)
        return dq, dk, None, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layout: str = "bhtd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, T, D] and k [B, Hk, T, D] (layout "bhtd"; "bthd" for [B, T, H, D]).

    cos/sin: [max_pos, R] tables (see `rope_cos_sin`); position_ids: [B, T] or [1, T], None = 0..T-1.
    On CUDA, q and k are rotated IN PLACE by one kernel launch and returned; elsewhere new tensors
    from `rope_reference` are returned. Always use the returned tensors.

    In-place rules: q and k must not be leaves that require grad; views (transpose, split, narrow of a
    projection output) are fine. Nothing may still need their unrotated values (it would raise at
    backward). The backward rotates dq and dk in place too: their producer (SDPA/flash attention) hands
    over fresh buffers; a grad buffer shared with another branch of the graph would be rotated under it
    (expanded grads and one buffer shared by q and k are detected and copied).
    """
    if use_triton(q):
        return RoPEFunction.apply(q, k, cos, sin, position_ids, layout)
    return rope_reference(q, k, cos, sin, position_ids, layout)
