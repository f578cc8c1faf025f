"""llama.cpp's per-tensor quantization mixes, as a table.

Ported from ``llama_tensor_get_type_impl``, ``tensor_type_fallback`` and
``tensor_allows_quantization`` of llama.cpp's ``src/llama-quant.cpp`` (MIT licence, Copyright (c)
2023-2024 The ggml authors), for dense decoders without an importance matrix (what ``llama-quantize
model-f16.gguf out.gguf Q4_K_M`` does). Rules for MoE, Falcon and the IQ/TQ types are not ported.

How llama.cpp picks a tensor's type, and so how :func:`plan_types` does:

1. Only tensors with >= 2 dims whose name ends in ``weight`` and is not a ``*_norm.weight`` are
   quantized; the rest keep their type (F32 for 1-D tensors and norms).
2. The method gives a base type (``q4_k_m`` -> Q4_K).
3. ``output.weight`` -- or ``token_embd.weight`` when embeddings are tied and there is no output --
   gets Q6_K, or Q8_0 when its row is not a multiple of the base block or the base is Q8_0.
4. Per-role rules of the method (:data:`METHODS`): ``attn_v`` counts attn_v tensors in llama.cpp's
   order, ``ffn_down`` uses its layer counter against ``n_layer``.
5. "70B" models (llama arch, 80 layers and GQA; qwen2 arch, 80 layers) get Q5_K for an attn_v that
   would be Q3_K or Q4_K.
6. Rows that are not a multiple of the chosen block fall back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
   Q5_K -> Q5_1, Q6_K -> Q8_0; if that still does not divide the row, F16.

llama.cpp walks tensors sorted by block number (non-block tensors as -1), then by name; the
counters advance in that order, and :func:`llama_order` gives it (it is also the order of tensors
in a file written by llama-quantize).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits (first/last eighth, every third between)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Ctx:
    """What a rule may look at: the role counter ``i`` out of ``n`` and the model's GQA ratio."""

    i: int
    n: int
    n_gqa: int


@dataclass(frozen=True)
class Const:
    type: T

    def pick(self, c: Ctx, base: T) -> T:
        return self.type


@dataclass(frozen=True)
class MoreBits:
    """``type`` where use_more_bits(i, n), else the base."""

    type: T

    def pick(self, c: Ctx, base: T) -> T:
        return self.type if use_more_bits(c.i, c.n) else base


@dataclass(frozen=True)
class FirstN:
    """``type`` for the first ``k`` tensors of the role, else ``other`` (default: the base)."""

    k: int
    type: T
    other: T | None = None

    def pick(self, c: Ctx, base: T) -> T:
        return self.type if c.i < self.k else (self.other or base)


@dataclass(frozen=True)
class FirstFrac:
    """``type`` while i < n // den, else ``other`` (default: the base)."""

    den: int
    type: T
    other: T | None = None

    def pick(self, c: Ctx, base: T) -> T:
        return self.type if c.i < c.n // self.den else (self.other or base)


@dataclass(frozen=True)
class Gqa:
    """``type`` when n_head / n_head_kv >= ``ratio``, else ``other``."""

    ratio: int
    type: T
    other: T

    def pick(self, c: Ctx, base: T) -> T:
        return self.type if c.n_gqa >= self.ratio else self.other


@dataclass(frozen=True)
class Method:
    """One ``quantization_method``: its llama file type, base tensor type and per-role rules."""

    name: str
    ftype: FT
    base: T
    rules: dict[str, object] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.base not in (T.F32, T.F16, T.BF16)


def _m(name: str, ftype: FT, base: T, **rules) -> tuple[str, Method]:
    return name, Method(name, ftype, base, rules)


