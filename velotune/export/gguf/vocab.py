"""Tokenizer -> GGUF ``tokenizer.ggml.*`` metadata, the way llama.cpp's converter writes it.

Follows ``get_vocab_base``, ``get_vocab_base_pre``, ``_set_vocab_gpt2`` and
``_create_vocab_sentencepiece`` of llama.cpp's ``convert_hf_to_gguf`` (MIT licence, Copyright (c)
2023-2024 The ggml authors); our own code. Two tokenizer kinds:

- BPE (``tokenizer.json``): ``tokenizer.ggml.model = "gpt2"``, tokens, token types, merges and a
  ``pre`` name. llama.cpp recognises the pre-tokenizer (the regex splitting text before BPE) by a
  hash: sha256 of ``str(tokenizer.encode(PROBE_TEXT))``; :data:`KNOWN_PRE` lists the hashes of the
  families we export.
- SentencePiece (``tokenizer.model``): ``tokenizer.ggml.model = "llama"``, tokens, scores, types,
  read with a small protobuf reader (no sentencepiece dependency).

Special ids, add_bos/add_eos, merges and the chat template come from ``gguf.SpecialVocab`` reading
the tokenizer's saved files, as the converter does.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import gguf

# llama.cpp's probe text (convert_hf_to_gguf.py, get_vocab_base_pre); the hash of its token ids
# names the pre-tokenizer.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作"
    "1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's "
    "there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of the probe's token ids -> llama.cpp pre-tokenizer name (hashes from llama.cpp's table).
KNOWN_PRE: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 variant
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # Mistral (tekken v3)
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# gguf token types (llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class UnknownPreTokenizerError(ValueError):
    pass


@dataclass
class Vocab:
    """Everything the GGUF tokenizer section needs (written by :func:`write_vocab`)."""

    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[bytes | str]
    toktypes: list[int]
    scores: list[float] | None = None
    special: gguf.SpecialVocab | None = None
    extra: dict[str, object] = field(default_factory=dict)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp ``tokenizer.ggml.pre`` of a HF BPE tokenizer, or UnknownPreTokenizerError."""
    chkhsh = sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()
    if chkhsh not in KNOWN_PRE:
        known = ", ".join(sorted(set(KNOWN_PRE.values())))
        raise UnknownPreTokenizerError(
            f"unknown BPE pre-tokenizer (probe hash {chkhsh}); llama.cpp would not know how to split text "
            f"for it. Known: {known}. Use a tokenizer of a supported family, or export f16 and convert with "
            "llama.cpp's convert_hf_to_gguf.py if it supports this model"
        )
    return KNOWN_PRE[chkhsh]


def _looks_special(tok: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special."""
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>"))
            or (tok.startswith("<unused") and tok.endswith(">")))


def bpe_vocab(tokenizer, vocab_size: int, files_dir: Path) -> Vocab:
    """gpt2-model vocab of a HF fast BPE tokenizer; ``files_dir`` holds its saved files."""
    pre = pre_tokenizer_name(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[bytes | str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoder[i].special or _looks_special(tok):
                types.append(CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(tok)
    special = gguf.SpecialVocab(files_dir, load_merges=True)
    return Vocab("gpt2", pre, tokens, types, special=special)


# ------------------------------------------------------------------ SentencePiece (protobuf)
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message (varint / 64-bit / bytes / 32-bit)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        yield num, wire, val


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, sentencepiece type) of every piece of a ``tokenizer.model`` (ModelProto).

    SentencePiece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte -- the
    same numbers as gguf's token types.
    """
    pieces = []
    for num, wire, val in _fields(Path(path).read_bytes()):
        if num != 1 or wire != 2:  # ModelProto.pieces = 1
            continue
        piece, score, typ = "", 0.0, NORMAL
        for n2, w2, v2 in _fields(val):
            if n2 == 1:
                piece = v2.decode("utf-8")
            elif n2 == 2:
                score = struct.unpack("<f", v2)[0]
            elif n2 == 3:
                typ = v2
        pieces.append((piece, score, typ))
    if not pieces:
        raise ValueError(f"{path} holds no SentencePiece pieces; is it a sentencepiece model?")
    return pieces


def sentencepiece_vocab(model_file: Path, vocab_size: int, files_dir: Path) -> Vocab:
    """llama-model vocab (tokens, scores, types) from ``tokenizer.model`` + added tokens."""
    pieces = read_sentencepiece(model_file)
    tokens: list[bytes | str] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i, (piece, score, typ) in enumerate(pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = piece.encode("utf-8"), score, typ
    cfg_file = files_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    decoder = cfg.get("added_tokens_decoder", {})
    for tid, data in decoder.items():
        tid = int(tid)
        if tid >= vocab_size:
            continue
        tok = data["content"]
        if data.get("special") or _looks_special(tok):
            types[tid] = CONTROL
        else:
            tok = tok.replace("\u2581", " ")
            types[tid] = USER_DEFINED
        scores[tid] = -1000.0
        tokens[tid] = tok.encode("utf-8")
    special = gguf.SpecialVocab(files_dir, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, types, scores=scores, special=special)


def llama_hf_vocab(vocab_size: int, files_dir: Path) -> Vocab:
    """llama-model vocab of a SentencePiece-style BPE ``tokenizer.json`` (byte fallback, no .model file)."""
    hf = gguf.LlamaHfVocab(files_dir)
    tokens, scores, types = [], [], []
    for text, score, typ in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(typ))
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer: llama.cpp needs a token each
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)
    special = gguf.SpecialVocab(files_dir, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, types, scores=scores, special=special)


