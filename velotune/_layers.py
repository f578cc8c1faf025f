"""What kind of layer a module is: PEFT LoRA wrapper, PEFT modules_to_save wrapper, bitsandbytes weight.

Checked by attribute and class names only, so importing this needs neither PEFT nor bitsandbytes;
the fast forward (models/) and the merge (export/) share these answers.
"""
from __future__ import annotations

import torch


def is_lora_layer(m) -> bool:
    """A PEFT LoRA layer (``base_layer`` wrapped with ``lora_A`` / ``lora_B`` / ``scaling``)."""
    return hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "scaling")


def is_modules_to_save(m) -> bool:
    """A PEFT ``ModulesToSaveWrapper`` (a fully trained copy of a module, e.g. ``lm_head``)."""
    return hasattr(m, "original_module") and hasattr(m, "modules_to_save")


def saved_module(wrapper):
    """The module a ModulesToSaveWrapper runs: the active adapter's trained copy, else the original."""
    active = wrapper.active_adapters[0] if wrapper.active_adapters else None
    return wrapper.modules_to_save[active] if active in wrapper.modules_to_save else wrapper.original_module


def is_4bit(weight) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``, packed uint8 storage with a quant_state)."""
    return type(weight).__name__ == "Params4bit" or getattr(weight, "quant_state", None) is not None


def is_8bit(weight) -> bool:
    """A bitsandbytes LLM.int8 weight (``Int8Params``)."""
    return type(weight).__name__ == "Int8Params" or weight.dtype == torch.int8


def is_quantized_linear(m) -> bool:
    """A linear layer whose weight bitsandbytes stores quantised (4-bit or int8)."""
    w = getattr(m, "weight", None)
    return w is not None and (is_4bit(w) or is_8bit(w) or w.dtype == torch.uint8)
