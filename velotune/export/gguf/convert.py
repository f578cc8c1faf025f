"""Write GGUF files from a Hugging Face config, tokenizer and a stream of tensors, without llama.cpp.

What llama.cpp's ``convert_hf_to_gguf.py`` followed by ``llama-quantize`` does (conversion rules and
metadata keys after llama.cpp, MIT licence, Copyright (c) 2023-2024 The ggml authors), in one pass:

- tensor names through ``gguf.get_tensor_name_map``; Llama/Mistral Q and K rows permuted for
  llama.cpp's rotary layout; Gemma norm weights + 1; 1-D tensors and norms F32;
- tensor types from :mod:`.mixes` (llama.cpp's per-tensor rules), bytes from :mod:`.quants`
  (byte-identical to ggml's reference quantizer);
- tensors in llama-quantize's order (by block, then name), ``general.quantization_version`` and
  ``general.file_type`` as the last keys: our q-file of a model equals, byte for byte,
  ``llama-quantize`` run on our f16 file of it (with ``round_to="f16"``, see :func:`write_gguf`).

Tensors may arrive in any order: the header is written first from the model's shapes, each
tensor's bytes land at its precomputed offset, so a merged model can be streamed tensor by tensor.
Files are written under a temporary name in the destination folder and renamed when complete.

Public: :func:`export_gguf` (a HF folder or a plain model; ``velotune export`` calls it),
:func:`write_gguf` (one file from a tensor stream), and the two halves both entry points share:
:func:`prepare_export` (every check, nothing written) and :func:`run_export` (the files).
``model.save_pretrained_gguf`` (:mod:`.model`) streams a LoRA merge through the same two.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from . import mixes, quants, vocab as vocab_mod
from ..._progress import track


@dataclass(frozen=True)
class ArchSpec:
    """How one HF ``model_type`` maps to llama.cpp."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's LLAMA arch uses interleaved (GPT-J) rotary pairs
    norm_plus_one: bool = False  # Gemma stores w - 1 for its (1 + w) RMSNorm
    vocab_size_key: bool = False
    rope_dim_key: bool = False
    # GGUF tensor kinds llama.cpp's graph for this arch does not load (it refuses such a file)
    unloadable: tuple[str, ...] = ()


_NO_OUT_FFN_BIAS = ("attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, vocab_size_key=True, rope_dim_key=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, vocab_size_key=True, rope_dim_key=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, unloadable=_NO_OUT_FFN_BIAS),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3, unloadable=_NO_OUT_FFN_BIAS),
    "gemma": ArchSpec(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, unloadable=_NO_OUT_FFN_BIAS),
}
_SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_HEADER_SLACK = 1 << 20  # KV data beyond the vocab (names, template, ...) stays well under 1 MiB