def _is_sentencepiece_bpe(tok_json: dict) -> bool:
    """A Llama/Mistral SentencePiece tokenizer stored as tokenizer.json ('▁' spaces, <0xNN> bytes).

    llama.cpp's converter (gguf.LlamaHfVocab) tests BPE + byte_fallback + a Sequence decoder; we
    also require no ByteLevel step, since transformers writes byte_fallback into byte-level BPEs it
    rebuilds from GGUF (SmolLM2's), which are gpt2 vocabs.
    """
    model = tok_json.get("model", {})
    byte_level = "ByteLevel" in json.dumps([tok_json.get("pre_tokenizer"), tok_json.get("decoder")])
    return (model.get("type") == "BPE" and model.get("byte_fallback", False) and not byte_level
            and (tok_json.get("decoder") or {}).get("type") == "Sequence")


def build_vocab(tokenizer, vocab_size: int, files_dir: Path) -> Vocab:
    """Pick llama.cpp's tokenizer model as its converter does: ``tokenizer.model`` -> SentencePiece;
    a SentencePiece-style BPE ``tokenizer.json`` -> llama; any other BPE ``tokenizer.json`` -> gpt2."""
    sp = files_dir / "tokenizer.model"
    if sp.is_file():
        v = sentencepiece_vocab(sp, vocab_size, files_dir)
    else:
        if not (files_dir / "tokenizer.json").is_file():
            raise ValueError("the tokenizer has neither tokenizer.model (SentencePiece) nor tokenizer.json (BPE)")
        tok_json = json.loads((files_dir / "tokenizer.json").read_text(encoding="utf-8"))
        model_type = tok_json.get("model", {}).get("type")
        if model_type != "BPE":
            raise ValueError(f"tokenizer.json model type {model_type!r} is not supported; BPE or SentencePiece only")
        if _is_sentencepiece_bpe(tok_json):
            v = llama_hf_vocab(vocab_size, files_dir)
        else:
            v = bpe_vocab(tokenizer, vocab_size, files_dir)
    cfg_file = files_dir / "tokenizer_config.json"
    if v.model == "llama" and cfg_file.is_file():
        prefix = json.loads(cfg_file.read_text(encoding="utf-8")).get("add_prefix_space")
        if prefix is not None:
            v.extra[gguf.Keys.Tokenizer.ADD_PREFIX] = bool(prefix)
    return v


def write_vocab(writer: gguf.GGUFWriter, v: Vocab) -> None:
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    writer.add_token_types(v.toktypes)
    if v.special is not None:
        v.special.add_to_gguf(writer, quiet=True)
    for key, val in v.extra.items():
        if isinstance(val, bool):
            writer.add_bool(key, val)
