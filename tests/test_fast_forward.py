"""Parity of velotune's fast forward with the unpatched HF forward, per family (fp32, CPU).

The fast path on CPU runs the kernels' torch references and the fused LoRA autograd Functions;
on GPU (tests marked gpu) the compiled Triton kernels. Compared: loss, logits, every LoRA gradient,
and a short training run step by step.
"""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import FAMILIES, randomize_lora_b
from velotune import FastLanguageModel
from velotune.models import set_fast_forward

RTOL = 1e-4  # fp32: the fused functions reassociate sums (dA, dB, dx); measured max rel diff ~1e-6
ATOL = 1e-6


def _model(tiny_dir, family, load_in_4bit, **kw):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), load_in_4bit=load_in_4bit, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3, **kw)
    randomize_lora_b(model, seed=11, std=0.1)
    return model, tok


def _run(model, fast: bool, batch: dict, labels):
    set_fast_forward(model, fast)
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _batch(tok, pad_side="right"):
    tok.padding_side = pad_side
    texts = ["The capital of France is Paris, and the capital of Italy is Rome.",
             "Add the two numbers: 12 and 30."]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]), labels


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_match_hf(tiny_dir, family, load_in_4bit):
    model, tok = _model(tiny_dir, family, load_in_4bit)
    model.train()
    batch, labels = _batch(tok)
    loss_hf, g_hf = _run(model, False, batch, labels)
    loss_fast, g_fast = _run(model, True, batch, labels)
    torch.testing.assert_close(loss_fast, loss_hf, rtol=RTOL, atol=ATOL)
    assert set(g_fast) == set(g_hf) and len(g_hf) == 2 * 2 * 7  # A and B of 7 projections x 2 layers
    for n in g_hf:
        assert g_hf[n].abs().sum() > 0, n
        torch.testing.assert_close(g_fast[n], g_hf[n], rtol=RTOL, atol=ATOL, msg=n)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padding_gc_and_eval_logits(tiny_dir, family):
    model, tok = _model(tiny_dir, family, True, use_gradient_checkpointing=True)
    model.train()
    batch, labels = _batch(tok, pad_side="left")  # needs a real mask, not plain causal
    loss_hf, g_hf = _run(model, False, batch, labels)
    loss_fast, g_fast = _run(model, True, batch, labels)
    torch.testing.assert_close(loss_fast, loss_hf, rtol=RTOL, atol=ATOL)
    for n in g_hf:
        torch.testing.assert_close(g_fast[n], g_hf[n], rtol=RTOL, atol=ATOL, msg=n)
    model.eval()
    batch, labels = _batch(tok)
    with torch.no_grad():
        set_fast_forward(model, False)
        ref = model(**batch, labels=labels)
        set_fast_forward(model, True)
        got = model(**batch, labels=labels)
        plain = model(**batch)  # no labels: logits only
    torch.testing.assert_close(got.loss, ref.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.logits, ref.logits, rtol=RTOL, atol=1e-5)  # padded positions too (eval mask)
    torch.testing.assert_close(plain.logits, ref.logits, rtol=RTOL, atol=1e-5)


def test_unfused_projections_still_match(tiny_dir):
    """lora_dropout > 0 takes the module path for projections; bias='all' trains base biases."""
    model, tok = _model(tiny_dir, "qwen2", False, lora_dropout=0.1, bias="all")  # qwen2: q/k/v biases
    model.eval()  # dropout off so both paths are deterministic; grads still flow in eval mode
    batch, labels = _batch(tok)
    loss_hf, g_hf = _run(model, False, batch, labels)
    loss_fast, g_fast = _run(model, True, batch, labels)
    torch.testing.assert_close(loss_fast, loss_hf, rtol=RTOL, atol=ATOL)
    assert any(".bias" in n for n in g_hf)
    for n in g_hf:
        torch.testing.assert_close(g_fast[n], g_hf[n], rtol=RTOL, atol=ATOL, msg=n)


def test_training_run_matches_hf_step_by_step(tiny_dir):
    """20 AdamW steps from the same init: the fast path follows HF's loss curve."""
    def curve(fast: bool):
        model, tok = _model(tiny_dir, "llama", True)
        set_fast_forward(model, fast)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch, labels = _batch(tok)
        losses = []
        for _ in range(20):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    hf, fast = curve(False), curve(True)
    for i, (a, b) in enumerate(zip(fast, hf)):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-5, f"step {i}: fast {a} vs hf {b}"
    assert fast[-1] < 0.9 * fast[0]  # it trains (random tiny model, LoRA r8: ~13% in 20 steps)


