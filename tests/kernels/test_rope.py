"""RoPE: in-place Triton kernel vs float64 truth; tables and reference vs transformers' own RoPE."""
from __future__ import annotations

import pytest
import torch

from velotune.kernels._utils import errors_vs_truth, interpreting
from velotune.kernels.rope import RoPEFunction, rope, rope_cos_sin, rope_reference

# Tolerances relative to max|truth|, added to torch's own error (STYLE rule 3). fp32: 1e-6 (~17 ulps);
# each output is two products and a sum, the kernel rounds once, torch three times. bf16: one bf16 ulp
# (2^-7) under the interpreter, whose fp32 -> bf16 cast truncates instead of rounding to nearest-even.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7 if interpreting() else 2.0**-8}

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _config(head_dim=64, rope_parameters=None, max_pos=256):
    from transformers import LlamaConfig

    kw = {"rope_parameters": rope_parameters} if rope_parameters else {}
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_pos, head_dim=head_dim, **kw)


def _packed_positions(b, t, gen):
    """[B, T] positions made of segments that restart at 0 (padding-free packing)."""
    rows = []
    for _ in range(b):
        cuts = sorted(torch.randint(1, max(t, 2), (2,), generator=gen).tolist())
        row = torch.cat([torch.arange(n) for n in (cuts[0], cuts[1] - cuts[0], t - cuts[1]) if n > 0])
        rows.append(row[:t])
    return torch.stack(rows)


def _tables(kind, head_dim, rot_dim, rows, gen):
    if kind == "random":  # halves differ: exercises the general (transposed) backward
        return torch.randn(rows, rot_dim, generator=gen), torch.randn(rows, rot_dim, generator=gen)
    params = dict(LLAMA3, partial_rotary_factor=rot_dim / head_dim)
    return rope_cos_sin(_config(head_dim, params), rows)


def _shape(layout, b, h, t, d):
    return (b, h, t, d) if layout == "bhtd" else (b, t, h, d)


def _run(fn, q0, k0, cos, sin, pos, layout, dq, dk):
    q0 = q0.detach().clone().requires_grad_()
    k0 = k0.detach().clone().requires_grad_()
    q, k = fn(q0 * 1, k0 * 1, cos, sin, pos, layout)  # * 1: in place needs a non-leaf
    gq, gk = torch.autograd.grad((q, k), (q0, k0), (dq.clone(), dk.clone()))
    return q, k, gq, gk


CASES = [  # (B, Hq, Hk, T, head_dim, rotary_dim, table)
    (1, 1, 1, 1, 64, 64, "llama3"),
    (2, 4, 2, 7, 96, 96, "llama3"),
    (1, 3, 1, 123, 64, 64, "random"),
    (2, 5, 5, 9, 128, 64, "llama3"),  # partial rotary: dims 64..127 pass through
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_truth(case, layout, dtype, device="cpu"):
    b, hq, hk, t, d, r, table = case
    gen = torch.Generator().manual_seed(b * 1000 + t)
    cos, sin = (x.to(device) for x in _tables(table, d, r, t + 5, gen))
    pos = _packed_positions(b, t, gen).to(device)
    q0, dq = (torch.randn(_shape(layout, b, hq, t, d), generator=gen).to(device, dtype) for _ in range(2))
    k0, dk = (torch.randn(_shape(layout, b, hk, t, d), generator=gen).to(device, dtype) for _ in range(2))
    got = _run(RoPEFunction.apply, q0, k0, cos, sin, pos, layout, dq, dk)
    same = _run(rope_reference, q0, k0, cos, sin, pos, layout, dq, dk)
    truth = _run(rope_reference, q0.double(), k0.double(), cos, sin, pos, layout, dq.double(), dk.double())
    for name, a, s, tr in zip(("q", "k", "dq", "dk"), got, same, truth):
        err_k, err_t, scale = errors_vs_truth(a, s, tr)
        bound = err_t + RTOL[dtype] * scale
        assert err_k <= bound, f"{name}: kernel err {err_k:.3e} > torch err {err_t:.3e} + tol ({scale:.2e})"
    if r < d:  # pass-through dims are untouched, in values and in gradients
        assert torch.equal(got[0][..., r:], q0[..., r:]) and torch.equal(got[2][..., r:], dq[..., r:])


def test_restarting_positions_equal_separate_sequences():
    """A packed row [0 1 2 3 | 0 1 2] rotates each segment exactly as if it were alone."""
    cos, sin = rope_cos_sin(_config(), 16)
    q = torch.randn(1, 2, 7, 64)
    k = torch.randn(1, 1, 7, 64)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    qp, kp = RoPEFunction.apply(q.clone(), k.clone(), cos, sin, packed, "bhtd")
    qa, ka = RoPEFunction.apply(q[:, :, :4].clone(), k[:, :, :4].clone(), cos, sin, None, "bhtd")
    qb, kb = RoPEFunction.apply(q[:, :, 4:].clone(), k[:, :, 4:].clone(), cos, sin, None, "bhtd")
    assert torch.equal(qp, torch.cat((qa, qb), 2)) and torch.equal(kp, torch.cat((ka, kb), 2))
    assert not torch.equal(qp, RoPEFunction.apply(q.clone(), k.clone(), cos, sin, None, "bhtd")[0])


@pytest.mark.parametrize("params", [
    None,
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    LLAMA3,
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
], ids=["default", "linear", "llama3", "yarn", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tables_equal_hf_rotary_embedding(params, dtype):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _config(64, params, max_pos=256)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 200, 255], [7, 63, 64, 65, 128, 129, 130, 31]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), pos)
    cos, sin = rope_cos_sin(config, 256, dtype=dtype)
    assert torch.equal(cos[pos], hf_cos) and torch.equal(sin[pos], hf_sin)
    if params and params["rope_type"] == "yarn":
        assert cos.abs().max() > 1.01  # attention_scaling (~1.139 at factor 4) is applied


