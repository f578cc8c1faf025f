"""Merging LoRA into the base and writing Hugging Face folders (safetensors, sharded, atomic).

The merge is exact to fp32: each frozen base weight is dequantised (NF4 / int8) or upcast to fp32,
the LoRA delta ``scaling * B @ A`` is added in fp32, and only then is the sum rounded once to the
save dtype. Tensors are produced one at a time (:func:`iter_merged_tensors`), so memory stays at one
shard plus one weight, and the same stream feeds the GGUF writer.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .._layers import (is_4bit, is_8bit, is_lora_layer, is_modules_to_save, is_quantized_linear,
                       saved_module)
from .._progress import track
from .._notices import VelotuneError, say
from .atomic import atomic_directory, check_free_disk

SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit")
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size) -> int:
    """'5GB' / '500MB' / '2GiB' / int bytes -> bytes."""
    if isinstance(size, int) and size > 0:
        return size
    s = str(size).strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * _SIZE_UNITS[unit])
    raise VelotuneError(f"max_shard_size={size!r} is not a size; use e.g. '5GB', '500MB' or a number of bytes")


# ------------------------------------------------------------------------------- dequantisation
def dequantized_weight(linear) -> torch.Tensor:
    """The weight of a (possibly bitsandbytes-quantised) linear layer as a float32 [out, in] tensor."""
    w = linear.weight
    if is_4bit(w):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float().reshape(linear.out_features, linear.in_features)
    if is_8bit(w):
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(linear, "state", None), "SCB", None)
        if scb is None:
            raise VelotuneError(f"cannot dequantise int8 layer {linear}: its scale (SCB) is missing")
        return w.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return w.data.float()


def _lora_delta(layer, adapter: str) -> torch.Tensor:
    """scaling * B @ A in fp32, shaped like the base weight [out, in]."""
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    delta = (b @ a) * float(layer.scaling[adapter])
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def _walk(base):
    """(prefix, kind, module) over the modules whose tensors make up the merged model, in order.

    kind: "lora" (a LoRA-wrapped linear), "saved" (a modules_to_save wrapper), "quant" (a quantised
    linear without LoRA) — their inner modules are not visited — or "plain" (own params and buffers).
    """
    done: list[str] = []
    for name, mod in base.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        kind = ("lora" if is_lora_layer(mod) else "saved" if is_modules_to_save(mod)
                else "quant" if is_quantized_linear(mod) else "plain")
        if kind != "plain":
            done.append(name)
        yield (name + "." if name else ""), kind, mod


def _check_mergeable(layer, name: str) -> list[str]:
    if getattr(layer, "use_dora", {}) and any(layer.use_dora.values()):
        raise VelotuneError(f"{name}: DoRA adapters cannot be merged by velotune yet")
    if getattr(layer, "merged", False):
        raise VelotuneError(f"{name}: adapters are already merged into the base; unmerge (model.unmerge_adapter()) first")
    return [a for a in layer.active_adapters if a in layer.lora_A]


def iter_merged_tensors(model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor in ``dtype``, on CPU) for every weight of the merged model.

    ``model`` is a PeftModel or a plain velotune-loaded model. Names are the base model's own
    (``model.layers.0.self_attn.q_proj.weight``); tied output embeddings are yielded once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    yielded: set[int] = set()

    def emit(name: str, t: torch.Tensor, key: int | None = None):
        if key is not None:
            if key in yielded:
                return None
            yielded.add(key)
        return name, t.detach().to(dtype=dtype if t.is_floating_point() else t.dtype, device="cpu").contiguous()

    for prefix, kind, mod in _walk(base):
        if kind == "lora":
            w = dequantized_weight(mod.base_layer)
            for adapter in _check_mergeable(mod, prefix.rstrip(".")):
                w = w + _lora_delta(mod, adapter).to(w.device)
            out = [emit(prefix + "weight", w)]
            bias = getattr(mod.base_layer, "bias", None)
            if bias is not None:
                b = bias.detach().float()
                for adapter in mod.active_adapters:
                    lb = getattr(mod.lora_B[adapter], "bias", None) if adapter in mod.lora_B else None
                    if lb is not None:
                        b = b + lb.detach().float() * float(mod.scaling[adapter])
                out.append(emit(prefix + "bias", b))
            yield from (o for o in out if o is not None)
        elif kind == "saved":
            for pname, p in saved_module(mod).named_parameters():
                o = emit(prefix + pname, p.float(), key=id(p))
                if o is not None:
                    yield o
        elif kind == "quant":
            yield emit(prefix + "weight", dequantized_weight(mod))
            if getattr(mod, "bias", None) is not None:
                yield emit(prefix + "bias", mod.bias.float())
        else:
            for pname, p in mod.named_parameters(recurse=False):
                o = emit(prefix + pname, p, key=id(p))
                if o is not None:
                    yield o
            skip = getattr(mod, "_non_persistent_buffers_set", set())
            for bname, buf in mod.named_buffers(recurse=False):
                if buf is not None and bname not in skip:
                    yield emit(prefix + bname, buf)


def merged_tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor :func:`iter_merged_tensors` yields, in its order, from module
    metadata alone (nothing is dequantised or merged: packed 4-bit / int8 weights report the
    layer's [out_features, in_features]). Same walk, same names; tied weights once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()

    def once(p) -> bool:
        if id(p) in seen:
            return False
        seen.add(id(p))
        return True

    for prefix, kind, mod in _walk(base):
        if kind in ("lora", "quant"):
            lin = mod.base_layer if kind == "lora" else mod
            shape = (lin.out_features, lin.in_features) if is_quantized_linear(lin) else tuple(lin.weight.shape)
            shapes[prefix + "weight"] = shape
            if getattr(lin, "bias", None) is not None:
                shapes[prefix + "bias"] = tuple(lin.bias.shape)
        elif kind == "saved":
            shapes.update((prefix + n, tuple(p.shape)) for n, p in saved_module(mod).named_parameters() if once(p))
        else:
            shapes.update((prefix + n, tuple(p.shape)) for n, p in mod.named_parameters(recurse=False) if once(p))
            skip = getattr(mod, "_non_persistent_buffers_set", set())
            shapes.update((prefix + n, tuple(b.shape)) for n, b in mod.named_buffers(recurse=False)
                          if b is not None and n not in skip)
    return shapes


def estimate_merged_bytes(model, dtype: torch.dtype) -> int:
    """Bytes the merged model takes in ``dtype`` (from :func:`merged_tensor_shapes`; nothing is dequantised)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s) for s in merged_tensor_shapes(model).values()) * itemsize