# Verified against llama_tensor_get_type_impl (llama.cpp vendored in llama-cpp-python 0.3.36).
METHODS: dict[str, Method] = dict([
    _m("f32", FT.ALL_F32, T.F32),
    _m("f16", FT.MOSTLY_F16, T.F16),
    _m("bf16", FT.MOSTLY_BF16, T.BF16),
    _m("q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
    _m("q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
    _m("q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
    _m("q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
    _m("q5_1", FT.MOSTLY_Q5_1, T.Q5_1),
    _m("q2_k", FT.MOSTLY_Q2_K, T.Q2_K,
       attn_v=Gqa(4, T.Q4_K, T.Q3_K), ffn_down=Const(T.Q3_K), attn_output=Const(T.Q3_K)),
    _m("q3_k_s", FT.MOSTLY_Q3_K_S, T.Q3_K),
    _m("q3_k_m", FT.MOSTLY_Q3_K_M, T.Q3_K,
       attn_v=FirstN(2, T.Q5_K, T.Q4_K), ffn_down=FirstFrac(16, T.Q5_K, T.Q4_K), attn_output=Const(T.Q4_K)),
    _m("q3_k_l", FT.MOSTLY_Q3_K_L, T.Q3_K,
       attn_v=Const(T.Q5_K), ffn_down=Const(T.Q5_K), attn_output=Const(T.Q5_K)),
    _m("q4_k_s", FT.MOSTLY_Q4_K_S, T.Q4_K, attn_v=FirstN(4, T.Q5_K), ffn_down=FirstFrac(8, T.Q5_K)),
    _m("q4_k_m", FT.MOSTLY_Q4_K_M, T.Q4_K, attn_v=MoreBits(T.Q6_K), ffn_down=MoreBits(T.Q6_K)),
    _m("q5_k_s", FT.MOSTLY_Q5_K_S, T.Q5_K),
    _m("q5_k_m", FT.MOSTLY_Q5_K_M, T.Q5_K, attn_v=MoreBits(T.Q6_K), ffn_down=MoreBits(T.Q6_K)),
    _m("q6_k", FT.MOSTLY_Q6_K, T.Q6_K),
])

# The incumbent's names, and llama-quantize's short K names (Q4_K means Q4_K_M there).
ALIASES: dict[str, str] = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
}

# Row not a multiple of the K block (256): llama.cpp's tensor_type_fallback.
FALLBACK: dict[T, T] = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


_ROLE = [  # llama.cpp's tensor_get_category, for the roles that carry rules (substring match)
    ("attn_v", ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")),
    ("attn_k", ("attn_k.weight",)),
    ("attn_q", ("attn_q.weight",)),
    ("attn_output", ("attn_output.weight",)),
    ("ffn_up", ("ffn_up",)),
    ("ffn_gate", ("ffn_gate",)),
    ("ffn_down", ("ffn_down",)),
]


def resolve_method(name: str) -> Method:
    """Method for a user's ``quantization_method`` (case-insensitive, aliases allowed)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        valid = sorted(METHODS) + sorted(ALIASES)
        raise ValueError(f"unknown quantization_method {name!r}; valid: {', '.join(valid)}")
    return METHODS[key]


def role(name: str) -> str:
    """llama.cpp's category of a GGUF tensor name: output, token_embd, attn_v, ..., or other."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for r, keys in _ROLE:
        if any(k in name for k in keys):
            return r
    return "other"


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama.cpp's tensor_allows_quantization, for the tensors our families have."""
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B: llama arch with 80 layers and GQA, or any 80-layer qwen2."""
    return n_layer == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))


def _block(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def fallback(t: T, ncols: int) -> T:
    """tensor_type_fallback: a type whose block divides the row, or F16."""
    if ncols % _block(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if ncols % _block(t) == 0 else T.F16


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order: by block number (non-block tensors as -1), then by name."""
    return sorted(names, key=lambda n: (_layer(n), n))


def plan_types(tensors: Sequence[tuple[str, Sequence[int]]], method: Method | str, *, arch: str,
               n_layer: int, n_head: int, n_head_kv: int) -> dict[str, T]:
    """GGUF tensor type of every tensor for ``method``.

    ``tensors``: (gguf name, HF/torch shape, i.e. [rows, cols] with cols the GGUF row length).
    Returns {name: GGMLQuantizationType}. Unquantized tensors: F32 for 1-D and norms, the method's
    float type for the rest (F16 for quantized methods, as in llama.cpp's f16 input file).
    """
    m = resolve_method(method) if isinstance(method, str) else method
    shapes = {n: tuple(s) for n, s in tensors}
    names = llama_order(shapes)
    tied = "output.weight" not in shapes
    n_attn_v = sum(role(n) == "attn_v" for n in names)
    counters = {"attn_v": 0, "ffn_down": 0}
    totals = {"attn_v": n_attn_v, "ffn_down": n_layer}
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    seventy = is_70b(arch, n_layer, n_head, n_head_kv)
    out: dict[str, T] = {}
    for name in names:
        shape = shapes[name]
        if len(shape) < 2 or name.endswith("_norm.weight"):
            out[name] = T.F32
            continue
        if m.base == T.F32 or not allows_quantization(name, len(shape)):
            out[name] = T.F32 if m.base == T.F32 else (m.base if not m.quantized else T.F16)
            continue
        if not m.quantized:
            out[name] = m.base
            continue
        out[name] = _pick(name, shape[-1], m, tied, counters, totals, n_gqa, seventy)
    return out


def _pick(name, ncols, m: Method, tied, counters, totals, n_gqa, seventy) -> T:
    r = role(name)
    t = m.base
    if r == "output" or (tied and r == "token_embd"):
        t = T.Q8_0 if ncols % _block(t) or t == T.Q8_0 else T.Q6_K
    elif r in counters:
        c = Ctx(counters[r], totals[r], n_gqa)
        rule = m.rules.get(r)
        if rule is not None:
            t = rule.pick(c, t)
        if r == "attn_v" and seventy and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        counters[r] += 1
    elif r in m.rules:
        t = m.rules[r].pick(Ctx(0, 0, n_gqa), t)
    return fallback(t, ncols)