def test_tables_per_layer_type_gemma3():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = Gemma3TextConfig(hidden_size=64, head_dim=32, num_attention_heads=2, num_key_value_heads=1,
                              num_hidden_layers=6, intermediate_size=64, vocab_size=64)
    pos = torch.arange(40)[None]
    hf = Gemma3RotaryEmbedding(config)
    for layer_type in ("sliding_attention", "full_attention"):
        hf_cos, hf_sin = hf(torch.zeros(1), pos, layer_type)
        cos, sin = rope_cos_sin(config, 40, layer_type=layer_type)
        assert torch.equal(cos[pos], hf_cos) and torch.equal(sin[pos], hf_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_equals_hf_apply_rotary_pos_emb(dtype):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = _config(64, LLAMA3)
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    q, k = torch.randn(2, 4, 7, 64, dtype=dtype), torch.randn(2, 2, 7, 64, dtype=dtype)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, pos)
    cos, sin = rope_cos_sin(config, 16)
    for a, b in zip(rope_reference(q, k, cos, sin, pos), apply_rotary_pos_emb(q, k, hf_cos, hf_sin)):
        assert torch.equal(a, b)
    for a, b in zip(rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos, sin, pos, "bthd"),
                    apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin, unsqueeze_dim=2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_kind", ["mixed", "same_grad_object", "expanded_grad"])
def test_in_place_on_projection_views_and_shared_grads(loss_kind):
    """q, k as views of one projection output (the decoder's case). `(q + k)...` hands the *same* grad
    tensor to q and k, and `q.sum()` an expanded (stride-0) one: the in-place backward must copy those."""
    cos, sin = rope_cos_sin(_config(), 16)
    x = torch.randn(2, 5, 32)
    w = torch.randn(256, 32, requires_grad=True)
    losses = {
        "mixed": lambda q, k: (q + 2 * k).sum() + (q + k).pow(2).sum(),
        "same_grad_object": lambda q, k: (q + k).pow(2).sum(),
        "expanded_grad": lambda q, k: q.sum() + k.pow(2).sum(),
    }
    grads = []
    for fn in (RoPEFunction.apply, rope_reference):
        q, k = (x @ w.T).split(128, dim=-1)  # multi-output views of [B, T, 2 * 2 heads * 64]
        q = q.view(2, 5, 2, 64).transpose(1, 2)
        k = k.reshape(2, 5, 2, 64).transpose(1, 2)
        q, k = fn(q, k, cos, sin, None, "bhtd")
        grads.append(torch.autograd.grad(losses[loss_kind](q, k), (w,))[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)


def test_saved_unrotated_input_raises_instead_of_silently_using_rotated_values():
    cos, sin = rope_cos_sin(_config(), 16)
    z = torch.randn(1, 3, 3, 64, requires_grad=True)
    e = z.exp()  # ExpBackward saves its output e, which rope then rotates in place
    q, k = RoPEFunction.apply(e, torch.randn(1, 1, 3, 64), cos, sin, None, "bhtd")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        q.sum().backward()


def test_public_dispatch_and_errors():
    cos, sin = rope_cos_sin(_config(), 16)
    q, k = torch.randn(1, 2, 3, 64), torch.randn(1, 1, 3, 64)
    out = rope(q, k, cos, sin)
    assert out[0] is not q and torch.equal(out[0], rope_reference(q, k, cos, sin)[0])
    with pytest.raises(ValueError, match="layout"):
        RoPEFunction.apply(q.clone(), k.clone(), cos, sin, None, "bhdt")
    with pytest.raises(ValueError, match="position_ids shape"):
        RoPEFunction.apply(q.clone(), k.clone(), cos, sin, torch.zeros(1, 4, dtype=torch.long), "bhtd")
    with pytest.raises(ValueError, match="leaf"):
        RoPEFunction.apply(q.clone().requires_grad_(), k.clone(), cos, sin, None, "bhtd")
    with pytest.raises(ValueError, match="int32/int64"):
        RoPEFunction.apply(q.clone(), k.clone(), cos, sin, torch.zeros(1, 3), "bhtd")
    with pytest.raises(ValueError, match="R even"):
        RoPEFunction.apply(q.clone(), k.clone(), cos[:, :63], sin[:, :63], None, "bhtd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("case", [(2, 32, 8, 4096, 128, 128, "llama3"), (1, 16, 16, 2048, 256, 64, "random")],
                         ids=["llama8b", "partial"])
def test_gpu_matches_truth(case, layout, dtype):
    test_kernel_matches_truth(case, layout, dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tables_ignore_autocast(dtype):
    """Tables built inside a training step (bf16 autocast on) must equal fp32 ones: HF's rotary module
    disables autocast; rounding position x frequency to 8 bits moved angles by radians at 2048."""
    cfg = _config(64, None, max_pos=4096)
    want = rope_cos_sin(cfg, 2048)
    with torch.autocast("cpu", dtype=dtype):
        got = rope_cos_sin(cfg, 2048)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