# ------------------------------------------------------------------------------------- writing
def _merged_config(model, dtype: torch.dtype):
    import copy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.dtype = dtype
    return cfg


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int) -> list[str]:
    """Write safetensors shards ``model-0000i-of-0000N.safetensors`` (+ index) or one ``model.safetensors``."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    buf: dict[str, torch.Tensor] = {}
    buf_bytes = total = 0

    def flush():
        nonlocal buf, buf_bytes
        if buf:
            save_file(buf, str(folder / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(buf))
            buf, buf_bytes = {}, 0

    for name, t in tensors:
        if name in weight_map or name in buf:
            raise VelotuneError(f"internal error: tensor {name} produced twice while merging")
        nbytes = t.numel() * t.element_size()
        if buf and buf_bytes + nbytes > max_shard_bytes:
            flush()
        buf[name] = t
        buf_bytes += nbytes
        total += nbytes
        weight_map[name] = len(shards)
    flush()
    if len(shards) == 1:
        os.replace(folder / "part-00000.safetensors", folder / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, n in enumerate(names):
        os.replace(folder / f"part-{i:05d}.safetensors", folder / n)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def resolve_save_dtype(model, dtype) -> torch.dtype:
    """Default: the model's compute dtype when it is 16-bit, else bfloat16 ("merged_16bit")."""
    if dtype is not None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise VelotuneError(f"dtype={dtype} cannot be saved; use torch.bfloat16, torch.float16 or torch.float32")
        return dtype
    from ..loading import state_of

    try:
        d = state_of(model).dtype
    except VelotuneError:
        d = next(model.parameters()).dtype
    return d if d in (torch.float16, torch.bfloat16) else torch.bfloat16


def save_merged_16bit(model, save_directory, tokenizer=None, max_shard_size="5GB", dtype=None) -> Path:
    """Merge LoRA into the fp32-dequantised base and write a plain HF folder (see module docstring)."""
    dtype = resolve_save_dtype(model, dtype)
    shard = parse_size(max_shard_size)
    need = estimate_merged_bytes(model, dtype)
    check_free_disk(Path(save_directory).parent, int(need * 1.05) + (64 << 20), "the merged model")
    say(f"merging LoRA into the base in fp32 and saving {dtype} safetensors to {save_directory} "
        f"(~{need / 1024**3:.2f} GiB)")
    with atomic_directory(save_directory) as tmp:
        with torch.no_grad():
            n = len(merged_tensor_shapes(model))
            write_sharded(track(iter_merged_tensors(model, dtype), n, "merging LoRA + saving"), tmp, shard)
        _merged_config(model, dtype).save_pretrained(tmp)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        gen = getattr(base, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)


def save_lora(model, save_directory, tokenizer=None) -> Path:
    """Write the PEFT adapter (adapter_config.json + adapter_model.safetensors) and tokenizer, atomically."""
    if not hasattr(model, "peft_config"):
        raise VelotuneError("save_method='lora' needs a model with LoRA adapters (from FastLanguageModel.get_peft_model)")
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)


