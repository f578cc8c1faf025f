"""llama.cpp's per-tensor type rules (llama_tensor_get_type_impl), one test per rule."""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T, LlamaFileType as FT

from velotune.export.gguf import mixes


def _llama(n_layer: int, hidden: int = 4096, ff: int = 14336, vocab: int = 32000, tied: bool = False,
           kv_dim: int = 1024):
    """(name, [rows, cols]) of a Llama-shaped model (cols = GGUF row length)."""
    t = [("token_embd.weight", [vocab, hidden]), ("output_norm.weight", [hidden])]
    if not tied:
        t.append(("output.weight", [vocab, hidden]))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", [hidden]), (p + "ffn_norm.weight", [hidden]),
              (p + "attn_q.weight", [hidden, hidden]), (p + "attn_k.weight", [kv_dim, hidden]),
              (p + "attn_v.weight", [kv_dim, hidden]), (p + "attn_output.weight", [hidden, hidden]),
              (p + "ffn_gate.weight", [ff, hidden]), (p + "ffn_up.weight", [ff, hidden]),
              (p + "ffn_down.weight", [hidden, ff])]
    return t


def _plan(method, n_layer=32, arch="llama", n_head=32, n_head_kv=8, **kw):
    return mixes.plan_types(_llama(n_layer, **kw), method, arch=arch, n_layer=n_layer, n_head=n_head,
                            n_head_kv=n_head_kv)


def _by_layer(plan, role, n_layer):
    return [plan[f"blk.{i}.{role}.weight"] for i in range(n_layer)]


