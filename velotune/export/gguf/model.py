"""GGUF files of a model velotune loaded: LoRA merged in fp32 and streamed into the writer.

``model.save_pretrained_gguf`` calls :func:`save_model_gguf`. The model may be a PEFT LoRA model on
a 4-bit / 8-bit / 16-bit base, or a plain (full-finetuned or untouched) model. Each weight is
dequantised to fp32, its LoRA delta added in fp32 (:func:`velotune.export.merge.iter_merged_tensors`)
and handed to :func:`.convert.write_gguf` one tensor at a time: no 16-bit copy of the model is
written to disk, and memory stays at one merged weight beyond the model itself.

Everything is checked first (methods, architecture, tokenizer, every method's tensor plan, free
disk) by the same :func:`.convert.prepare_export` that ``export_gguf`` uses; only then is the first
tensor merged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..._notices import VelotuneError, say, say_once
from ..merge import _merged_config, iter_merged_tensors, merged_tensor_shapes
from .convert import prepare_export, resolve_methods, run_export

# The incumbent's save_pretrained_gguf arguments that mean nothing here (no intermediate folder,
# no llama.cpp subprocess); accepted so existing scripts run, said once.
_IGNORED_ARGS = ("maximum_memory_usage", "temporary_location", "max_shard_size", "safe_serialization")
# first_conversion was the incumbent's intermediate f16/bf16 file; round_to reproduces that rounding.
_FIRST_CONVERSION = {None: None, "f32": None, "f16": "f16", "bf16": "bf16"}


def _default_tokenizer(model):
    from ...loading import state_of

    try:
        tokenizer = state_of(model).tokenizer
    except VelotuneError:
        tokenizer = None
    if tokenizer is None:
        raise VelotuneError("this model has no tokenizer velotune loaded with it; pass tokenizer= "
                            "(the HF tokenizer of this model)")
    return tokenizer


def _round_to(round_to, first_conversion):
    if first_conversion is not None:
        key = str(first_conversion).lower()
        if key not in _FIRST_CONVERSION:
            raise VelotuneError(f"first_conversion={first_conversion!r} is not one of f32, f16, bf16 "
                                "(it sets the rounding before quantizing; round_to= is velotune's name)")
        if round_to is not None and round_to != _FIRST_CONVERSION[key]:
            raise VelotuneError(f"round_to={round_to!r} and first_conversion={first_conversion!r} disagree; pass one")
        return _FIRST_CONVERSION[key]
    if round_to not in (None, "f16", "bf16"):
        raise VelotuneError(f"round_to={round_to!r} must be None, 'f16' or 'bf16'")
    return round_to


def save_model_gguf(model, save_directory: str | os.PathLike, tokenizer=None,
                    quantization_method: str | Sequence[str] = "fast_quantized", *, stem: str = "model",
                    device: str | torch.device | None = None, round_to: str | None = None,
                    modelfile: bool = True, push_to_hub: bool = False, first_conversion: str | None = None,
                    **kwargs) -> list[Path]:
    """Merge LoRA onto the fp32-dequantised base and write one GGUF file per method; returns the paths.

    model: a model velotune returned (PEFT LoRA on a 4-bit / 8-bit / 16-bit base, or a plain one).
    tokenizer: default the one velotune loaded with the model.
    quantization_method: a name or a list (see :data:`.mixes.METHODS` / :data:`.mixes.ALIASES`).
    stem, device, round_to, modelfile: as :func:`.convert.export_gguf`. ``first_conversion``
      ("f16" / "bf16" / "f32", the incumbent's name) sets ``round_to``.
    Files: ``save_directory/{stem}.{METHOD}.gguf`` (atomic) and ``save_directory/Modelfile``.
    With several methods the merge is streamed once per file (it costs far less than quantizing and
    keeps memory at one weight).
    """
    unknown = [k for k in kwargs if k not in _IGNORED_ARGS]
    if unknown:
        raise TypeError(f"save_pretrained_gguf() got unexpected argument(s) {sorted(unknown)}")
    for k in kwargs:
        say_once("gguf-ignored:" + k, f"save_pretrained_gguf: {k}= has no effect in velotune (no temporary "
                 "folder, no llama.cpp); ignored")
    if push_to_hub:
        raise VelotuneError("velotune saves locally; upload the folder with huggingface_hub.upload_folder(...)")
    methods = resolve_methods(quantization_method)
    round_to = _round_to(round_to, first_conversion)
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(model)
    config = _merged_config(model, torch.float32)
    job = prepare_export(config, tokenizer, merged_tensor_shapes(model), methods, save_directory, stem=stem)
    say(f"writing {', '.join(p.name for p in job.paths)} to {Path(save_directory)}: LoRA merged in fp32 onto "
        "the dequantised base, streamed tensor by tensor")

    with torch.no_grad():  # B @ A of trainable LoRA weights would otherwise record a graph per layer
        return run_export(job, lambda: iter_merged_tensors(model, torch.float32), device=device,
                          round_to=round_to, modelfile=modelfile)
