"""CUDA graphs for the decode steps of generation (one new token per row, static KV cache).

A decode step of an 8B model launches ~1000 small kernels for a few milliseconds of GPU work, so HF's
generate (and velotune's eager generation path) wait on the host, not on the GPU (bench/decode.py). With
``generate(..., cache_implementation="static")`` the cache is preallocated and counts its length on the
device (transformers' StaticLayer: ``index_copy_`` at ``arange + cumulative_length``), so a whole step
- embedding output in, every layer (fused projections, RoPE, HF's attention over the cache, the cache
update), final norm and logits out - can be recorded once and replayed per token.

:class:`DecodeGraph` holds the step's static inputs (hidden state of the new tokens, their positions, the
attention masks) and its recorded output. The first decode step of a new key (batch, the addresses of
the cache tensors, weights and RoPE tables, adapters, mask layout) runs eagerly and is then recorded, without
running: recording launches
nothing, so the cache is not written twice; every later step copies its inputs in and replays. The
function recorded may read only its static inputs and tensors that live as long as the model or the
cache (weights, RoPE tables, cache tensors): the CPU emulation (EMULATE_ON_CPU, tests) replays it from
the static inputs too, so a tensor of the first step read by mistake shows up as wrong tokens.
Sliding-window static layers keep their length in a Python int (not replayable): their models decode
eagerly.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Record decode steps where the generation path runs with a static cache (on CUDA the generation path
# runs only for such caches: generation.DECODE_ON_CUDA).
ENABLED = True
# Tests set this to emulate the graph on CPU: "recording" keeps the function, a replay runs it again on the
# static inputs.
EMULATE_ON_CPU = False


def replayable_cache(cache) -> bool:
    """Whether every layer of ``cache`` is a static layer that counts on the device (and is allocated)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(getattr(layer, "is_compileable", False) and not getattr(layer, "is_sliding", False)
               and getattr(layer, "is_initialized", False) and isinstance(getattr(layer, "cumulative_length", None),
                                                                            torch.Tensor) for layer in layers)


def cache_pointers(cache) -> tuple:
    """Addresses of every tensor a recorded step reads or writes in ``cache`` (keys, values, lengths)."""
    return tuple((layer.keys.data_ptr(), layer.values.data_ptr(), layer.cumulative_length.data_ptr(),
                  tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers)


# Bumped by torch's global registration hooks whenever a parameter or a submodule is assigned to any module:
# the (module._parameters, name) slots weight_pointers reads stay valid until then.
_registrations = 0
_hooks = None


def _count_registration(*args) -> None:
    global _registrations
    _registrations += 1
    return None  # keep what is being registered


def weight_pointers(model, layers) -> tuple:
    """The address of every parameter of ``layers``, read per decode step (moved, re-loaded or replaced
    weights must record again). Walking ``layer.parameters()`` cost ~6 ms of host time per step for an 8B
    model with LoRA on 7 targets; reading cached ``(module._parameters, name)`` slots ~0.15 ms. The slots
    are rebuilt when any parameter or submodule has been registered anywhere since (counted by torch's
    global registration hooks) or the layers changed; each read goes through the module's own dict, so a
    parameter swapped in place of another (even by a direct dict write) is seen."""
    global _hooks
    if _hooks is None:
        from torch.nn.modules import module as nn_module

        _hooks = (nn_module.register_module_parameter_registration_hook(_count_registration),
                  nn_module.register_module_module_registration_hook(_count_registration))
    cached = model.__dict__.get("_velotune_weight_slots")
    ids = tuple(id(layer) for layer in layers)
    if cached is None or cached[0] != _registrations or cached[1] != ids:
        slots = [(mod._parameters, name) for layer in layers for mod in layer.modules()
                 for name, p in mod._parameters.items() if p is not None]
        cached = model.__dict__["_velotune_weight_slots"] = (_registrations, ids, slots)
    return tuple(p.data_ptr() if (p := d.get(name)) is not None else 0 for d, name in cached[2])


def _static(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().clone()


class DecodeGraph:
    """One recorded decode step; ``run(x, position_ids, masks) -> logits`` is the step's function."""

    def __init__(self, run: Callable, x: torch.Tensor, position_ids: torch.Tensor, masks: dict, pool=None,
                 stream=None):
        self.run = run
        self.x, self.position_ids = _static(x), _static(position_ids)
        self.masks = {k: _static(v) for k, v in masks.items()}
        self.emulate = not x.is_cuda
        self.graph, self.out = None, None
        if not self.emulate:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.out = run(self.x, self.position_ids, self.masks)
            # the graph keeps addresses, not objects: holding the function (and through it the cache of the
            # recording call) would keep that cache alive and stop a later cache from landing where it was
            self.run = None

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor, masks: dict) -> torch.Tensor:
        self.x.copy_(x)
        self.position_ids.copy_(position_ids)
        for k, v in masks.items():
            if v is not None:
                self.masks[k].copy_(v)
        if self.graph is None:
            return self.run(self.x, self.position_ids, self.masks)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the static output


def mask_layout(masks: dict) -> tuple:
    """What a recorded step's masks must keep: per attention type, None or (shape, dtype, device)."""
    return tuple(sorted((k, None if v is None else (tuple(v.shape), v.dtype, str(v.device)))
                        for k, v in masks.items()))


def usable(x: torch.Tensor) -> bool:
    return ENABLED and (x.is_cuda or EMULATE_ON_CPU)
