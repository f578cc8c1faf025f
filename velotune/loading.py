"""Loading: where a model comes from, which dtype and quantisation, RoPE scaling, tokenizer fixes.

Everything here delegates to transformers/bitsandbytes/PEFT; velotune only decides the arguments,
checks them early, and says what it chose. ``FastLanguageModel.from_pretrained`` is the public entry.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._notices import VelotuneError, say, say_once
from .device import default_dtype, is_bfloat16_supported

ADAPTER_CONFIG = "adapter_config.json"
_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
# Tokens that exist in common vocabularies and are meant for padding; tried before adding one.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|vision_pad|>")
VELOTUNE_PAD = "<|velotune_pad|>"


@dataclass
class VelotuneState:
    """What velotune remembers about a loaded model (kept on the HF model as ``_velotune``)."""

    tokenizer: object = None
    max_seq_length: int = 2048
    dtype: torch.dtype = torch.float32
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    full_finetuning: bool = False
    source: str = ""
    gradient_checkpointing: object = False
    # the most tokens one training batch holds in all (rows x length), where a trainer knows it (velotune's
    # SFTTrainer: per-device batch x max_length); sizes the CUDA graphs' shared buffers, so that padding-free
    # rows (one row of every example of a batch) do not grow them, and drop every recorded shape, step after step
    batch_tokens: int = 0
    # the tokens of the longest batch the trainer expects from its dataset (rows x bucket length; 0: unknown):
    # the CUDA graphs' pool is sized for it at the first capture, so a longer batch later reuses the pool
    # instead of adding segments of its own (models/graphs.py: reserve)
    longest_batch_tokens: int = 0
    extra: dict = field(default_factory=dict)


def state_of(model) -> VelotuneState:
    """The ``VelotuneState`` of a model loaded by velotune (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    st = getattr(base, "_velotune", None)
    if st is None:
        raise VelotuneError(
            "this model was not loaded by velotune; load it with "
            "`FastLanguageModel.from_pretrained(...)` so velotune knows its dtype, quantisation and tokenizer"
        )
    return st


# ----------------------------------------------------------------------------------------- dtype
def resolve_dtype(dtype, device_type: str) -> torch.dtype:
    """``dtype=None`` -> :func:`velotune.device.default_dtype`; strings and torch dtypes are accepted."""
    if dtype is None:
        return default_dtype(device_type)
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise VelotuneError(
                f"dtype={dtype!r} is not a dtype velotune knows; use None (auto), torch.bfloat16, "
                "torch.float16 or torch.float32"
            )
        dtype = _DTYPE_NAMES[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise VelotuneError(f"dtype={dtype} is not supported; use None (auto), torch.bfloat16, torch.float16 or torch.float32")
    if device_type == "cuda" and dtype == torch.bfloat16 and not is_bfloat16_supported():
        name = torch.cuda.get_device_name()
        raise VelotuneError(
            f"dtype=torch.bfloat16 needs a GPU of compute capability >= 8.0; {name} has "
            f"{torch.cuda.get_device_capability()}; pass dtype=None (picks float16 here) or dtype=torch.float16"
        )
    return dtype


# ---------------------------------------------------------------------------------------- source
@dataclass
class Source:
    """Where weights come from. ``kind`` is "local", "hub" or "adapter" (a PEFT adapter folder)."""

    kind: str
    name: str
    adapter_dir: str | None = None


def _hub_offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    return bool(is_offline_mode()) or os.environ.get("TRANSFORMERS_OFFLINE", "0") in ("1", "true", "TRUE")


def resolve_source(model_name, token=None, revision=None, trust_remote_code=False) -> Source:
    """Classify ``model_name``: a local folder, a PEFT adapter folder, or a Hub id (checked now, failing fast)."""
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name).strip():
        raise VelotuneError(f"model_name must be a local folder or a Hugging Face Hub id, got {model_name!r}")
    name = os.fspath(model_name)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            if not base:
                raise VelotuneError(
                    f"{path / ADAPTER_CONFIG} names no base_model_name_or_path; load the base model, then "
                    "`peft.PeftModel.from_pretrained(model, adapter_dir)`"
                )
            return Source("adapter", base, adapter_dir=str(path))
        if not (path / "config.json").is_file():
            raise VelotuneError(
                f"{path} is a folder but holds no config.json (not a Hugging Face model folder) and no "
                f"{ADAPTER_CONFIG} (not a PEFT adapter); point model_name at the folder that holds them"
            )
        return Source("local", str(path))
    if path.exists():
        raise VelotuneError(f"model_name={name!r} is a file; pass the folder that holds config.json and the weights")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise VelotuneError(f"model_name={name!r}: no such folder; check the path")
    _check_hub(name, token, revision, trust_remote_code)
    return Source("hub", name)


def _check_hub(name: str, token, revision, trust_remote_code) -> None:
    """Make sure a Hub id can be loaded: from the local HF cache, or online; otherwise fail now."""
    from transformers import AutoConfig

    kw = dict(token=token, revision=revision, trust_remote_code=trust_remote_code)
    try:
        AutoConfig.from_pretrained(name, local_files_only=True, **kw)
        return
    except (OSError, ValueError):
        pass
    if _hub_offline():
        raise VelotuneError(
            f"model_name={name!r} looks like a Hugging Face Hub id, but the Hub is offline here "
            "(HF_HUB_OFFLINE=1) and it is not in the local cache; download it where you are online "
            "(`huggingface-cli download " + name + " --local-dir DIR`) and pass model_name=DIR"
        )
    try:
        AutoConfig.from_pretrained(name, **kw)
    except OSError as e:
        raise VelotuneError(
            f"could not load {name!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check the id and your network or token, or pass a local folder path as model_name"
        ) from e


# ---------------------------------------------------------------------------------- quantisation
def prequantized(config) -> dict | None:
    """The checkpoint's own quantization_config (as a dict) when it is pre-quantized, else None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype):
    """bitsandbytes config: NF4 + double quantisation + compute dtype = ``dtype``; or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_quant_flags(load_in_4bit, load_in_8bit, full_finetuning, pre: dict | None):
    """Validate the 4-bit / 8-bit / full fine-tuning combination; returns the effective (4bit, 8bit)."""
    if load_in_4bit and load_in_8bit:
        raise VelotuneError("load_in_4bit=True and load_in_8bit=True are exclusive; pick one")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        if pre is not None:
            raise VelotuneError(
                "full_finetuning=True needs 16-bit weights, but this checkpoint is pre-quantized "
                f"({pre.get('quant_method')}); load the original 16-bit checkpoint instead"
            )
        say_once("fullft-no-quant", "full_finetuning=True: loading 16-bit weights (load_in_4bit/8bit ignored; "
                 "every weight is trained, which quantised storage cannot do)")
        return False, False
    if pre is not None and pre.get("quant_method") == "bitsandbytes":
        pre4 = bool(pre.get("load_in_4bit") or pre.get("_load_in_4bit"))
        if not pre4 and not (pre.get("load_in_8bit") or pre.get("_load_in_8bit")):
            pre4 = True
        if pre4 and not load_in_4bit:
            say_once("pre4bit", "this checkpoint is pre-quantized to 4-bit (bitsandbytes); it loads as 4-bit "
                     "(QLoRA). For 16-bit LoRA load the original 16-bit checkpoint.")
        return pre4, not pre4
    return load_in_4bit, load_in_8bit


# ------------------------------------------------------------------------------------------ RoPE
def apply_rope_scaling(config, max_seq_length: int, rope_scaling: dict | None) -> str | None:
    """Extend the context to ``max_seq_length`` when it exceeds the model's. Returns what was done.

    Default RoPE -> linear scaling with factor max_seq_length / max_position_embeddings (what the
    incumbent does; the fine-tune then adapts to the stretched positions). A model that already uses
    a scaled RoPE (llama3, yarn, ...) is not stacked silently: pass ``rope_scaling`` yourself.
    An explicit ``rope_scaling`` dict (e.g. {"rope_type": "dynamic", "factor": 2.0}) is always applied.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    native = getattr(config, "max_position_embeddings", None)
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict) or not (rope_scaling.get("rope_type") or rope_scaling.get("type")):
            raise VelotuneError(
                f"rope_scaling={rope_scaling!r} must be a dict with a 'rope_type' "
                "(linear, dynamic, yarn, llama3, ...) and its fields, e.g. {'rope_type': 'linear', 'factor': 2.0}"
            )
        new = dict(rope_scaling)
        new.setdefault("rope_type", new.pop("type", None))
        config.rope_parameters = {**params, **new}
        return f"RoPE scaling {new} (as requested)"
    if native is None or max_seq_length <= native:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise VelotuneError(
            f"max_seq_length={max_seq_length} exceeds this model's context ({native} tokens, already "
            f"using {rope_type} RoPE scaling); pass rope_scaling={{...}} explicitly or lower max_seq_length"
        )
    factor = math.ceil(max_seq_length / native * 100) / 100
    config.rope_parameters = {**params, "rope_type": "linear", "factor": factor}
    # Linear scaling does not read max_position_embeddings; recording the new context makes a saved
    # model say what it was trained for, and reloading it at the same length changes nothing.
    config.max_position_embeddings = int(native * factor)
    return (f"max_seq_length={max_seq_length} exceeds the model's context ({native}): applied linear RoPE "
            f"scaling, factor {factor} (pass rope_scaling= to choose another)")


# ------------------------------------------------------------------------------------- tokenizer
def fix_tokenizer(tokenizer, model, max_seq_length: int) -> list[str]:
    """Make a tokenizer ready for training; returns the list of changes made (each also said once).

    - a pad token that is NOT the EOS token when the vocabulary has one meant for padding (padding
      with EOS makes collators that mask pad ids also mask the real EOS, and the model never learns
      to stop); else the unknown token; else a new ``<|velotune_pad|>`` token (embeddings resized);
    - right padding for training (``for_inference`` switches to left);
    - ``model_max_length = max_seq_length``; pad id copied to the model and generation configs.
    """
    changes = []
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pick = next((t for t in _PAD_CANDIDATES if t in vocab), None)
        unk = tokenizer.unk_token
        if pick is None and unk is not None and unk not in (tokenizer.eos_token, tokenizer.bos_token):
            pick = unk
        if pick is not None:
            tokenizer.pad_token = pick
            changes.append(f"pad token set to {pick!r} (the tokenizer had none)")
        else:
            tokenizer.add_special_tokens({"pad_token": VELOTUNE_PAD})
            model.resize_token_embeddings(len(tokenizer))
            changes.append(f"added pad token {VELOTUNE_PAD!r} and resized embeddings to {len(tokenizer)}")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # e.g. a tokenizer class whose default special tokens are missing from this vocabulary
        model.resize_token_embeddings(len(tokenizer))
        changes.append(f"embeddings resized from {rows} to {len(tokenizer)} rows to cover the tokenizer's tokens")
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    for c in changes:
        say_once("tok:" + c, "tokenizer: " + c)
    return changes


def disable_cpu_bf16_repack(model) -> int:
    """bitsandbytes 0.50 on CPU can repack 4-bit weights for AVX512-BF16 after an inference call,
    after which LoRA gradients are silently zero. Turn that off on every Linear4bit; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def announce(model_name: str, dtype: torch.dtype, load_in_4bit: bool, load_in_8bit: bool, device: str) -> None:
    mode = "4-bit NF4 (QLoRA)" if load_in_4bit else "8-bit (LLM.int8)" if load_in_8bit else "16/32-bit"
    say(f"loading {model_name} on {device}: weights {mode}, compute dtype {str(dtype).replace('torch.', '')}")