def test_use_more_bits_matches_llama_cpp_formula():
    # n=32: first 4, last 4, and every third from 4 + 2
    got = [i for i in range(32) if mixes.use_more_bits(i, 32)]
    assert got == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    # n=30 (SmolLM2): n/8 = 3, 7n/8 = 26
    assert [i for i in range(30) if mixes.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.mark.parametrize("method", ["q4_k_m", "q5_k_m"])
def test_k_m_gives_q6_k_to_attn_v_and_ffn_down_where_more_bits(method):
    base = mixes.METHODS[method].base
    p = _plan(method)
    want = [T.Q6_K if mixes.use_more_bits(i, 32) else base for i in range(32)]
    assert _by_layer(p, "attn_v", 32) == want
    assert _by_layer(p, "ffn_down", 32) == want
    for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(_by_layer(p, role, 32)) == {base}
    assert p["output.weight"] == T.Q6_K and p["token_embd.weight"] == base


def test_q3_k_m_rules():
    p = _plan("q3_k_m")
    assert _by_layer(p, "attn_v", 32) == [T.Q5_K, T.Q5_K] + [T.Q4_K] * 30
    assert _by_layer(p, "ffn_down", 32) == [T.Q5_K, T.Q5_K] + [T.Q4_K] * 30  # i < 32/16
    assert set(_by_layer(p, "attn_output", 32)) == {T.Q4_K}
    assert set(_by_layer(p, "attn_q", 32)) == {T.Q3_K} and set(_by_layer(p, "ffn_up", 32)) == {T.Q3_K}


def test_q3_k_l_and_q3_k_s_rules():
    p = _plan("q3_k_l")
    for role in ("attn_v", "ffn_down", "attn_output"):
        assert set(_by_layer(p, role, 32)) == {T.Q5_K}
    assert set(_by_layer(p, "ffn_gate", 32)) == {T.Q3_K}
    s = _plan("q3_k_s")
    assert {s[n] for n in s if n.startswith("blk.") and not n.endswith("norm.weight")} == {T.Q3_K}


def test_q4_k_s_rules():
    p = _plan("q4_k_s")
    assert _by_layer(p, "attn_v", 32) == [T.Q5_K] * 4 + [T.Q4_K] * 28
    assert _by_layer(p, "ffn_down", 32) == [T.Q5_K] * 4 + [T.Q4_K] * 28  # i < 32/8


@pytest.mark.parametrize("n_head,n_head_kv,want", [(32, 8, T.Q4_K), (32, 16, T.Q3_K), (32, 32, T.Q3_K)])
def test_q2_k_attn_v_depends_on_gqa(n_head, n_head_kv, want):
    p = _plan("q2_k", n_head=n_head, n_head_kv=n_head_kv)
    assert set(_by_layer(p, "attn_v", 32)) == {want}
    assert set(_by_layer(p, "ffn_down", 32)) == {T.Q3_K}
    assert set(_by_layer(p, "attn_output", 32)) == {T.Q3_K}
    assert set(_by_layer(p, "ffn_up", 32)) == {T.Q2_K}


@pytest.mark.parametrize("arch,n_head_kv,bumped", [("llama", 8, True), ("llama", 64, False),
                                                    ("qwen2", 64, True), ("qwen3", 8, False)])
def test_70b_attn_v_bump(arch, n_head_kv, bumped):
    p = _plan("q3_k_m", n_layer=80, arch=arch, n_head=64, n_head_kv=n_head_kv, hidden=512, ff=512, vocab=512,
              kv_dim=512)
    v = _by_layer(p, "attn_v", 80)
    assert v[:2] == [T.Q5_K, T.Q5_K]
    assert set(v[2:]) == ({T.Q5_K} if bumped else {T.Q4_K})


@pytest.mark.parametrize("method,want", [("q4_k_m", T.Q6_K), ("q2_k", T.Q6_K), ("q6_k", T.Q6_K),
                                         ("q4_0", T.Q6_K), ("q8_0", T.Q8_0), ("q5_1", T.Q6_K)])
def test_output_and_tied_token_embd(method, want):
    untied = _plan(method)
    assert untied["output.weight"] == want
    assert untied["token_embd.weight"] == mixes.METHODS[method].base  # untied embd keeps the base
    tied = _plan(method, tied=True)
    assert "output.weight" not in tied and tied["token_embd.weight"] == want


@pytest.mark.parametrize("method", ["q4_k_m", "q4_0", "q3_k_l"])
def test_output_row_not_multiple_of_256_is_q8_0(method):
    # SmolLM2: hidden 576 = 2.25 * 256 -> Q8_0 (q4_0 picks Q6_K first, then falls back to Q8_0)
    p = _plan(method, tied=True, hidden=576, ff=1536, vocab=49152, kv_dim=192, n_layer=30, n_head=9, n_head_kv=3)
    assert p["token_embd.weight"] == T.Q8_0


@pytest.mark.parametrize("base,want", [(T.Q2_K, T.Q4_0), (T.Q3_K, T.Q4_0), (T.Q4_K, T.Q5_0),
                                       (T.Q5_K, T.Q5_1), (T.Q6_K, T.Q8_0), (T.Q8_0, T.Q8_0), (T.Q4_1, T.Q4_1)])
def test_row_fallbacks(base, want):
    assert mixes.fallback(base, 576) == want
    assert mixes.fallback(base, 512) == base
    assert mixes.fallback(base, 100) == T.F16  # not even a multiple of 32


def test_smollm2_shape_plan_mixes_fallbacks_and_k_quants():
    p = _plan("q4_k_m", tied=True, hidden=576, ff=1536, vocab=49152, kv_dim=192, n_layer=30, n_head=9, n_head_kv=3)
    # rows of 576 fall back; ffn_down rows are 1536 = 6*256 and stay K-quants
    assert p["blk.0.attn_q.weight"] == T.Q5_0 and p["blk.3.attn_q.weight"] == T.Q5_0
    assert p["blk.0.attn_v.weight"] == T.Q8_0 and p["blk.3.attn_v.weight"] == T.Q5_0  # Q6_K -> Q8_0
    assert p["blk.0.ffn_down.weight"] == T.Q6_K and p["blk.3.ffn_down.weight"] == T.Q4_K


def test_norms_and_1d_tensors_stay_f32():
    t = _llama(2) + [("blk.0.attn_q.bias", [4096]), ("rope_freqs.weight", [64]),
                     ("blk.0.attn_q_norm.weight", [128])]
    for method in ("q4_k_m", "f16", "bf16", "q8_0", "f32"):
        p = mixes.plan_types(t, method, arch="llama", n_layer=2, n_head=32, n_head_kv=8)
        for name in ("output_norm.weight", "blk.1.attn_norm.weight", "blk.0.attn_q.bias", "rope_freqs.weight",
                     "blk.0.attn_q_norm.weight"):
            assert p[name] == T.F32, (method, name)


@pytest.mark.parametrize("method,want", [("f16", T.F16), ("bf16", T.BF16), ("f32", T.F32)])
def test_float_methods(method, want):
    p = _plan(method, n_layer=2)
    assert p["blk.1.ffn_down.weight"] == want and p["output.weight"] == want and p["token_embd.weight"] == want


def test_file_type_codes():
    codes = {m: int(mixes.METHODS[m].ftype) for m in mixes.METHODS}
    assert codes == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9,
                     "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
                     "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
    assert mixes.METHODS["q4_k_m"].ftype == FT.MOSTLY_Q4_K_M


def test_aliases_and_unknown_method():
    assert mixes.resolve_method("fast_quantized").name == "q8_0"
    assert mixes.resolve_method("quantized").name == "q4_k_m"
    assert mixes.resolve_method("not_quantized").name == "f16"
    assert mixes.resolve_method("Q4_K_M").name == "q4_k_m"
    with pytest.raises(ValueError, match=r"unknown quantization_method 'q4_k_x'; valid: .*q4_k_m.*quantized"):
        mixes.resolve_method("q4_k_x")


def test_llama_order_and_counter_order():
    names = ["blk.10.attn_v.weight", "token_embd.weight", "blk.2.attn_v.weight", "output.weight",
             "blk.2.attn_k.weight", "output_norm.weight"]
    assert mixes.llama_order(names) == ["output.weight", "output_norm.weight", "token_embd.weight",
                                        "blk.2.attn_k.weight", "blk.2.attn_v.weight", "blk.10.attn_v.weight"]
    # attn_v counter follows block order even when blocks come in unsorted
    t = list(reversed(_llama(4)))
    p = mixes.plan_types(t, "q3_k_m", arch="llama", n_layer=4, n_head=32, n_head_kv=8)
    assert _by_layer(p, "attn_v", 4) == [T.Q5_K, T.Q5_K, T.Q4_K, T.Q4_K]


def test_allows_quantization():
    assert mixes.allows_quantization("blk.0.ffn_up.weight", 2)
    assert not mixes.allows_quantization("blk.0.attn_norm.weight", 2)
    assert not mixes.allows_quantization("blk.0.attn_q.bias", 2)
    assert not mixes.allows_quantization("blk.0.ffn_up.weight", 1)
