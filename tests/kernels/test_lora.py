"""Fused LoRA Functions vs their plain-autograd references: outputs and every gradient, both base kinds.

Check (STYLE.md 3): ground truth is the reference in float64; a Function at dtype d passes when
``err(fn_d) <= err(reference_d) + TOL[d]``, errors as max-abs over the magnitude of the summed terms
(CPU, fp64/fp32) or as relative Frobenius norms (GPU, bf16, large well-conditioned shapes).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from velotune.kernels import lora as L
from velotune.kernels import nf4 as K

bnb = pytest.importorskip("bitsandbytes")
from velotune.quant import NF4Weight  # noqa: E402

# Errors against the float64 truth, over the magnitude of the summed terms (see _err_max). Measured on this
# suite's CPU cases, the Function's excess over torch's own error at the same dtype is <= 1.1e-16 in fp64
# and <= 3.7e-8 in fp32 (0.3 ulp); the tolerances allow ~100x (fp64) and ~10x (fp32, 3.4 ulp).
# bf16 (GPU, relative Frobenius norm vs truth): measured on CPU bf16 at T=512, H=512, I=1792, r=16, ours
#       6.3-6.9e-3 and torch 6.8-7.4e-3; 2e-3 lets ours be up to half a bf16 ulp worse on another card.
TOL = {torch.float64: 1e-14, torch.float32: 4e-7, torch.bfloat16: 2e-3}
# Direct comparisons of two same-dtype results (no float64 oracle), relative to max|result|: two fp32
# associations of the same math differ by <= 8.3e-7 here (PEFT vs ours, dB of down_proj, T=7).
SAME_DTYPE_TOL = {torch.float64: 1e-13, torch.float32: 5e-6}
CPU_DTYPES = [torch.float64, torch.float32]
RSLORA = 16 / math.sqrt(8)  # lora_alpha 16, r 8 with use_rslora=True


def _seed(*case) -> None:
    torch.manual_seed(zlib.crc32(repr(case).encode()))  # fresh, reproducible inputs per case


def _linear4bit(out_f, in_f, nested=True, device="cpu", dtype=torch.float32):
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compress_statistics=nested, quant_type="nf4")
    m.weight.data = m.weight.data.to(dtype)
    m.support_avx512bf16_for_cpu = False  # never let bnb repack for its CPU inference path
    return m.to(device)


def _base(kind, out_f, in_f, dtype, device="cpu"):
    if kind == "nf4":  # bnb quantises 16/32-bit weights only; fp64 tests dequantise fp32 then cast
        wdt = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        return NF4Weight.from_bnb(_linear4bit(out_f, in_f, device=device, dtype=wdt))
    return torch.randn(out_f, in_f, dtype=dtype, device=device) / math.sqrt(in_f)


def _proj(kind, out_f, in_f, r, scaling, dtype, device="cpu", adapter_dtype=None):
    """(base, A, B, scaling); B is non-zero (unlike PEFT's init) so that dA is non-trivial."""
    adt = adapter_dtype or dtype
    base = _base(kind, out_f, in_f, dtype, device)
    if r == 0:
        return (base, None, None, scaling)
    A = (torch.randn(r, in_f, dtype=adt, device=device) / math.sqrt(in_f)).requires_grad_()
    B = (torch.randn(out_f, r, dtype=adt, device=device) / math.sqrt(r)).requires_grad_()
    return (base, A, B, scaling)


def _as(proj, dtype):
    """A copy of a projection in ``dtype``: bases dequantised to a plain frozen tensor, fresh leaves."""
    base, A, B, s = proj
    w = base if isinstance(base, torch.Tensor) else base.dequantize()
    w = w.detach().to(dtype)
    if A is None:
        return (w, None, None, s)
    return (w, A.detach().to(dtype).requires_grad_(), B.detach().to(dtype).requires_grad_(), s)


def _fresh(proj):
    base, A, B, s = proj
    if A is None:
        return proj
    return (base, A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(), s)


def _run(fn, x, projs, dys, **kw):
    """Outputs and the grads of x and every A, B (None-adapters skipped)."""
    x = x.detach().clone().requires_grad_()
    outs = fn(x, *projs, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [d.to(o.dtype) for o, d in zip(outs, dys)])
    grads = [t.grad for p in projs for t in p[1:3] if t is not None]
    assert all(g is not None for g in grads)
    return [o.detach() for o in outs] + [x.grad] + grads


def _abs(proj):
    base, A, B, s = _as(proj, torch.float64)
    if A is None:
        return (base.abs(), None, None, abs(s))
    return (base.abs(), A.detach().abs().requires_grad_(), B.detach().abs().requires_grad_(), abs(s))


def _err_max(a, truth, scale):
    """Max abs error over the magnitude of the summed terms (the |a|.|b| of the dot-product error bound):
    relative to max|truth| instead, a cancelling sum (e.g. dA at tokens=1, r=1: one dot product times x)
    would turn rounding noise into large relative errors."""
    return ((a.double() - truth).abs().max() / scale.abs().max().clamp_min(1e-300)).item()


def _rel_max(a, b):
    """Direct comparison of two same-dtype results (no float64 oracle)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def _err_norm(a, truth, scale):
    return ((a.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def _check(fn, ref_fn, x, projs, dys, dtype, err=_err_max, **kw):
    """Function at dtype vs reference at dtype, both against the float64 reference."""
    truth = _run(ref_fn, x.double(), [_as(p, torch.float64) for p in projs], dys, **kw)
    scale = _run(ref_fn, x.double().abs(), [_abs(p) for p in projs], [d.double().abs() for d in dys], **kw)
    ref = _run(ref_fn, x.to(dtype), [_fresh(p) for p in projs], dys, **kw)
    got = _run(fn, x.to(dtype), [_fresh(p) for p in projs], dys, **kw)
    assert len(got) == len(ref) == len(truth)
    for i, (g, r, t, m) in enumerate(zip(got, ref, truth, scale)):
        assert g.dtype == r.dtype and g.shape == r.shape, i
        assert torch.isfinite(g).all(), i
        e_got, e_ref = err(g, t, m), err(r, t, m)
        assert e_got <= e_ref + TOL[dtype], f"output/grad #{i}: err {e_got:.3e} > torch {e_ref:.3e} + {TOL[dtype]}"


def _linear(x, proj):
    return L.lora_linear(x, *proj)


def _linear_ref(x, proj):
    return L.lora_linear_reference(x, *proj)


# (tokens, in, out, r, scaling): tokens 1/7/37, odd and even sizes 64..507, r 1/8/16, rsLoRA-like scaling
LINEAR_CASES = [(1, 64, 507, 1, 2.0), (7, 123, 64, 8, RSLORA), (37, 507, 123, 16, 0.5), (37, 96, 40, 16, 1.0)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "T{}_{}x{}_r{}".format(*c))
def test_lora_linear(case, kind, dtype):
    _seed(case, kind, dtype)
    T, in_f, out_f, r, s = case
    proj = _proj(kind, out_f, in_f, r, s, dtype)
    x = torch.randn(T, in_f, dtype=dtype)
    _check(_linear, _linear_ref, x, [proj], [torch.randn(T, out_f, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_lora_linear_bias_and_3d_input(dtype):
    _seed(dtype)
    base, A, B, s = _proj("dense", 64, 123, 8, RSLORA, dtype)
    bias = torch.randn(64, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 7, 123, dtype=dtype, requires_grad=True)
    y = L.lora_linear(x, base, A, B, s, bias)
    assert y.shape == (2, 7, 64)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [y.detach(), x.grad, A.grad, B.grad, bias.grad]
    for t in (x, A, B, bias):
        t.grad = None
    y = L.lora_linear_reference(x, base, A, B, s, bias)
    y.backward(dy)
    for g, r in zip(got, [y.detach(), x.grad, A.grad, B.grad, bias.grad]):
        assert _rel_max(g, r) <= SAME_DTYPE_TOL[dtype]


# (tokens, hidden, q_out, kv_out, (rq, rk, rv)); r 0 = no adapter on that projection
QKV_CASES = [(1, 64, 64, 16, (8, 1, 16)), (7, 123, 123, 41, (16, 16, 16)), (37, 96, 96, 32, (8, 8, 0))]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: "T{}_h{}_q{}_kv{}".format(*c))
def test_lora_qkv(case, kind, dtype):
    _seed(case, kind, dtype)
    T, hid, q_out, kv_out, ranks = case
    outs = (q_out, kv_out, kv_out)
    projs = [_proj(kind, o, hid, r, s, dtype) for o, r, s in zip(outs, ranks, (2.0, RSLORA, 0.5))]
    dys = [torch.randn(T, o, dtype=dtype) for o in outs]
    _check(L.lora_qkv, L.lora_qkv_reference, torch.randn(T, hid, dtype=dtype), projs, dys, dtype)


# (tokens, hidden, intermediate, r)
MLP_CASES = [(1, 64, 123, 1), (7, 123, 256, 8), (37, 96, 507, 16)]


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "T{}_h{}_i{}_r{}".format(*c))
def test_lora_mlp(case, kind, dtype, activation):
    _seed(case, kind, dtype, activation)
    T, hid, inter, r = case
    projs = [_proj(kind, inter, hid, r, 2.0, dtype), _proj(kind, inter, hid, r, RSLORA, dtype),
             _proj(kind, hid, inter, r, 0.5, dtype)]
    _check(L.lora_mlp, L.lora_mlp_reference, torch.randn(T, hid, dtype=dtype), projs,
           [torch.randn(T, hid, dtype=dtype)], dtype, activation=activation)


def test_lora_mlp_partial_adapters_and_fp32_adapters_with_bf16_input():
    """No adapter on up; bf16 activations with fp32 LoRA weights (PEFT's default) keep fp32 grads."""
    _seed("partial")
    projs = [_proj("nf4", 96, 64, 8, 2.0, torch.bfloat16, adapter_dtype=torch.float32),
             _proj("nf4", 96, 64, 0, 1.0, torch.bfloat16),
             _proj("nf4", 64, 96, 8, 0.5, torch.bfloat16, adapter_dtype=torch.float32)]
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    got = _run(L.lora_mlp, x, [_fresh(p) for p in projs], [torch.randn(7, 64)])
    ref = _run(L.lora_mlp_reference, x, [_fresh(p) for p in projs], [torch.randn(7, 64)])
    assert [t.dtype for t in got] == [t.dtype for t in ref] == [torch.bfloat16] * 2 + [torch.float32] * 4
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_lora_mlp_without_output_keeps_every_gradient(kind, dtype, monkeypatch):
    """need_output=False (a checkpoint's recompute, models/recompute.py): the down projection is not run
    (its base weight never read), the output is zeros of the right shape, and the gradients of x and of
    every A and B equal, bit for bit, those of the full forward backpropagating the same dy."""
    _seed("no-output", kind, dtype)
    T, hid, inter = 37, 96, 507
    projs = [_proj(kind, inter, hid, 8, 2.0, dtype), _proj(kind, inter, hid, 16, RSLORA, dtype),
             _proj(kind, hid, inter, 8, 0.5, dtype)]
    x, dy = torch.randn(T, hid, dtype=dtype), torch.randn(T, hid, dtype=dtype)
    full = _run(L.lora_mlp, x, [_fresh(p) for p in projs], [dy])
    bases = []
    real = L._linear
    monkeypatch.setattr(L, "_linear", lambda x2, base, *a: bases.append(base) or real(x2, base, *a))
    part = _run(L.lora_mlp, x, [_fresh(p) for p in projs], [dy], need_output=False)
    assert all(b is not projs[2][0] for b in bases) and len(bases) == 2  # gate and up only
    assert part[0].shape == full[0].shape and not part[0].any()
    for got, want in zip(part[1:], full[1:]):
        assert torch.equal(got, want)


def test_base_weight_gets_no_grad_and_is_untouched():
    _seed("frozen")
    dense = _proj("dense", 64, 96, 8, 2.0, torch.float32)
    m = _linear4bit(64, 96)
    nf4 = (NF4Weight.from_bnb(m),) + _proj("dense", 64, 96, 8, 2.0, torch.float32)[1:]
    packed_before, dense_before = m.weight.data.clone(), dense[0].clone()
    x = torch.randn(7, 96, requires_grad=True)
    for proj in (dense, nf4):
        L.lora_linear(x, *proj).sum().backward()
        L.lora_qkv(x, proj, proj, proj)[1].sum().backward()
    down = _proj("dense", 96, 64, 8, 1.0, torch.float32)
    L.lora_mlp(x, dense, nf4, down).sum().backward()
    assert dense[0].grad is None and m.weight.grad is None
    assert torch.equal(dense[0], dense_before) and torch.equal(m.weight.data, packed_before)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (*dense[1:3], *nf4[1:3], x))


def test_trainable_base_is_rejected():
    base, A, B, s = _proj("dense", 64, 96, 8, 2.0, torch.float32)
    with pytest.raises(ValueError, match="requires grad"):
        L.lora_linear(torch.randn(3, 96), base.requires_grad_(), A, B, s)


def test_argument_errors():
    base, A, B, s = _proj("dense", 64, 96, 8, 2.0, torch.float32)
    x = torch.randn(3, 96)
    with pytest.raises(ValueError, match="input features"):
        L.lora_linear(torch.randn(3, 95), base, A, B, s)
    with pytest.raises(ValueError, match="both LoRA A and B"):
        L.lora_linear(x, base, A, None, s)
    with pytest.raises(ValueError, match="do not fit"):
        L.lora_linear(x, base, A, B[:, :4], s)
    with pytest.raises(ValueError, match="float64"):
        L.lora_linear(x.double(), base, A, B, s)
    with pytest.raises(TypeError, match="scaling"):
        L.lora_linear(x, base, A, B, torch.tensor(2.0))
    with pytest.raises(ValueError, match="relu"):
        L.lora_mlp(x, (base, A, B, s), (base, A, B, s), (base.t().contiguous(), None, None, 1.0), "relu")


def test_buffers_written_in_place_are_fully_written(monkeypatch):
    """Every internal buffer filled in place starts as NaN: any element left unwritten would show."""
    monkeypatch.setattr(L, "_empty", lambda shape, like: torch.full(tuple(shape), float("nan"),
                                                                      dtype=like.dtype, device=like.device))
    _seed("poison")
    dt = torch.float64
    gate, up = _proj("nf4", 123, 64, 8, 2.0, dt), _proj("dense", 123, 64, 16, RSLORA, dt)
    down = _proj("dense", 64, 123, 4, 0.5, dt)
    x, dy = torch.randn(7, 64, dtype=dt), torch.randn(7, 64, dtype=dt)
    _check(L.lora_mlp, L.lora_mlp_reference, x, [gate, up, down], [dy], dt)
    _check(L.lora_qkv, L.lora_qkv_reference, x, [gate, up, _proj("dense", 16, 64, 1, 1.0, dt)],
           [torch.randn(7, 123, dtype=dt)] * 2 + [torch.randn(7, 16, dtype=dt)], dt)
    _check(_linear, _linear_ref, x, [gate], [torch.randn(7, 123, dtype=dt)], dt)


def test_glu_backward_chunking(monkeypatch):
    """The torch GLU backward runs in row chunks; chunk boundaries must not change the result."""
    _seed("chunks")
    projs = [_proj("dense", 123, 64, 8, 2.0, torch.float32), _proj("dense", 123, 64, 8, 1.0, torch.float32),
             _proj("dense", 64, 123, 8, 0.5, torch.float32)]
    x, dy = torch.randn(37, 64), torch.randn(37, 64)
    whole = _run(L.lora_mlp, x, [_fresh(p) for p in projs], [dy])
    monkeypatch.setattr(L, "_GLU_CHUNK_ELEMS", 5 * 123)  # 5 rows per chunk, the last one partial
    chunked = _run(L.lora_mlp, x, [_fresh(p) for p in projs], [dy])
    # Not bit-exact on CPU: torch's vectorised sigmoid/exp and their scalar tail differ in the last ulp
    # (torch.sigmoid over 5-row chunks != over the whole tensor), so moving the tail moves ulps.
    # Measured 8.7e-9 relative (dx); fp32 eps is 1.2e-7.
    assert all(_rel_max(a, b) <= 1.2e-7 for a, b in zip(whole, chunked))


def test_autocast_runs_in_autocast_dtype():
    """Under torch.autocast (HF Trainer bf16), fp32 activations are computed in bf16 like nn.Linear;
    grads come back in each leaf's dtype."""
    _seed("autocast")
    proj = _proj("nf4", 96, 64, 8, 2.0, torch.float32)
    x = torch.randn(7, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.lora_linear(x, *proj)
        y_ref = L.lora_linear_reference(x.to(torch.bfloat16), *proj)
        q, k, v = L.lora_qkv(x, proj, proj, proj)
        m = L.lora_mlp(x, proj, proj, _proj("dense", 64, 96, 8, 1.0, torch.bfloat16))
    assert y.dtype == q.dtype == m.dtype == torch.bfloat16
    # two bf16 computations of the same thing: within a few bf16 ulps (2**-8 = 3.9e-3) in norm
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward called inside autocast too
        (y.float().sum() + q.float().sum() + m.float().sum()).backward()
    assert x.grad.dtype == torch.float32 and proj[1].grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(proj[1].grad).all()


def test_second_backward_through_mlp_raises():
    """Backward overwrites the saved gate/up activations: reusing the graph must fail loudly."""
    projs = [_proj("dense", 96, 64, 8, 2.0, torch.float32), _proj("dense", 96, 64, 8, 2.0, torch.float32),
             _proj("dense", 64, 96, 8, 2.0, torch.float32)]
    y = L.lora_mlp(torch.randn(5, 64, requires_grad=True), *projs)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ours,hf", [("silu", "silu"), ("swish", "swish"), ("gelu", "gelu"),
                                     ("gelu_tanh", "gelu_pytorch_tanh"), ("gelu_pytorch_tanh", "gelu_pytorch_tanh")])
