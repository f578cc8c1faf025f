"""GGUF conversion: tiny models of each family round-trip through transformers' GGUF loader; the real
small model's q8_0 / q4_k_m files stay close to it; bad inputs fail early with clear messages."""
from __future__ import annotations

import collections
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from velotune.export.gguf import convert, export_gguf, quants, vocab, write_gguf
from velotune.export.gguf.modelfile import detect_format, modelfile_text, write_modelfile
from velotune.fixtures import smollm2_path, smollm2_ready

TEXT = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue; 3 + 4 = 7."

# Tiny configs: 2 layers, GQA 4/2, head_dim 16; the vocab is SmolLM2's (the only BPE tokenizer we
# have offline), so the embedding is 49152 x 64.
_COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
FAMILIES = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    # transformers' GGUF reader ignores qwen3's key_length and keeps Qwen3Config's head_dim=128
    "qwen3": dict(tie_word_embeddings=False, head_dim=128),
    "gemma": dict(),
}


@pytest.fixture(scope="module")
def tokenizer():
    if not smollm2_ready():
        pytest.skip("SmolLM2 fixture not built (python -m velotune.fixtures)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


def tiny_model(family: str, seed: int = 0, **overrides):
    """Random-init HF model of ``family`` with weights large enough to give spread-out logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if family == "gemma" else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _f16_rounded(model):
    """Copy of ``model`` holding the values an f16 GGUF stores (2-D weights rounded to f16)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    return m


def _load_gguf_generic(path: Path, model_like):
    """Load a GGUF into a copy of ``model_like`` with gguf's reader (for archs transformers can't read)."""
    import copy

    m = copy.deepcopy(model_like)
    arch = convert.ARCHS[m.config.model_type]
    tmap = gguf.get_tensor_name_map(arch.arch, m.config.num_hidden_layers)
    hf_of = {tmap.get_name(k, try_suffixes=(".weight", ".bias")): k for k in m.state_dict()}
    sd = {}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        hf = hf_of[t.name]
        w = w.reshape(m.state_dict()[hf].shape)
        if arch.norm_plus_one and t.name.endswith("norm.weight"):
            w = w - 1
        sd[hf] = w
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=True)
    return m


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f16_export_of_each_family_matches_hf_logits(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    # the tokenizer object: AutoTokenizer on a qwen2 folder would rebuild it as a Qwen2Tokenizer
    [path] = export_gguf(tmp_path / "hf", tmp_path / "out", "f16", tokenizer=tokenizer)
    if family == "gemma":  # transformers reads gemma2/3 GGUFs, not gemma (1)
        loaded = _load_gguf_generic(path, model)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    got, ref = _logits(loaded, ids), _logits(_f16_rounded(model), ids)
    # same f16 weights on both sides: only float32 summation order differs (measured <= 2e-6)
    assert (got - ref).abs().max() <= 1e-4
    # against the unrounded model: f16 weight rounding (2**-11 relative) moves logits by ~1e-3 here
    full = _logits(model, ids)
    assert (got - full).abs().max() <= 2e-2 * full.abs().max()


def test_gguf_metadata_of_a_llama_export(tokenizer, tmp_path):
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    path = write_gguf(tmp_path / "m.gguf", model.config, tokenizer, model.state_dict().items(), "q8_0")
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 7
    assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 64
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.rope.dimension_count"] == 16
    assert f["llama.rope.freq_base"] == 5e5 and f["llama.rope.scaling.type"] == "linear"
    assert f["llama.rope.scaling.factor"] == 2.0
    assert list(r.fields)[-2:] == ["general.quantization_version", "general.file_type"]
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    names = [t.name for t in r.tensors]
    assert names[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]


def test_llama3_rope_scaling_writes_rope_freqs(tokenizer, tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 5e5}
    model = tiny_model("llama", rope_parameters=rope)
    path = write_gguf(tmp_path / "m.gguf", model.config, tokenizer, model.state_dict().items(), "f16")
    [t] = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.shape == (8,)
    assert t.data[0] == 1.0 and t.data[-1] == 8.0


def test_tensors_stream_in_any_order_and_device(tokenizer, tmp_path):
    model = tiny_model("qwen2")
    items = list(model.state_dict().items())
    a = write_gguf(tmp_path / "a.gguf", model.config, tokenizer, items, "q4_k_m")
    b = write_gguf(tmp_path / "b.gguf", model.config, tokenizer, (
        (k, v.to(torch.bfloat16).float()) for k, v in reversed(items)), "q4_k_m", name="tiny-qwen2")
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type
    c = write_gguf(tmp_path / "c.gguf", model.config, tokenizer, reversed(items), "q4_k_m")
    assert a.read_bytes() == c.read_bytes()


# ------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def smollm2_reference():
    if not smollm2_ready():
        pytest.skip("SmolLM2 fixture not built (python -m velotune.fixtures)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    ids = tok(TEXT * 3, return_tensors="pt").input_ids
    return ids, _logits(model, ids)


def _kl(ref_logits, got_logits) -> float:
    p = torch.log_softmax(ref_logits, -1)
    q = torch.log_softmax(got_logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# KL(HF fp32 || GGUF) per token, bounds at 2-3.5x what we measured (q8_0 0.0017, q4_k_m 0.077 on this
# text); GGUF-NOTES.md measured 0.009 / 0.12 for llama.cpp's own files on another text.
@pytest.mark.real_model
@pytest.mark.parametrize("method,bound", [("q8_0", 0.006), ("q4_k_m", 0.15)])
def test_real_model_quantized_exports_load_with_bounded_kl(method, bound, smollm2_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    ids, ref = smollm2_reference
    [path] = export_gguf(smollm2_path(), tmp_path, method)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    kl = _kl(ref, _logits(model, ids))
    print(f"KL(HF fp32 || {method} GGUF) = {kl:.5f}")
    assert kl < bound, f"{method}: KL {kl:.4f} >= {bound}"


# ------------------------------------------------------------------ errors and atomicity
def test_unknown_method_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization_method 'q4_k_xl'; valid: .*q4_k_m"):
        export_gguf(tmp_path, tmp_path / "out", ["q8_0", "q4_k_xl"])


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt2'.*supported: llama, mistral"):
        export_gguf(tmp_path, tmp_path / "out", "q8_0")


def test_unknown_pre_tokenizer(tokenizer, tmp_path):
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_model("llama")
    known = r"unknown BPE pre-tokenizer .*Known: .*llama-bpe.*qwen2.*smollm"
    with pytest.raises(vocab.UnknownPreTokenizerError, match=known):
        export_gguf(model, tmp_path, "q8_0", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_fails_before_quantizing(tokenizer, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: usage(10**6, 0, 10**6))
    monkeypatch.setattr(quants, "quantize", lambda *a, **k: pytest.fail("quantized before the disk check"))
    with pytest.raises(OSError, match=r"not enough free disk in .*need about .* GiB"):
        export_gguf(tiny_model("llama"), tmp_path, ["q4_k_m", "q8_0"], tokenizer=tokenizer)


def test_model_with_quantized_or_peft_weights_is_refused(tokenizer, tmp_path):
    model = tiny_model("llama")
    model.peft_config = {}
    with pytest.raises(ValueError, match="PEFT model: merge the adapters first"):
        export_gguf(model, tmp_path, "q8_0", tokenizer=tokenizer)
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(128, 64, dtype=torch.uint8),
                                                                  requires_grad=False)
    with pytest.raises(TypeError, match="holds quantized weights; merge to 16-bit first"):
        export_gguf(model, tmp_path, "q8_0", tokenizer=tokenizer)


def test_bias_llama_cpp_cannot_load_is_refused(tokenizer, tmp_path):
    model = tiny_model("qwen3", attention_bias=True)
    with pytest.raises(ValueError, match=r"llama.cpp's qwen3 graph has no blk.0.attn_output.bias"):
        export_gguf(model, tmp_path, "f16", tokenizer=tokenizer)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_no_file(exc, tokenizer, tmp_path):
    model = tiny_model("llama")

    def tensors():
        for i, item in enumerate(model.state_dict().items()):
            if i == 5:
                raise exc("stop")
            yield item

    with pytest.raises(exc):
        write_gguf(tmp_path / "m.gguf", model.config, tokenizer, tensors(), "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_missing_unexpected_and_misshapen_tensors(tokenizer, tmp_path):
    model = tiny_model("llama")
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"1 model tensors were never given, e.g. \['model.layers.1.mlp.down_proj"):
        write_gguf(tmp_path / "m.gguf", model.config, tokenizer, sd.items(), "f16")
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        write_gguf(tmp_path / "m.gguf", model.config, tokenizer,
                   [("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), the config says \(64,\)"):
        write_gguf(tmp_path / "m.gguf", model.config, tokenizer, [("model.norm.weight", torch.zeros(3, 3))])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ SentencePiece, Modelfile
def _sp_model_bytes(pieces: list[tuple[str, float, int]]) -> bytes:
    """A minimal sentencepiece ModelProto: repeated pieces {piece=1, score=2 (float), type=3}."""
    import struct

    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def ld(field, payload):
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    body = b""
    for piece, score, typ in pieces:
        msg = ld(1, piece.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score) + varint(3 << 3) + varint(typ)
        body += ld(1, msg)
    return body + ld(2, b"")  # trainer_spec, ignored


def test_sentencepiece_vocab(tmp_path):
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<0x0A>", 0.0, 6), ("\u2581the", -1.5, 1),
              ("\u2581cat", -2.25, 1)]
    (tmp_path / "tokenizer.model").write_bytes(_sp_model_bytes(pieces))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {"6": {"content": "<|tool|>", "special": false}}, "add_bos_token": true,'
        ' "bos_token": "<s>", "eos_token": "</s>"}')
    v = vocab.build_vocab(None, 8, tmp_path)
    assert v.model == "llama" and v.pre == "default"
    assert v.tokens[:7] == [b"<unk>", b"<s>", b"</s>", b"<0x0A>", "\u2581the".encode(), "\u2581cat".encode(),
                            b"<|tool|>"]
    assert v.tokens[7] == b"[PAD7]"
    assert v.scores[:7] == [0.0, 0.0, 0.0, 0.0, -1.5, -2.25, -1000.0] and v.scores[7] == -10000.0
    assert v.toktypes == [vocab.UNKNOWN, vocab.CONTROL, vocab.CONTROL, vocab.BYTE, vocab.NORMAL, vocab.NORMAL,
                          vocab.CONTROL, vocab.UNUSED]  # <|...|> looks special
    assert v.special.add_special_token["bos"] is True


def test_modelfile_for_chatml(tokenizer, tmp_path):
    assert detect_format(tokenizer.chat_template).name == "chatml"
    path = write_modelfile(tmp_path / "model.Q4_K_M.gguf", tokenizer)
    text = path.read_text()
    assert text.startswith("FROM ./model.Q4_K_M.gguf\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1  # eos not repeated


@pytest.mark.parametrize("template,fmt", [("{{ '<|start_header_id|>' }}", "llama-3"), ("<start_of_turn>user", "gemma"),
                                          ("[INST] {{ m }} [/INST]", "mistral")])
def test_modelfile_families(template, fmt):
    tok = type("Tok", (), {"chat_template": template, "eos_token": "</s>"})()
    assert detect_format(template).name == fmt
    assert f"# Chat format: {fmt}" in modelfile_text("x.gguf", tok)


def test_modelfile_unknown_template_says_so():
    tok = type("Tok", (), {"chat_template": "{{ messages }}", "eos_token": None})()
    text = modelfile_text("x.gguf", tok)
    assert "unrecognised family" in text and 'TEMPLATE """{{ if .System }}' in text and "PARAMETER" not in text


def _sp_style_bpe_tokenizer():
    """A Llama-2-style tokenizer.json (BPE with byte fallback, '▁' spaces) and no tokenizer.model."""
    from tests.tiny_models import make_llama2_style_tokenizer

    return make_llama2_style_tokenizer()


def test_sentencepiece_style_tokenizer_json_becomes_a_llama_vocab(tmp_path):
    tok = _sp_style_bpe_tokenizer()
    model = tiny_model("llama", vocab_size=272)
    path = write_gguf(tmp_path / "m.gguf", model.config, tok, model.state_dict().items(), "f16")
    r = gguf.GGUFReader(path)
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 272 and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[-1] == "[PAD271]"
    assert "\u2581cat" in tokens
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert types[3] == vocab.BYTE and types[1] == vocab.CONTROL and types[-1] == vocab.UNUSED
