"""The generation path of the fast forward (models/generation.py): HF generate's prefill and decode
steps through velotune's fused kernels, HF's cache, masks and attention function. Greedy outputs must
equal HF's own forward token for token (fp32, CPU), with and without left padding, per family."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import FAMILIES, randomize_lora_b
from velotune import FastLanguageModel
from velotune.models import generation, set_fast_forward

PROMPTS = ["The capital of France is", "Add the two numbers: 12 and 30. The answer"]


def _generate(model, enc, fast: bool, **kw):
    set_fast_forward(model, fast)
    calls = []
    real = generation.cached_forward

    def spy(*a, **k):
        calls.append(a[2].shape[1])  # tokens in this call
        return real(*a, **k)

    generation.cached_forward = spy
    try:
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, **kw)
    finally:
        generation.cached_forward = real
    return out, calls


@pytest.mark.parametrize("family", list(FAMILIES) + ["gemma2"])
def test_greedy_generation_matches_hf(tiny_dir, family):
    kw = {"attn_implementation": "eager"} if family == "gemma2" else {}
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), load_in_4bit=False, max_seq_length=128, **kw)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)  # an adapter that changes the outputs
    FastLanguageModel.for_inference(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # left padding in the batch
    hf, hf_calls = _generate(model, enc, fast=False)
    fast, calls = _generate(model, enc, fast=True)
    assert hf_calls == [] and calls[0] == enc["input_ids"].shape[1] and set(calls[1:]) == {1}
    assert torch.equal(fast, hf), (fast, hf)
    with model.disable_adapter():  # the adapter matters: without it the text differs
        base, _ = _generate(model, enc, fast=True)
    assert not torch.equal(base, hf)


def test_greedy_generation_matches_hf_4bit_and_single_prompt(tiny_dir):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=True, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)
    FastLanguageModel.for_inference(model)
    for prompts in (PROMPTS, PROMPTS[:1]):
        enc = tok(prompts, return_tensors="pt", padding=True)
        hf, _ = _generate(model, enc, fast=False)
        fast, calls = _generate(model, enc, fast=True)
        assert calls and torch.equal(fast, hf)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_cache_generation_matches_hf(tiny_dir, family):
    """generate(cache_implementation="static"): the cache counts its length on the device (a tensor); the
    fast path sizes its RoPE tables from the cache instead (it used to fail on the tensor). Gemma-2 has
    sliding-window layers, whose static cache is shorter than the positions."""
    kw = {"attn_implementation": "eager"} if family == "gemma2" else {}
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), load_in_4bit=False, max_seq_length=128, **kw)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)
    FastLanguageModel.for_inference(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    hf, _ = _generate(model, enc, fast=False, cache_implementation="static")
    fast, calls = _generate(model, enc, fast=True, cache_implementation="static")
    assert len(calls) == 12 and torch.equal(fast, hf), (fast, hf)
    dynamic, _ = _generate(model, enc, fast=True)
    assert torch.equal(dynamic, hf)


def test_recorded_decode_steps_match_hf(tiny_dir, monkeypatch):
    """Decode steps through models/decode_graphs.py (CPU emulation: a replay runs the recorded function on
    the static inputs only, so a tensor of the recording step read by mistake gives wrong tokens): greedy
    outputs equal HF's for several generate calls, 4-bit, with the cache reused between calls (replays),
    a new batch size (recorded again), and an adapter switched off (recorded again: other kernels)."""
    from velotune.models import decode_graphs

    monkeypatch.setattr(decode_graphs, "EMULATE_ON_CPU", True)
    made, replays = [], []
    real_init, real_call = decode_graphs.DecodeGraph.__init__, decode_graphs.DecodeGraph.__call__
    monkeypatch.setattr(decode_graphs.DecodeGraph, "__init__", lambda self, *a, **k: made.append(1) or real_init(self, *a, **k))
    monkeypatch.setattr(decode_graphs.DecodeGraph, "__call__", lambda self, *a: replays.append(1) or real_call(self, *a))
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=True, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)
    FastLanguageModel.for_inference(model)
    for prompts in (PROMPTS, PROMPTS[::-1], PROMPTS[:1]):
        enc = tok(prompts, return_tensors="pt", padding=True)
        hf, _ = _generate(model, enc, fast=False, cache_implementation="static")
        fast, _ = _generate(model, enc, fast=True, cache_implementation="static")
        assert torch.equal(fast, hf), (prompts, fast, hf)
    with model.disable_adapter():
        hf, _ = _generate(model, enc, fast=False, cache_implementation="static")
        fast, _ = _generate(model, enc, fast=True, cache_implementation="static")
        assert torch.equal(fast, hf)
    # 11 decode steps per call; recorded at the first of each new key, replayed for the rest
    assert len(replays) > 3 * 10 and 2 <= len(made) <= 4, (len(made), len(replays))


def test_for_inference_defaults_to_a_static_cache_where_steps_are_recorded(tiny_dir, monkeypatch, notices):
    """for_inference: where decode steps are recorded (here: the CPU emulation), generate defaults to a static
    cache and no torch.compile, said once; plain generate() then replays recorded steps and equals HF. Where
    they are not (CPU without emulation), the generation config is left as it was."""
    from velotune import _notices
    from velotune.models import decode_graphs

    monkeypatch.setattr(_notices, "_said", set())
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=False, max_seq_length=128)
    FastLanguageModel.for_inference(model)
    assert model.generation_config.cache_implementation is None
    monkeypatch.setattr(decode_graphs, "EMULATE_ON_CPU", True)
    FastLanguageModel.for_inference(model)
    assert model.generation_config.cache_implementation == "static" and model.generation_config.disable_compile
    assert any("cache_implementation=\"static\"" in m for m in notices)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    hf, _ = _generate(model, enc, fast=False)
    fast, _ = _generate(model, enc, fast=True)
    assert torch.equal(fast, hf) and "_velotune_decode_graph" in model.__dict__


@pytest.mark.real_model
def test_greedy_generation_matches_hf_on_the_real_model(real_model_dir):
    """The acceptance check of issue #7: SmolLM2-135M-Instruct, fp32, chat template, 40 new tokens."""
    model, tok = FastLanguageModel.from_pretrained(real_model_dir, load_in_4bit=False, max_seq_length=512)
    FastLanguageModel.for_inference(model)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    set_fast_forward(model, False)
    hf = model.generate(**enc, max_new_tokens=40, do_sample=False)
    set_fast_forward(model, True)
    fast = model.generate(**enc, max_new_tokens=40, do_sample=False)
    assert torch.equal(fast, hf), tok.batch_decode(fast[:, enc["input_ids"].shape[1]:])