def _arch_of(config) -> tuple[str, ArchSpec]:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"unsupported architecture model_type={mt!r} for GGUF export; supported: {', '.join(ARCHS)}")
    return mt, ARCHS[mt]


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        raise ValueError(f"rope_type={params['rope_type']!r} has no llama.cpp equivalent in this exporter; "
                         "supported: default, linear, yarn, llama3")
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _n_kv(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def llama3_rope_factors(config) -> torch.Tensor:
    """llama.cpp's ``rope_freqs.weight`` for rope_type llama3: [head_dim/2] float32 multipliers."""
    p, dim = _rope(config), _head_dim(config)
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = p.get("factor", 8.0), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def model_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes of the model ``config`` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass
class _Entry:
    hf: str | None  # None for generated tensors (rope_freqs)
    name: str
    shape: tuple[int, ...]
    type: T
    nbytes: int
    offset: int = 0


class _Plan:
    """The file's tensors, in llama.cpp order, with types and data offsets."""

    def __init__(self, config, method: mixes.Method, shapes: dict[str, tuple[int, ...]] | None = None):
        self.model_type, self.spec = _arch_of(config)
        self.config = config
        self.tied = bool(getattr(config, "tie_word_embeddings", False)) or self.model_type == "gemma"
        n_layer = config.num_hidden_layers
        tmap = gguf.get_tensor_name_map(self.spec.arch, n_layer)
        shapes = model_tensor_shapes(config) if shapes is None else shapes
        self.by_hf: dict[str, _Entry] = {}
        entries: dict[str, _Entry] = {}
        for hf, shape in shapes.items():
            if self._skip(hf):
                continue
            name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"tensor {hf!r} has no GGUF name for arch {self.spec.arch.name}")
            if name.split(".", 2)[-1] in self.spec.unloadable:
                raise ValueError(f"llama.cpp's {self.model_type} graph has no {name} (from {hf!r}: a bias this "
                                 "config enables); llama.cpp would refuse the file, so it is not exported")
            entries[name] = self.by_hf[hf] = _Entry(hf, name, tuple(shape), T.F32, 0)
        if _rope(config)["rope_type"] == "llama3":
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            entries[name] = _Entry(None, name, (_head_dim(config) // 2,), T.F32, 0)
        types = mixes.plan_types([(e.name, e.shape) for e in entries.values()], method,
                                 arch=self.spec.arch.name.lower(), n_layer=n_layer,
                                 n_head=config.num_attention_heads, n_head_kv=_n_kv(config))
        self.entries = [entries[n] for n in mixes.llama_order(entries)]
        offset = 0
        for e in self.entries:
            e.type = types[e.name]
            e.nbytes = math.prod(e.shape[:-1]) * quants.row_nbytes(e.type, e.shape[-1])
            e.offset = offset
            offset += gguf.GGUFWriter.ggml_pad(e.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT)
        self.data_bytes = offset

    def _skip(self, hf: str) -> bool:
        return hf.endswith(_SKIP_SUFFIXES) or (hf == "lm_head.weight" and self.tied)

    def entry(self, hf: str) -> _Entry | None:
        if self._skip(hf):
            return None
        if hf not in self.by_hf:
            raise ValueError(f"unexpected tensor {hf!r}: not part of the {self.model_type} model its config describes")
        return self.by_hf[hf]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary halves -> llama.cpp interleaved pairs: rows grouped per head, (2, d/2) -> (d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _prepare(plan: _Plan, e: _Entry, t: torch.Tensor) -> torch.Tensor:
    cfg, spec = plan.config, plan.spec
    if tuple(t.shape) != e.shape:
        raise ValueError(f"tensor {e.hf!r} has shape {tuple(t.shape)}, the config says {e.shape}")
    if spec.permute_qk and e.hf.endswith(("q_proj.weight", "q_proj.bias")):
        t = _permute(t, cfg.num_attention_heads)
    elif spec.permute_qk and e.hf.endswith(("k_proj.weight", "k_proj.bias")):
        t = _permute(t, _n_kv(cfg))
    if spec.norm_plus_one and e.hf.endswith("norm.weight"):
        t = t.to(torch.float32) + 1
    return t


def _tensor_bytes(e: _Entry, t: torch.Tensor, device, round_to: torch.dtype | None) -> np.ndarray:
    if not t.is_floating_point():
        raise TypeError(f"tensor {e.hf!r} is {t.dtype}; GGUF export needs float weights "
                        "(merge LoRA / dequantize 4-bit weights first)")
    if device is not None:
        t = t.to(device)
    if round_to is not None and e.type not in (T.F32, T.F16, T.BF16):
        t = t.to(round_to)
    return quants.quantize(t, e.type).cpu().numpy().reshape(-1)


def _add_metadata(w: gguf.GGUFWriter, plan: _Plan, name: str) -> None:
    cfg, spec = plan.config, plan.spec
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(_n_kv(cfg))
    rope = _rope(cfg)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if (af := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(af)
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(_head_dim(cfg))
    w.add_value_length(_head_dim(cfg))
    if spec.vocab_size_key:
        w.add_vocab_size(cfg.vocab_size)
    if spec.rope_dim_key:
        w.add_rope_dimension_count(_head_dim(cfg))


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temp path beside ``path``; rename it onto ``path`` on success, delete it on any failure.

    The temp file is created by the writer (open "wb"), so the result gets the usual umask
    permissions (mkstemp would leave it 0600).
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: never leave a half file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _tokenizer_files(tokenizer, config, where: Path, src_dir: Path | None = None) -> Path:
    """The tokenizer's files as llama.cpp's converter reads them (plus the model's config.json).

    A SentencePiece ``tokenizer.model`` of the source folder is kept even when the (fast) tokenizer
    object does not write it back: llama.cpp prefers it to tokenizer.json.
    """
    tokenizer.save_pretrained(where)
    config.to_json_file(where / "config.json")
    if src_dir is not None and (src_dir / "tokenizer.model").is_file() and not (where / "tokenizer.model").is_file():
        shutil.copyfile(src_dir / "tokenizer.model", where / "tokenizer.model")
    return where


def write_gguf(path: str | os.PathLike, config, tokenizer, tensors: Iterable[tuple[str, torch.Tensor]],
               quantization_method: str = "f16", *, device: str | torch.device | None = None,
               round_to: str | None = None, name: str | None = None,
               tensor_shapes: dict[str, Sequence[int]] | None = None, vocab: vocab_mod.Vocab | None = None) -> Path:
    """Write one GGUF file.

    config: the model's ``PretrainedConfig`` (model_type llama, mistral, qwen2, qwen3 or gemma).
    tokenizer: its HF tokenizer (BPE with a pre-tokenizer llama.cpp knows, or SentencePiece).
    tensors: (HF name, tensor) pairs in any order, any float dtype/device; each is used once.
    quantization_method: see :data:`.mixes.METHODS` / :data:`.mixes.ALIASES`.
    device: where to quantize (default: where each tensor is).
    round_to: ``"f16"`` / ``"bf16"`` rounds weights to that dtype before quantizing, reproducing
      llama.cpp's two-step flow (convert to an f16/bf16 file, then quantize it) byte for byte;
      None (default) quantizes the tensors' own values.
    tensor_shapes: HF name -> shape of every model tensor (default: from ``config``).
    Returns ``path``.
    """
    path = Path(path)
    method = mixes.resolve_method(quantization_method)
    plan = _Plan(config, method, None if tensor_shapes is None else {k: tuple(v) for k, v in tensor_shapes.items()})
    rdtype = {None: None, "f16": torch.float16, "bf16": torch.bfloat16}[round_to]
    with tempfile.TemporaryDirectory() as tdir:
        if vocab is None:
            vocab = vocab_mod.build_vocab(tokenizer, config.vocab_size, _tokenizer_files(tokenizer, config, Path(tdir)))
        v = vocab
        with _atomic(path) as tmp:
            _write(tmp, plan, method, v, tensors, device, rdtype, name or _default_name(config))
    return path


def _default_name(config) -> str:
    src = getattr(config, "_name_or_path", "") or ""
    return Path(src).name or config.model_type


def _write(tmp: Path, plan: _Plan, method: mixes.Method, v: vocab_mod.Vocab, tensors, device, rdtype, name: str):
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[plan.spec.arch])
    try:
        _write_into(w, plan, method, v, tensors, device, rdtype, name)
    finally:
        w.close()


def _write_into(w: gguf.GGUFWriter, plan: _Plan, method, v, tensors, device, rdtype, name: str) -> None:
    _add_metadata(w, plan, name)
    vocab_mod.write_vocab(w, v)
    if plan.model_type in ("llama", "mistral") and plan.config.vocab_size == 49152:
        w.add_add_bos_token(False)  # llama.cpp's converter does this for 49152-token (granite/smol) vocabs
    if plan.model_type == "gemma" and v.model == "llama":
        w.add_add_space_prefix(False)  # as llama.cpp's Gemma converter: no dummy-prefix space
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # last two keys, as llama-quantize leaves them
    w.add_file_type(int(method.ftype))
    for e in plan.entries:
        w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    start = gguf.GGUFWriter.ggml_pad(f.tell(), gguf.GGUF_DEFAULT_ALIGNMENT)
    done: set[str] = set()
    for e in plan.entries:
        if e.hf is None:
            f.seek(start + e.offset)
            f.write(memoryview(_tensor_bytes(e, llama3_rope_factors(plan.config), None, None)))
            done.add(e.name)
    for hf, t in track(tensors, len(plan.entries) - len(done), f"GGUF {method.name}"):
        e = plan.entry(hf)
        if e is None:
            continue
        if e.name in done:
            raise ValueError(f"tensor {hf!r} was given twice")
        data = _tensor_bytes(e, _prepare(plan, e, t), device, rdtype)
        f.seek(start + e.offset)
        f.write(memoryview(data))
        done.add(e.name)
    missing = [e.hf for e in plan.entries if e.name not in done]
    if missing:
        raise ValueError(f"{len(missing)} model tensors were never given, e.g. {missing[:3]}")
    f.truncate(start + plan.data_bytes)


# ------------------------------------------------------------------ convenience entry point
def _source(hf_dir_or_model):
    """(config, tokenizer-or-None, tensor iterator factory, shapes) of a HF folder or a model."""
    if isinstance(hf_dir_or_model, (str, os.PathLike)):
        d = Path(hf_dir_or_model)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d} is not a Hugging Face model folder (no config.json)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(d)
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{d} has no *.safetensors weights")
        return config, d, lambda: _iter_safetensors(files), _safetensors_shapes(files)
    model = hf_dir_or_model
    if hasattr(model, "peft_config"):
        raise ValueError("this is a PEFT model: merge the adapters first (model.merge_and_unload(), or "
                         "save_pretrained_gguf which merges onto the dequantised base)")
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise TypeError(f"expected a HF model folder or a transformers model, got {type(model).__name__}")
    sd = model.state_dict()
    bad = [k for k, v in sd.items() if not v.is_floating_point() and not k.endswith(_SKIP_SUFFIXES)]
    if bad:
        raise TypeError(f"{bad[0]!r} is {sd[bad[0]].dtype}: the model holds quantized weights; merge to "
                        "16-bit first (save_pretrained_merged(..., 'merged_16bit'))")
    return model.config, None, lambda: iter(sd.items()), {k: tuple(v.shape) for k, v in sd.items()}


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


def _out_name(stem: str, method: str) -> str:
    return f"{stem}.{method.upper()}.gguf"


def estimate_bytes(plan: _Plan, v: vocab_mod.Vocab) -> int:
    """Upper estimate of a file's size: tensor data + vocab strings + 1 MiB of other metadata."""
    vocab_bytes = sum(len(t.encode() if isinstance(t, str) else t) + 16 for t in v.tokens)
    merges = len(v.special.merges) * 24 if v.special is not None else 0
    return plan.data_bytes + vocab_bytes + merges + _HEADER_SLACK


def resolve_methods(quantization_method: str | Sequence[str]) -> list[mixes.Method]:
    """One method or a list -> resolved methods, in order, duplicates (e.g. an alias and its target) once."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ValueError("quantization_method is empty; pass a name such as 'q4_k_m'")
    resolved: dict[str, mixes.Method] = {}
    for m in methods:
        r = mixes.resolve_method(m)
        resolved.setdefault(r.name, r)
    return list(resolved.values())


@dataclass
class ExportJob:
    """A validated export (see :func:`prepare_export`): nothing has been written or quantized yet."""

    config: object
    tokenizer: object
    shapes: dict[str, tuple[int, ...]]
    methods: list[mixes.Method]
    vocab: vocab_mod.Vocab
    paths: list[Path]  # one per method, in order


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def prepare_export(config, tokenizer, shapes: dict[str, tuple[int, ...]], methods: list[mixes.Method],
                   out_dir: str | os.PathLike, *, stem: str = "model", src_dir: Path | None = None) -> ExportJob:
    """Every check an export needs, before any tensor is read, merged or quantized.

    Architecture (and RoPE type), tokenizer (vocab built; an unknown pre-tokenizer raises), each
    method's tensor plan against ``shapes`` (unmapped tensors, biases llama.cpp cannot load), and free
    disk for all files. Creates nothing: ``out_dir`` is made by :func:`run_export`.
    """
    _arch_of(config)
    if tokenizer is None:
        raise ValueError("no tokenizer to export: pass tokenizer= (the HF tokenizer of this model)")
    with tempfile.TemporaryDirectory() as tdir:
        files = _tokenizer_files(tokenizer, config, Path(tdir), src_dir)
        v = vocab_mod.build_vocab(tokenizer, config.vocab_size, files)
    plans = [_Plan(config, m, shapes) for m in methods]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; pass a folder to write the GGUF file(s) into")
    need = sum(estimate_bytes(p, v) for p in plans)
    probe = _existing_ancestor(out)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise OSError(f"not enough free disk in {probe}: the {len(plans)} GGUF file(s) need about "
                      f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free; free space or pick a smaller method")
    return ExportJob(config, tokenizer, shapes, methods, v, [out / _out_name(stem, m.name) for m in methods])


def run_export(job: ExportJob, tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], *,
               device: str | torch.device | None = None, round_to: str | None = None,
               modelfile: bool = True) -> list[Path]:
    """Write the files of a :func:`prepare_export` job; ``tensors()`` gives a fresh stream per file.

    device: where to quantize; default CUDA when available, else where each tensor is.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    if job.paths:
        job.paths[0].parent.mkdir(parents=True, exist_ok=True)
    for m, p in zip(job.methods, job.paths):
        write_gguf(p, job.config, job.tokenizer, tensors(), m.name, device=device, round_to=round_to,
                   tensor_shapes=job.shapes, vocab=job.vocab)
    if modelfile:
        from .modelfile import write_modelfile

        write_modelfile(job.paths[0], job.tokenizer)
    return list(job.paths)


def export_gguf(hf_dir_or_model, out_dir: str | os.PathLike, quantization_method: str | Sequence[str] = "q4_k_m",
                tokenizer=None, *, stem: str = "model", device: str | torch.device | None = None,
                round_to: str | None = None, modelfile: bool = True) -> list[Path]:
    """Export a HF causal LM to one GGUF file per quantization method; returns the paths.

    hf_dir_or_model: a HF model folder (config.json + *.safetensors) or a transformers model with
      16-bit/32-bit weights (for a PEFT / 4-bit model use ``model.save_pretrained_gguf``, which
      merges onto the dequantised base). Architectures: llama, mistral, qwen2, qwen3, gemma.
    quantization_method: one name or a list: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k,
      q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k; aliases "not_quantized" (f16),
      "fast_quantized" (q8_0), "quantized" (q4_k_m).
    tokenizer: the HF tokenizer (default: loaded from the folder).
    device: where to quantize; default CUDA when available, else CPU.
    round_to: see :func:`write_gguf` (``"f16"`` reproduces llama.cpp's convert-to-f16-then-quantize).
    modelfile: also write ``out_dir/Modelfile`` (Ollama) for the first file.
    Files: ``out_dir/{stem}.{METHOD}.gguf``, each written atomically. Everything is validated
    (methods, architecture, tokenizer, free disk) before the first tensor is quantized.
    """
    methods = resolve_methods(quantization_method)
    config, src_dir, tensors, shapes = _source(hf_dir_or_model)
    _arch_of(config)
    if tokenizer is None:
        if src_dir is None:
            raise ValueError("pass tokenizer= when exporting a model object")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src_dir)
    job = prepare_export(config, tokenizer, shapes, methods, out_dir, stem=stem, src_dir=src_dir)
    return run_export(job, tensors, device=device, round_to=round_to, modelfile=modelfile)
