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

from .pointers import Slots

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


def weight_pointers(model, layers) -> tuple:
    """The address of every parameter of ``layers``, read per decode step (moved, re-loaded or replaced
    weights must record again), through slots cached on ``model`` (see velotune.models.pointers)."""
    slots = model.__dict__.get("_velotune_weight_slots")
    if slots is None:
        slots = model.__dict__["_velotune_weight_slots"] = Slots()
    return slots.read(layers)


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
