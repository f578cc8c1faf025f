"""``model.save_pretrained_gguf``: LoRA merged in fp32 onto the dequantised base, streamed into GGUF.

The oracle is ``save_pretrained_merged(..., dtype=torch.float32)`` (tested in tests/test_merge.py):
an f16 GGUF must hold exactly its 2-D weights rounded to f16 and its 1-D weights as they are.
"""
from __future__ import annotations

import collections
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_llama2_style_tokenizer, make_tiny_model, randomize_lora_b
from velotune import FastLanguageModel, VelotuneError
from velotune.export import merge as merge_mod
from velotune.export.gguf import convert, save_model_gguf, vocab


def llama_vocab_tokenizer():
    """A Llama-2-style tokenizer (BPE with byte fallback, '▁' spaces, 271 tokens, no tokenizer.model).

    The tiny models' own byte-level BPE (trained on our data) has a pre-tokenizer llama.cpp cannot
    identify, so GGUF export refuses it (tested below); this kind needs no identification.
    """
    fast = make_llama2_style_tokenizer()
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}")
    return fast


def make_llama_vocab_model(folder: Path, seed: int = 0) -> Path:
    """The tiny random-init Llama of tests/tiny_models.py with :func:`llama_vocab_tokenizer` (vocab rows 512)."""
    make_tiny_model("llama", folder, seed=seed)
    for f in [*folder.glob("tokenizer*"), *folder.glob("special_tokens_map.json"), *folder.glob("chat_template*")]:
        f.unlink()
    llama_vocab_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_vocab_model(tmp_path_factory.mktemp("tiny-llama-vocab"))


def lora_model(folder, load_in_4bit=True, load_in_8bit=False, dtype=None, lora=True, seed=0):
    """velotune-loaded model; with ``lora`` its B matrices are random (as after training), deterministic."""
    model, tok = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                   dtype=dtype, max_seq_length=128)
    if lora:
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
        randomize_lora_b(model, seed=seed, std=0.05)
    return model.eval(), tok


@pytest.fixture(scope="module")
def qlora(llama_dir):
    return lora_model(llama_dir)


def _ids():
    return torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