def test_activation_matches_hf(ours, hf, dtype):
    """Forward bit-identical to HF's ACT2FN[hidden_act](gate) * up; backward formula vs autograd in fp64."""
    from transformers.activations import ACT2FN

    g, u = torch.randn(37, 507, dtype=dtype) * 4, torch.randn(37, 507, dtype=dtype)
    assert torch.equal(L._glu_forward(g, u, ours), ACT2FN[hf](g) * u)
    g64 = (torch.randn(1000, dtype=torch.float64) * 6).requires_grad_()
    act, dact = L._ACTIVATIONS[ours][1](g64.detach())
    (auto,) = torch.autograd.grad(ACT2FN[hf](g64).sum(), g64)
    assert torch.allclose(act, ACT2FN[hf](g64.detach()), rtol=1e-13, atol=1e-15)
    assert torch.allclose(dact, auto, rtol=1e-12, atol=1e-14)


def test_matches_peft_on_bnb_linear4bit():
    """Integration oracle: PEFT's LoRA over bitsandbytes' Linear4bit (its dequant + matmul), fp32 on CPU."""
    peft = pytest.importorskip("peft")
    _seed("peft")
    hid, inter, T = 128, 256, 7  # multiples of 64: bnb's native CPU dequant is right for these

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = _linear4bit(inter, hid)
            self.up_proj = _linear4bit(inter, hid, nested=False)
            self.down_proj = _linear4bit(hid, inter)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    cfg = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                          target_modules=["gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(MLP(), cfg)
    mods = {n: getattr(model.base_model.model, n) for n in ("gate_proj", "up_proj", "down_proj")}
    for m in mods.values():
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)  # PEFT inits B to 0: make dA non-zero
    x = torch.randn(T, hid, requires_grad=True)
    dy = torch.randn(T, hid)
    model(x).backward(dy)
    lora_params = [p for m in mods.values() for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    expected = [x.grad.clone()] + [p.grad.clone() for p in lora_params]
    y_peft = model(x).detach()
    x.grad = None
    for p in lora_params:
        p.grad = None
    projs = [(NF4Weight.from_bnb(m.base_layer), m.lora_A["default"].weight, m.lora_B["default"].weight,
              m.scaling["default"]) for m in mods.values()]
    y = L.lora_mlp(x, *projs)
    y.backward(dy)
    got = [x.grad] + [p.grad for p in lora_params]
    assert _rel_max(y.detach(), y_peft) <= SAME_DTYPE_TOL[torch.float32]
    for g, e in zip(got, expected):
        assert _rel_max(g, e) <= SAME_DTYPE_TOL[torch.float32]


def test_triton_dequant_inside_lora(monkeypatch):
    """The CUDA dispatch (Triton dequant) run through the interpreter gives bit-identical results."""
    if K.triton is None:
        pytest.skip("triton is not installed")
    _seed("triton")
    proj = _proj("nf4", 123, 64, 8, 2.0, torch.float32)
    x, dy = torch.randn(7, 64), torch.randn(7, 123)
    expected = _run(_linear, x, [_fresh(proj)], [dy])
    monkeypatch.setattr(K, "use_triton", lambda t: True)
    got = _run(_linear, x, [_fresh(proj)], [dy])
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


# ---------------------------------------------------------------------------------------------------
# GPU, Llama-3.1-8B shapes (hidden 4096, intermediate 14336, 32 q heads / 8 kv heads x 128), bf16, r 16
# ---------------------------------------------------------------------------------------------------

def _gpu_check(fn, ref_fn, x, projs, dys, **kw):
    _check(fn, ref_fn, x, projs, dys, torch.bfloat16, err=_err_norm, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_gpu_lora_mlp_llama8b(kind):
    _seed("gpu-mlp", kind)
    T, hid, inter, dt = 4096, 4096, 14336, torch.bfloat16
    projs = [_proj(kind, inter, hid, 16, 1.0, dt, "cuda", torch.float32),
             _proj(kind, inter, hid, 16, 1.0, dt, "cuda", torch.float32),
             _proj(kind, hid, inter, 16, 1.0, dt, "cuda", torch.float32)]
    x = torch.randn(T, hid, device="cuda")
    _gpu_check(L.lora_mlp, L.lora_mlp_reference, x, projs, [torch.randn(T, hid, device="cuda")])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_gpu_lora_qkv_llama8b(kind):
    _seed("gpu-qkv", kind)
    T, hid, dt = 4096, 4096, torch.bfloat16
    outs = (4096, 1024, 1024)
    projs = [_proj(kind, o, hid, 16, 2.0, dt, "cuda", torch.float32) for o in outs]
    dys = [torch.randn(T, o, device="cuda") for o in outs]
    _gpu_check(L.lora_qkv, L.lora_qkv_reference, torch.randn(T, hid, device="cuda"), projs, dys)


@pytest.mark.gpu
def test_gpu_lora_linear_o_proj_nf4():
    _seed("gpu-o")
    proj = _proj("nf4", 4096, 4096, 16, RSLORA, torch.bfloat16, "cuda", torch.float32)
    _gpu_check(_linear, _linear_ref, torch.randn(4096, 4096, device="cuda"), [proj],
               [torch.randn(4096, 4096, device="cuda")])
