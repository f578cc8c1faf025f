"""Tiny random-init checkpoints of each supported family, written to a folder in about a second.

Shapes are small but keep what the code paths care about: GQA (4 query / 2 KV heads), a head dim
of 16, an MLP wider than the hidden size, 2 layers, row lengths that bitsandbytes' 64-value blocks
divide. The tokenizer is a byte-level BPE trained on the bundled Alpaca data (vocab 512).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
# families the fast forward knows but the GGUF exporter does not (not in FAMILIES' parametrisations)
FAST_ONLY_FAMILIES = ("gemma2",)
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


@functools.lru_cache(maxsize=1)
def _corpus() -> list[str]:
    from velotune.data.bundled import load_alpaca_rows

    rows = load_alpaca_rows()
    return [" ".join((r["instruction"], r["input"], r["output"])) for r in rows]


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with <s>, </s>, <unk>, <pad> and a ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return fast


def make_config(family: str, vocab_size: int):
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma": "GemmaConfig", "gemma2": "Gemma2Config"}[family]
    extra = {}
    if family == "gemma":
        extra = dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    if family == "gemma2":
        # caps far below Gemma-2's (50 / 30) so that they change this tiny model's numbers; a window of
        # 8 tokens on the first layer so that test batches are longer than it
        extra = dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=16,
                     sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                     attn_logit_softcapping=0.05, final_logit_softcapping=3.0)
    if family == "mistral":
        extra = dict(sliding_window=None)
    return getattr(transformers, cls)(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                                      **{**_COMMON, **extra})


def make_tiny_model(family: str, folder: str | Path, seed: int = 0, dtype=torch.float32, with_pad: bool = False):
    """Write a tiny random-init ``family`` checkpoint + tokenizer into ``folder``; returns the folder."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tok = make_tokenizer()
    if not with_pad:
        # Most base checkpoints ship without a pad token: exercise velotune's fix-up.
        tok.pad_token = None
    config = make_config(family, len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "velotune-tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return folder


def randomize_lora_b(model, seed: int, std: float) -> None:
    """Fill every LoRA B with N(0, std^2) draws (seeded), as if trained: B starts at zero, which would
    hide A's gradient and the LoRA delta from any comparison."""
    device = next(p.device for n, p in model.named_parameters() if "lora_B" in n)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, device=device, generator=g) * std)


def make_llama2_style_tokenizer():
    """A Llama-2-style tokenizer.json (BPE with byte fallback, '▁' spaces, 271 tokens) and no
    tokenizer.model. llama.cpp reads this kind without identifying a pre-tokenizer, unlike the tiny
    models' own byte-level BPE, so GGUF tests use it."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += ["\u2581", "t", "h", "e", "c", "a", "he", "\u2581t", "\u2581the", "\u2581c", "at", "\u2581cat"]
    merges = [("h", "e"), ("\u2581", "t"), ("\u2581t", "he"), ("\u2581", "c"), ("a", "t"), ("\u2581c", "at")]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def record_eager_stacks(monkeypatch) -> list:
    """Patch velotune's graphs.run_stack so each call appends whether the decoder stack ran eagerly (True)
    instead of through CUDA graphs (emulated or real); returns that list."""
    from velotune.models import graphs

    real, eager = graphs.run_stack, []

    def recording(*a, **k):
        out = real(*a, **k)
        eager.append(out is None)
        return out

    monkeypatch.setattr(graphs, "run_stack", recording)
    return eager