def test_decode_with_the_4bit_matmul_kernel_matches_hf(tmp_path, monkeypatch):
    """Decode steps through the few-row 4-bit matmul (kernels/nf4_matmul.py, Triton's interpreter here) on a
    4-bit Llama whose widths the kernel takes: every decode-step projection goes through the kernel, and
    the greedy tokens equal HF's forward (bitsandbytes' own dequantise + matmul)."""
    import transformers

    from tests.tiny_models import make_tokenizer
    from velotune.kernels import nf4_matmul

    tok = make_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)
    FastLanguageModel.for_inference(model)
    rows = []
    real = nf4_matmul.nf4_matmul

    def spy(x2, w, **k):
        rows.append(x2.shape[0])
        return real(x2, w, **k)

    monkeypatch.setattr(nf4_matmul, "nf4_matmul", spy)
    monkeypatch.setattr(nf4_matmul, "ON_CPU", True)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    fast, calls = _generate(model, enc, fast=True)
    steps = len(calls) - 1  # decode steps (the prefill has more rows than the kernel takes)
    assert steps > 0 and rows == [2] * (7 * 2 * steps), rows[:20]  # 7 projections x 2 layers per step
    monkeypatch.setattr(nf4_matmul, "ON_CPU", False)
    hf, _ = _generate(model, enc, fast=False)
    assert torch.equal(fast, hf), (fast, hf)


