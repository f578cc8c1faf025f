"""LoRA adapters: argument checks, PEFT config, gradient checkpointing mode.

PEFT owns the adapters and their file format; velotune validates the user's arguments early (with
messages that name the fix), seeds the adapter init, and sets gradient checkpointing.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from ._notices import VelotuneError, say_once
from .loading import state_of

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BIAS_CHOICES = ("none", "all", "lora_only")
# True = recompute activations in backward; "unsloth" is the incumbent's name for its offloaded variant.
GC_CHOICES = (True, False, "unsloth", "offload", "auto")
# Arguments the incumbent's get_peft_model accepts that have no effect here; accepted so scripts run.
_IGNORED = ("max_seq_length", "temporary_location")


def _linear_kinds() -> tuple[type, ...]:
    kinds: list[type] = [nn.Linear]
    try:
        import bitsandbytes as bnb

        kinds += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    return tuple(kinds)


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded), sorted."""
    kinds = _linear_kinds()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds) and m is not head}
    return sorted(names)


def _closest(name: str, choices) -> str:
    hit = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {hit[0]!r}?" if hit else ""


def _num_layers(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "num_hidden_layers", None)


def check_peft_args(model, r, target_modules, lora_alpha, lora_dropout, bias, use_gradient_checkpointing,
                    layers_to_transform, modules_to_save, use_rslora) -> list[str] | str:
    """Validate get_peft_model's arguments; returns the target module list to pass to PEFT."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise VelotuneError(f"r={r!r} must be a positive integer (the LoRA rank); typical values are 8, 16, 32, 64")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise VelotuneError(f"lora_alpha={lora_alpha!r} must be a positive number; lora_alpha=r (scale 1) is a safe start")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise VelotuneError(f"lora_dropout={lora_dropout!r} must be in [0, 1); 0 is fastest and usual")
    if bias not in BIAS_CHOICES:
        raise VelotuneError(f"bias={bias!r} is not one of {list(BIAS_CHOICES)}; 'none' is usual")
    validate_gc(use_gradient_checkpointing)
    if not isinstance(use_rslora, bool):
        raise VelotuneError(f"use_rslora={use_rslora!r} must be True or False")
    available = linear_module_names(model)
    if target_modules is None:
        target_modules = [t for t in DEFAULT_TARGETS if t in available] or available
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise VelotuneError(
                f"target_modules={target_modules!r}: pass a list of module names (e.g. {DEFAULT_TARGETS}) or 'all-linear'"
            )
    else:
        target_modules = list(target_modules)
        if not target_modules:
            raise VelotuneError(f"target_modules is empty; choose among this model's linear layers: {available}")
        for t in target_modules:
            if not isinstance(t, str) or t not in available:
                raise VelotuneError(
                    f"target module {t!r} is not a linear layer of this model{_closest(str(t), available)} "
                    f"This model's linear layers are: {available}"
                )
    n_layers = _num_layers(model)
    if layers_to_transform is not None:
        layers = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
        bad = [i for i in layers if not isinstance(i, int) or n_layers is not None and not 0 <= i < n_layers]
        if bad or not layers:
            raise VelotuneError(
                f"layers_to_transform={layers_to_transform!r}: layer indices must be integers in [0, {n_layers})"
            )
    if modules_to_save is not None:
        leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
        for m in modules_to_save:
            if m not in leaves:
                raise VelotuneError(
                    f"modules_to_save entry {m!r} is not a module of this model{_closest(str(m), sorted(leaves))} "
                    "(common choices: 'lm_head', 'embed_tokens')"
                )
    return target_modules


def validate_gc(value) -> None:
    """Raise unless ``value`` is a use_gradient_checkpointing choice velotune knows."""
    if isinstance(value, bool) or (isinstance(value, str) and value in GC_CHOICES):
        return
    raise VelotuneError(
        f"use_gradient_checkpointing={value!r} is not one of True (recompute), False (keep activations), "
        "'unsloth' / 'offload' (offloaded recompute), 'auto'"
    )


def gradient_checkpointing_mode(value) -> bool:
    """Map the user's value to gradient checkpointing on/off; says once when a GPU path is switched off.

    "unsloth" / "offload" and "auto" checkpoint (True); what they add (host offload, the memory planner)
    happens in the fast forward (models/offload.py, models/graphs.py), which reads the original value."""
    from .models import graphs, offload

    validate_gc(value)
    if value in ("unsloth", "offload") and not offload.ENABLED_ON_CUDA:
        say_once(
            "gc-offload",
            f"use_gradient_checkpointing={value!r}: offloaded checkpointing is switched off on GPUs "
            "(velotune.models.offload.ENABLED_ON_CUDA); using recompute checkpointing (same numerics, more GPU memory)",
        )
    if value == "auto" and not graphs.KEEP_ON_CUDA:
        say_once(
            "gc-auto",
            "use_gradient_checkpointing='auto': the memory planner is switched off on GPUs "
            "(velotune.models.graphs.KEEP_ON_CUDA); using recompute checkpointing (same numerics)",
        )
    return value is not False


def get_peft_model(model, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
                   layers_to_transform=None, layers_pattern=None, use_gradient_checkpointing="unsloth",
                   random_state=3407, use_rslora=False, modules_to_save=None, init_lora_weights=True,
                   loftq_config=None, use_dora=False, memory_budget=None, **kwargs):
    """Wrap a velotune-loaded model with LoRA adapters (see ``FastLanguageModel.get_peft_model``)."""
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as peft_get_peft_model

    unknown = [k for k in kwargs if k not in _IGNORED]
    if unknown:
        raise TypeError(
            f"get_peft_model() got unexpected argument(s) {unknown}; velotune accepts r, target_modules, lora_alpha, "
            "lora_dropout, bias, layers_to_transform, layers_pattern, use_gradient_checkpointing, random_state, "
            "use_rslora, modules_to_save, init_lora_weights, loftq_config, use_dora, memory_budget"
        )
    if memory_budget is not None and use_gradient_checkpointing != "auto":
        raise VelotuneError(
            f"memory_budget={memory_budget!r} is the budget of use_gradient_checkpointing='auto' (now "
            f"{use_gradient_checkpointing!r}): pass use_gradient_checkpointing='auto' with it, or leave it out"
        )
    if isinstance(model, PeftModel):
        raise VelotuneError(
            "this model already has LoRA adapters (it is a PeftModel); call get_peft_model on the model returned "
            "by FastLanguageModel.from_pretrained, once"
        )
    st = state_of(model)
    if st.full_finetuning:
        raise VelotuneError(
            "the model was loaded with full_finetuning=True (every weight trains); LoRA adapters need "
            "full_finetuning=False: reload without it, or train the model directly"
        )
    if use_dora:
        raise VelotuneError("use_dora=True is not supported by velotune yet; use plain LoRA (use_dora=False)")
    if loftq_config:
        raise VelotuneError("loftq_config is not supported by velotune yet; leave it None")
    targets = check_peft_args(model, r, target_modules, lora_alpha, lora_dropout, bias, use_gradient_checkpointing,
                              layers_to_transform, modules_to_save, use_rslora)
    from .models import graphs

    graphs.check_memory_budget(memory_budget)
    if lora_dropout > 0 or bias != "none":
        say_once("lora-slow", f"lora_dropout={lora_dropout}, bias={bias!r}: the plain PEFT path is used for these "
                 "layers (velotune's fused LoRA needs dropout 0 and bias 'none')")
    for p in model.parameters():
        p.requires_grad_(False)
    # Seed so the adapter init (A ~ kaiming-uniform, B = 0) is the same for the same random_state.
    torch.manual_seed(random_state)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias, target_modules=targets,
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, use_rslora=use_rslora,
        modules_to_save=modules_to_save, init_lora_weights=init_lora_weights, task_type="CAUSAL_LM",
    )
    gc = gradient_checkpointing_mode(use_gradient_checkpointing)
    peft_model = peft_get_peft_model(model, config)
    set_gradient_checkpointing(peft_model, gc)
    st.gradient_checkpointing = use_gradient_checkpointing
    st.extra["gc"] = gc
    if memory_budget is not None:
        graphs.set_memory_budget(peft_model, memory_budget)
    return peft_model


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Turn HF gradient checkpointing on (non-reentrant: no need for inputs that require grad) or off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    elif getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