def test_generation_uses_hf_path(tiny_dir):
    model, tok = _model(tiny_dir, "llama", True)
    FastLanguageModel.for_inference(model)
    enc = tok(["Add the two numbers."], return_tensors="pt")
    set_fast_forward(model, True)
    a = model.generate(**enc, max_new_tokens=5, do_sample=False)
    set_fast_forward(model, False)
    b = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_autocast_no_worse_than_hf(tiny_dir, family):
    """Under bf16 autocast (the Trainer's bf16=True) the fast path's error against an fp32 run of the
    same weights is no worse than HF's own bf16 error (here on CPU; GPU: test_fast_forward_gpu.py).
    Long enough (300 positions) that RoPE angles are sensitive to table precision."""
    import copy

    model, _ = FastLanguageModel.from_pretrained(tiny_dir(family), load_in_4bit=False, dtype=torch.bfloat16,
                                                 max_seq_length=512)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.05)
    model.train()
    ids = torch.randint(3, 500, (1, 300), generator=torch.Generator().manual_seed(1))

    def grads(m, fast, autocast):
        set_fast_forward(m, fast)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad}

    ref = grads(copy.deepcopy(model).float(), False, False)
    hf, fast = grads(model, False, True), grads(model, True, True)
    for n in ref:
        e_hf = ((hf[n] - ref[n]).norm() / ref[n].norm()).item()
        e_fast = ((fast[n] - ref[n]).norm() / ref[n].norm()).item()
        # 1.5x + 1e-2: fused LoRA runs A/B in bf16 where PEFT keeps them fp32 (measured <= 1.2x)
        assert e_fast <= 1.5 * e_hf + 1e-2, (n, e_fast, e_hf)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit", "4bit"])
def test_gemma2_matches_hf_eager(tiny_dir, load_in_4bit):
    """Gemma-2: sandwich norms, soft-capped attention logits and final logits, a sliding window on
    the first layer shorter than the batch, (1 + w) norms. HF's SDPA path skips the attention softcap,
    so the reference is HF's eager attention (what HF recommends for Gemma-2)."""
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("gemma2"), load_in_4bit=load_in_4bit,
                                                   max_seq_length=128, attn_implementation="eager")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.1)
    model.train()
    batch, labels = _batch(tok)
    assert batch["input_ids"].shape[1] > model.config.sliding_window
    loss_hf, g_hf = _run(model, False, batch, labels)
    loss_fast, g_fast = _run(model, True, batch, labels)
    torch.testing.assert_close(loss_fast, loss_hf, rtol=RTOL, atol=ATOL)
    assert len(g_hf) == 2 * 2 * 7
    for n in g_hf:
        assert g_hf[n].abs().sum() > 0, n
        torch.testing.assert_close(g_fast[n], g_hf[n], rtol=RTOL, atol=ATOL, msg=n)
    # the caps matter for this model: without them the loss moves (so the test can see them)
    attn = model.get_base_model().model.layers[0].self_attn
    for layer in model.get_base_model().model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped, _ = _run(model, True, batch, labels)
    assert abs(uncapped - loss_hf) > 1e-3, (uncapped, loss_hf)
    assert attn.attn_logit_softcapping is None


def test_gemma2_eval_logits_and_packed_rows(tiny_dir):
    """Eval logits (final softcap applied) equal HF's; packed rows equal the same examples padded."""
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("gemma2"), load_in_4bit=False, max_seq_length=128,
                                                   attn_implementation="eager")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.1)
    model.eval()
    batch, _ = _batch(tok)
    with torch.no_grad():
        set_fast_forward(model, False)
        hf = model(**batch).logits
        set_fast_forward(model, True)
        fast = model(**batch, labels=batch["input_ids"]).logits
    real = batch["attention_mask"].bool()
    assert hf.abs().max() <= 3.0 + 1e-5  # the final cap is in force
    torch.testing.assert_close(fast[real], hf[real], rtol=RTOL, atol=1e-5)
    model.train()
    ids = [tok(t)["input_ids"] for t in ("one two three four five six seven eight nine ten", "a b c d e f g h i")]
    packed = torch.tensor([ids[0] + ids[1]])
    pos = torch.tensor([list(range(len(ids[0]))) + list(range(len(ids[1])))])
    lab = packed.clone()
    lab[0, len(ids[0])] = -100  # no label across the boundary
    set_fast_forward(model, True)
    loss_packed = model(input_ids=packed, position_ids=pos, labels=lab).loss
    losses, counts = [], []
    for seq in ids:
        t = torch.tensor([seq])
        out = model(input_ids=t, labels=t)
        losses.append(out.loss * (len(seq) - 1))
        counts.append(len(seq) - 1)
    torch.testing.assert_close(loss_packed, sum(losses) / sum(counts), rtol=1e-5, atol=1e-6)


def test_gemma2_loads_with_exact_attention_by_default(tiny_dir, notices, monkeypatch):
    from velotune import _notices

    monkeypatch.setattr(_notices, "_said", set())  # said once per process: other tests load Gemma-2 too
    model, _ = FastLanguageModel.from_pretrained(tiny_dir("gemma2"), load_in_4bit=False, max_seq_length=128)
    assert model.config._attn_implementation == "eager"
    assert any("soft-caps its attention logits" in m for m in notices)
    llama, _ = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=False, max_seq_length=128)
    assert llama.config._attn_implementation == "sdpa"