CASES = {  # name -> lora_model kwargs
    "4bit-lora": dict(load_in_4bit=True),
    "8bit-lora": dict(load_in_4bit=False, load_in_8bit=True),
    "16bit-lora": dict(load_in_4bit=False, dtype=torch.bfloat16),
    "4bit-plain": dict(load_in_4bit=True, lora=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_f16_gguf_holds_the_fp32_merge_rounded_to_f16(case, llama_dir, tmp_path):
    model, tok = lora_model(llama_dir, **CASES[case])
    model.save_pretrained_merged(tmp_path / "merged", tok, dtype=torch.float32)
    ref = load_file(tmp_path / "merged" / "model.safetensors")
    # the shapes handed to the writer come from module metadata, and match the stream exactly
    stream = {n: tuple(t.shape) for n, t in merge_mod.iter_merged_tensors(model, torch.float32)}
    assert list(merge_mod.merged_tensor_shapes(model).items()) == list(stream.items())
    assert merge_mod.estimate_merged_bytes(model, torch.float32) == sum(t.numel() * 4 for t in ref.values())

    [path] = model.save_pretrained_gguf(tmp_path / "gguf", quantization_method="not_quantized")
    assert path == tmp_path / "gguf" / "model.F16.gguf"
    # transformers' own GGUF reader (it undoes llama.cpp's Q/K row permutation) is the independent check
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for name, want in ref.items():
        want = want.half().float() if want.dim() >= 2 else want  # 1-D tensors and norms are stored F32
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)
    if case.endswith("lora"):  # the LoRA update is in the file, far beyond f16 rounding
        base = merge_mod.dequantized_weight(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
        q, q_ref = got["model.layers.0.self_attn.q_proj.weight"], ref["model.layers.0.self_attn.q_proj.weight"]
        assert (q - base.half().float()).abs().max() > 50 * (q - q_ref).abs().max()
    # the metadata rebuilds the same model: logits equal the f16-rounded merged model's
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        for p in merged.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    ids = _ids()
    assert (_logits(loaded, ids) - _logits(merged, ids)).abs().max() <= 1e-4  # fp32 summation order only


def test_list_of_methods_writes_one_file_each_and_a_modelfile(qlora, tmp_path):
    model, tok = qlora
    model.save_pretrained_merged(tmp_path / "merged", tok, dtype=torch.float32)
    ref = load_file(tmp_path / "merged" / "model.safetensors")
    out = tmp_path / "out"
    paths = model.save_pretrained_gguf(out, quantization_method=["fast_quantized", "q4_k_m", "q8_0"])
    assert paths == [out / "model.Q8_0.gguf", out / "model.Q4_K_M.gguf"]  # q8_0 named twice: written once
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.Q4_K_M.gguf", "model.Q8_0.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.Q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    readers = [gguf.GGUFReader(p) for p in paths]
    assert [r.fields["general.file_type"].contents() for r in readers] == [7, 15]  # MOSTLY_Q8_0, MOSTLY_Q4_K_M
    assert readers[0].fields["tokenizer.ggml.model"].contents() == "llama"
    # Q8_0 holds the merged weight to half a step d = absmax / 127 per 32 values, plus the f16 rounding
    # of d itself (2**-11 relative) times |q| <= 127
    [t] = [t for t in readers[0].tensors if t.name == "blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(64, 128)
    want = ref["model.layers.1.mlp.down_proj.weight"]
    step = want.reshape(64, 4, 32).abs().amax(-1, keepdim=True) / 127
    assert ((got - want).reshape(64, 4, 32).abs() <= step * (0.5 + 127 * 2**-11)).all()


def _no_merge(*a, **k):
    pytest.fail("a weight was dequantised / merged before validation finished")


@pytest.mark.parametrize("bad", ["method", "tokenizer", "disk", "architecture"])
def test_bad_input_fails_before_any_merge_or_file(bad, qlora, tiny_dir, tmp_path, monkeypatch):
    model, tok = qlora
    monkeypatch.setattr(merge_mod, "dequantized_weight", _no_merge)
    out, kw = tmp_path / "out", {"quantization_method": ["q8_0", "f16"]}
    if bad == "method":
        kw["quantization_method"] = ["q8_0", "q4_k_xl"]
        err, match = ValueError, r"unknown quantization_method 'q4_k_xl'; valid: .*q4_k_m"
    elif bad == "tokenizer":  # the tiny models' own byte-level BPE: pre-tokenizer llama.cpp cannot identify
        from transformers import AutoTokenizer

        kw["tokenizer"] = AutoTokenizer.from_pretrained(tiny_dir("llama"))
        err, match = vocab.UnknownPreTokenizerError, "unknown BPE pre-tokenizer"
    elif bad == "disk":
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: usage(10**6, 0, 10**5))
        err, match = OSError, r"not enough free disk in .*need about .* GiB"
    else:
        monkeypatch.setattr(model.get_base_model().config, "model_type", "gpt2")
        err, match = ValueError, r"unsupported architecture model_type='gpt2'"
    with pytest.raises(err, match=match):
        model.save_pretrained_gguf(out, **kw)
    assert list(tmp_path.iterdir()) == []  # no folder, file or temp file


def test_argument_errors(qlora, llama_dir, tmp_path):
    model, tok = qlora
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['quantisation'\]"):
        model.save_pretrained_gguf(tmp_path / "x", tok, quantisation="q8_0")
    with pytest.raises(VelotuneError, match="upload_folder"):
        model.save_pretrained_gguf(tmp_path / "x", tok, push_to_hub=True)
    with pytest.raises(VelotuneError, match="first_conversion='q8_0' is not one of f32, f16, bf16"):
        model.save_pretrained_gguf(tmp_path / "x", tok, first_conversion="q8_0")
    with pytest.raises(ValueError, match="quantization_method is empty"):
        model.save_pretrained_gguf(tmp_path / "x", tok, quantization_method=[])
    plain = AutoModelForCausalLM.from_pretrained(llama_dir)  # not loaded by velotune: no tokenizer known
    with pytest.raises(VelotuneError, match="pass tokenizer="):
        save_model_gguf(plain, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_first_conversion_rounds_like_llama_cpp_two_step(qlora, tmp_path):
    model, tok = qlora
    [a] = model.save_pretrained_gguf(tmp_path / "a", quantization_method="q8_0", first_conversion="f16")
    [b] = model.save_pretrained_gguf(tmp_path / "b", quantization_method="q8_0", round_to="f16")
    [c] = model.save_pretrained_gguf(tmp_path / "c", quantization_method="q8_0")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


# ------------------------------------------------------------------ real model
def _kl(ref_logits, got_logits) -> float:
    p = torch.log_softmax(ref_logits, -1)
    q = torch.log_softmax(got_logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# KL per token against the adapter model itself (its own forward, not the merge under test):
# measured 0.0018 for q8_0; the bound is tests/export/test_gguf_convert.py's q8_0 bound (3.3x that).
@pytest.mark.real_model
def test_real_model_qlora_q8_0_loads_in_transformers_with_bounded_kl(real_model_dir, tmp_path):
    model, tok = lora_model(real_model_dir, load_in_4bit=True)
    [path] = model.save_pretrained_gguf(tmp_path, quantization_method="q8_0")
    ids = tok("The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue." * 3,
              return_tensors="pt").input_ids
    ref = _logits(model, ids)
    with model.disable_adapter():
        no_lora = _logits(model, ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval(), ids)
    kl, kl_no_lora = _kl(ref, got), _kl(ref, no_lora)
    print(f"KL(4-bit base + LoRA || q8_0 GGUF) = {kl:.5f}; KL(4-bit base + LoRA || 4-bit base) = {kl_no_lora:.5f}")
    assert kl < 0.006, f"q8_0: KL {kl:.4f} >= 0.006"
    assert kl_no_lora > 10 * kl  # the LoRA update is in the file, well above quantization noise