def test_recorded_decode_records_again_for_replaced_weights(tiny_dir, monkeypatch):
    """The decode key reads every parameter's address through cached slots (decode_graphs.weight_pointers).
    Mid-generation (a logits processor, after the third step) a LoRA weight is replaced by a new Parameter,
    a weight's storage swapped (``.data =``), or a submodule replaced: the next step records again, and the
    tokens equal HF's forward under the same change (emulated graphs replay only what they recorded, so a
    stale recording would decode with the old weights)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from velotune.models import decode_graphs

    monkeypatch.setattr(decode_graphs, "EMULATE_ON_CPU", True)
    made = []
    real_init = decode_graphs.DecodeGraph.__init__
    monkeypatch.setattr(decode_graphs.DecodeGraph, "__init__", lambda self, *a, **k: made.append(1) or real_init(self, *a, **k))
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=False, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)
    FastLanguageModel.for_inference(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    layer = model.get_base_model().model.layers[0]
    q_b = layer.self_attn.q_proj.lora_B["default"]
    down = layer.mlp.down_proj.base_layer
    norm = layer.post_attention_layernorm
    new_b = torch.nn.Parameter(torch.randn(q_b.weight.shape, generator=torch.Generator().manual_seed(1)))
    new_down = torch.randn(down.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.2
    new_norm = type(norm)(norm.weight.shape[0], eps=1e-5)
    with torch.no_grad():
        new_norm.weight.mul_(-3.0)
    old = (q_b.weight, down.weight.data, norm)
    changes = {  # (apply, undo)
        "parameter": (lambda: setattr(q_b, "weight", new_b), lambda: setattr(q_b, "weight", old[0])),
        "storage": (lambda: setattr(down.weight, "data", new_down), lambda: setattr(down.weight, "data", old[1])),
        "submodule": (lambda: setattr(layer, "post_attention_layernorm", new_norm),
                      lambda: setattr(layer, "post_attention_layernorm", old[2])),
    }

    class ChangeAt(LogitsProcessor):
        def __init__(self, apply):
            self.apply, self.calls = apply, 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                self.apply()
            return scores

    unchanged, _ = _generate(model, enc, fast=False)
    for name, (apply, undo) in changes.items():
        outs = {}
        for fast in (False, True):
            made.clear()
            outs[fast], _ = _generate(model, enc, fast=fast, logits_processor=LogitsProcessorList([ChangeAt(apply)]))
            undo()
        assert not torch.equal(outs[False], unchanged), name  # the change shows in the tokens
        assert torch.equal(outs[True], outs[False]), (name, outs[True], outs[False])
        assert len(made) == 2, (name, len(made))  # recorded at the first decode step and after the change


def test_lora_state_from_instance_dicts_equals_peft_attributes(tiny_dir):
    """The adapter signature's fast read (models/decoder._lora_state) equals PEFT's public attributes in every
    state: one adapter, a second added and active, adapters disabled, merged."""
    from velotune.models.decoder import _lora_state, _lora_state_public

    model, _ = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=False, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    mods = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]

    def check():
        for m in mods:
            assert _lora_state(m) == _lora_state_public(m)

    check()
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("second")
    check()
    with model.disable_adapter():
        check()
    model.set_adapter("default")
    model.merge_adapter()
    assert any(_lora_state(m)[0] for m in mods)
    check()
    model.unmerge_adapter()
    check()


def test_recorded_decode_steps_register_nothing(tiny_dir, monkeypatch):
    """Generating registers no module, parameter or buffer per token (a ModuleList slice of the layers did),
    so the decode key's cached address slots (models/pointers.py) are read, not rebuilt, per token."""
    from velotune.models import decode_graphs, pointers

    monkeypatch.setattr(decode_graphs, "EMULATE_ON_CPU", True)
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=False, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    FastLanguageModel.for_inference(model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    _generate(model, enc, fast=True)
    before = pointers._registrations
    _, calls = _generate(model, enc, fast=True)
    assert len(calls) > 3 and pointers._registrations == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_through_bitsandbytes_gemv(dtype, monkeypatch):
    """kernels/lora.py's base product for one row without gradients goes to bitsandbytes' 4-bit GEMV where
    switched on (bnb.matmul_4bit, given velotune's view of the packed storage and bitsandbytes' own quant
    state): the product HF's Linear4bit computes for that row; two rows, or a forward with gradients, keep
    dequantise + GEMM."""
    bnb = pytest.importorskip("bitsandbytes")
    from velotune.kernels import lora
    from velotune.quant import NF4Weight

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(96, 256, dtype=dtype) * 0.05, requires_grad=False,
                                   quant_type="nf4", compress_statistics=True)._quantize("cpu")
    w = NF4Weight.from_bnb(lin)
    calls = []
    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(lora, "BNB_GEMV_ON_CPU", True)
    x = torch.randn(2, 256, dtype=dtype)
    with torch.no_grad():
        got = lora._base_mm(x[:1], w)
        assert calls == [(1, 256)]
        torch.testing.assert_close(got, lin(x[:1]), rtol=0, atol=0)
        torch.testing.assert_close(got, x[:1] @ w.dequantize(dtype).t(), rtol=0, atol=0)
        lora._base_mm(x, w)
    lora._base_mm(x[:1], w)  # gradients on
    assert len(calls) == 2  # the first, plus HF's lin(x[:1]): neither two rows nor a grad forward took it


def test_recorded_decode_at_batch_1_through_bitsandbytes_gemv(tiny_dir, monkeypatch):
    """A 4-bit model decoding one row with the GEMV switched on (emulated recorded steps): HF's greedy tokens."""
    bnb = pytest.importorskip("bitsandbytes")
    from velotune.kernels import lora
    from velotune.models import decode_graphs

    monkeypatch.setattr(decode_graphs, "EMULATE_ON_CPU", True)
    monkeypatch.setattr(lora, "BNB_GEMV_ON_CPU", True)
    calls = []
    real = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tok = FastLanguageModel.from_pretrained(tiny_dir("llama"), load_in_4bit=True, max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    randomize_lora_b(model, seed=11, std=0.5)
    FastLanguageModel.for_inference(model)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    hf, _ = _generate(model, enc, fast=False)
    calls.clear()
    fast, _ = _generate(model, enc, fast=True)
    assert calls and torch.equal(fast, hf), (fast, hf)