def save_pretrained_merged(self, save_directory, tokenizer=None, save_method="merged_16bit",
                           max_shard_size="5GB", dtype=None, push_to_hub=False, **kwargs):
    """Save the trained model for deployment.

    Args:
        save_directory: folder to write (created; an existing one receives the new files atomically).
        tokenizer: saved alongside when given (defaults to the tokenizer velotune loaded).
        save_method: "merged_16bit" (LoRA merged into the fp32-dequantised base, rounded once to
            16-bit, sharded safetensors loadable by plain transformers) or "lora" (the PEFT adapter).
        max_shard_size: shard size for merged weights, e.g. "5GB".
        dtype: save dtype for merged weights; default the model's 16-bit compute dtype, else bfloat16.
    Returns the folder path.
    """
    if kwargs:
        raise TypeError(f"save_pretrained_merged() got unexpected argument(s) {sorted(kwargs)}")
    if push_to_hub:
        raise VelotuneError("velotune saves locally; upload the folder with huggingface_hub.upload_folder(...)")
    if save_method not in SAVE_METHODS:
        raise VelotuneError(f"save_method={save_method!r} is not one of {list(SAVE_METHODS)}")
    if tokenizer is None:
        from ..loading import state_of

        try:
            tokenizer = state_of(self).tokenizer
        except VelotuneError:
            tokenizer = None
    if save_method == "lora":
        return save_lora(self, save_directory, tokenizer)
    if save_method == "merged_4bit":
        raise VelotuneError(
            "save_method='merged_4bit' is not supported: re-quantising a merged model loses the LoRA update's "
            "precision. Save 'merged_16bit' and load that with load_in_4bit=True"
        )
    return save_merged_16bit(self, save_directory, tokenizer, max_shard_size, dtype)


# unsloth_save_model's keywords that act only on an upload (push_to_hub=True, which velotune leaves to
# huggingface_hub) or on Unsloth's own merge buffers (velotune's merge streams one tensor at a time):
# accepted, nothing to do with them
_UPLOAD_OR_BUFFER_KEYWORDS = frozenset({
    "token", "commit_message", "private", "create_pr", "revision", "commit_description", "tags", "datasets",
    "use_temp_dir", "temporary_location", "maximum_memory_usage"})
# its keywords that velotune takes at their defaults only: (accepted values, why another value is refused)
_DEFAULT_ONLY_KEYWORDS = {
    "safe_serialization": ((True, None), "velotune writes safetensors only (a pickled file can run code when it "
                                         "is loaded)"),
    "save_function": ((torch.save,), "velotune writes safetensors itself; drop save_function"),
    "state_dict": ((None,), "velotune reads the weights from the model; pass the model, not a state_dict"),
    "variant": ((None,), "velotune does not name files by variant; save into a folder of its own instead"),
    "save_peft_format": ((True,), "velotune writes adapters in PEFT's format, which PEFT and Unsloth load"),
}


def unsloth_save_model(model, tokenizer, save_directory, save_method: str = "lora", push_to_hub: bool = False,
                       is_main_process: bool = True, max_shard_size="5GB", **kwargs) -> Path:
    """The seed's ``unsloth_save_model(model, tokenizer, "output_model", push_to_hub=False)``, by the same name.

    ``save_method``: ``"lora"`` (Unsloth's default: the PEFT adapter and the tokenizer) or ``"merged_16bit"``
    (LoRA merged in fp32 into the dequantised base, one rounding, a transformers folder): the same writes as
    ``model.save_pretrained_merged`` (atomic, safetensors). ``is_main_process=False`` writes nothing (another
    process saves). Unsloth's upload and buffer keywords (``token``, ``commit_message``, ...,
    ``maximum_memory_usage``) are accepted and have nothing to act on; ``push_to_hub=True`` raises (upload the
    folder with ``huggingface_hub.upload_folder``). Returns the folder.
    """
    unknown = sorted(set(kwargs) - _UPLOAD_OR_BUFFER_KEYWORDS - set(_DEFAULT_ONLY_KEYWORDS))
    if unknown:
        raise TypeError(f"unsloth_save_model() got unexpected argument(s) {unknown}")
    for name, (accepted, why) in _DEFAULT_ONLY_KEYWORDS.items():
        if name in kwargs and not any(kwargs[name] is ok for ok in accepted):
            raise VelotuneError(f"unsloth_save_model({name}={kwargs[name]!r}): {why}")
    if push_to_hub:
        raise VelotuneError("velotune saves locally: unsloth_save_model(..., push_to_hub=False), then upload the "
                            "folder with huggingface_hub.upload_folder(...)")
    if not is_main_process:
        return Path(save_directory)
    return save_pretrained_merged(model, save_directory, tokenizer, save_method=save_method,
                                  max_shard_size=max_shard_size)
