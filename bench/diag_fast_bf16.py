"""Diagnose bf16 gradient error of the fast forward, component by component (CUDA).

For a mid-size random Llama with LoRA (bf16 base, fp32 adapters), prints the relative error against
an fp32 HF reference of: HF bf16; the fast path; and the fast path with one component swapped for
its torch reference (RoPE, RMSNorm, cross-entropy, fused LoRA -> PEFT modules, GQA -> repeat_kv,
checkpointing off). The component whose swap removes the excess error is the culprit.

    python bench/diag_fast_bf16.py
"""
from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(path, family="llama", qk=False):
    import transformers

    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer()
    cls = {"llama": "LlamaConfig", "qwen3": "Qwen3Config"}[family]
    cfg = getattr(transformers, cls)(vocab_size=len(tok), hidden_size=512, intermediate_size=1408,
                                     num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)


def lora(path, gc=True):
    from velotune import FastLanguageModel

    m, _ = FastLanguageModel.from_pretrained(path, dtype=torch.bfloat16, load_in_4bit=False, max_seq_length=1024)
    m = FastLanguageModel.get_peft_model(m, r=16, lora_alpha=16, use_gradient_checkpointing=gc)
    g = torch.Generator(device="cuda").manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.02)
    return m.train()


def step(m, ids, fast, autocast=True):
    from velotune.models import set_fast_forward

    set_fast_forward(m, fast)
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.double().clone() for n, p in m.named_parameters() if p.requires_grad}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@contextlib.contextmanager
def swapped(name):
    import velotune.models.decoder as D
    from velotune.kernels import cross_entropy, rms_norm, rope

    saved = {}

    def put(attr, val):
        saved[attr] = getattr(D, attr)
        setattr(D, attr, val)

    if name == "rope_ref":
        put("rope", rope.rope_reference)
    elif name == "rmsnorm_ref":
        put("rms_norm", rms_norm.rms_norm_reference)
    elif name == "ce_ref":
        put("linear_cross_entropy", lambda h, w, lab, **kw: cross_entropy.linear_cross_entropy_reference(
            h.reshape(-1, h.shape[-1]).to(torch.bfloat16), w.to(torch.bfloat16), lab.reshape(-1), -100,
            kw.get("softcap"), kw.get("num_items_in_batch")))
    elif name == "peft_modules":
        put("projection", lambda mod: None)
    elif name == "repeat_kv":
        orig = torch.nn.functional.scaled_dot_product_attention

        def sdpa(q, k, v, enable_gqa=False, **kw):
            if enable_gqa:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return orig(q, k, v, **kw)

        put("F", type("F", (), {"scaled_dot_product_attention": staticmethod(sdpa), "pad": torch.nn.functional.pad,
                                "cross_entropy": torch.nn.functional.cross_entropy}))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(D, k, v)


def main():
    for family in ("llama", "qwen3"):
        with tempfile.TemporaryDirectory() as d:
            build(d, family)
            m = lora(d)
            ids = torch.randint(3, 500, (2, 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            ref_m = copy.deepcopy(m).float()
            lref, gref = step(ref_m, ids, False, autocast=False)
            del ref_m
            rows = []
            lhf, ghf = step(m, ids, False)
            rows.append(("hf_bf16", lhf, ghf))
            for name in ("fast", "rope_ref", "rmsnorm_ref", "ce_ref", "peft_modules", "repeat_kv"):
                with swapped(name):
                    lf, gf = step(m, ids, True)
                rows.append((name, lf, gf))
            m_nogc = lora(d, gc=False)
            rows.append(("fast_no_gc", *step(m_nogc, ids, True)))
            q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            v = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"
            print(f"== {family}: fp32 ref loss {lref:.6f}")
            for name, l, g in rows:
                errs = [rel(g[n], gref[n]) for n in gref]
                print(f"{name:14s} loss_err {abs(l - lref):.2e}  q0.A {rel(g[q], gref[q]):.4f}  v0.B {rel(g[v], gref[v]):.4f}"
                      f"  median {sorted(errs)[len(errs) // 2]:.4f}  max {max(errs):.4f}")




def attention_backends():
    """Which SDPA backend / input layout explains the excess error? (run: python bench/diag_fast_bf16.py sdpa)"""
    import velotune.models.decoder as D
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("float32 matmul precision:", torch.get_float32_matmul_precision(),
          "allow_tf32:", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    orig = torch.nn.functional.scaled_dot_product_attention

    def contiguous_sdpa(q, k, v, **kw):
        return orig(q.contiguous(), k.contiguous(), v.contiguous(), **kw)

    for family in ("llama", "qwen3"):
        with tempfile.TemporaryDirectory() as d:
            build(d, family)
            m = lora(d)
            ids = torch.randint(3, 500, (2, 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            # HF's rotary vs our tables, on this device
            base = m.get_base_model()
            hc, hs = base.model.rotary_emb(torch.zeros(1, 1, device="cuda", dtype=torch.float32),
                                           torch.arange(1000, device="cuda")[None])
            cos, sin = D._rope_tables(base, base.config, 1000, torch.device("cuda"))
            print(f"{family}: rope table max diff vs HF fp32: cos {(hc[0] - cos[:1000]).abs().max().item():.2e} "
                  f"sin {(hs[0] - sin[:1000]).abs().max().item():.2e}")
            ref_m = copy.deepcopy(m).float()
            lref, gref = step(ref_m, ids, False, autocast=False)
            del ref_m
            q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            for name, ctx, fast in (("hf", contextlib.nullcontext(), False), ("fast", contextlib.nullcontext(), True),
                                    ("hf_flash", sdpa_kernel(SDPBackend.FLASH_ATTENTION), False),
                                    ("fast_flash", sdpa_kernel(SDPBackend.FLASH_ATTENTION), True),
                                    ("fast_efficient", sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), True),
                                    ("fast_cudnn", sdpa_kernel(SDPBackend.CUDNN_ATTENTION), True),
                                    ("hf_cudnn", sdpa_kernel(SDPBackend.CUDNN_ATTENTION), False)):
                try:
                    with ctx:
                        l, g = step(m, ids, fast)
                except RuntimeError as e:
                    print(f"{name:14s} failed: {str(e)[:100]}")
                    continue
                errs = [rel(g[n], gref[n]) for n in gref]
                print(f"{name:14s} loss_err {abs(l - lref):.2e} q0.A {rel(g[q], gref[q]):.4f} "
                      f"median {sorted(errs)[len(errs) // 2]:.4f} max {max(errs):.4f}")
            D.F.scaled_dot_product_attention = contiguous_sdpa  # module-level F is torch.nn.functional
            try:
                l, g = step(m, ids, True)
            finally:
                D.F.scaled_dot_product_attention = orig
            errs = [rel(g[n], gref[n]) for n in gref]
            print(f"{'fast_contig':14s} loss_err {abs(l - lref):.2e} q0.A {rel(g[q], gref[q]):.4f} "
                  f"median {sorted(errs)[len(errs) // 2]:.4f} max {max(errs):.4f}")


if __name__ == "__main__":
    attention_backends() if sys.argv[1:] == ["sdpa"] else main()
