"""Offloaded gradient checkpointing for one decoder layer (the eager path; graphs.py has its own).

``use_gradient_checkpointing="unsloth"`` / ``"offload"``: a layer's forward runs without building a
graph, its input ``x`` is copied to pinned host memory on a side stream (overlapping the next layers)
and dropped from the GPU; backward copies it back, recomputes the layer with grad and returns the
gradients of ``x`` and of the layer's trainable parameters. GPU memory for checkpoints drops from one
activation per layer to the few in flight. Used for layers with nothing random in them (no dropout:
the recompute must reproduce the forward exactly without replaying RNG state; decoder.py checks);
other layers keep torch's recompute checkpointing. On CPU: plain recompute.
"""
from __future__ import annotations

import torch

from .graphs import autocast_state

# On since tests/test_fast_forward_gpu.py::test_cuda_graphs_train_like_eager[llama-offload-*] passed on
# an H200 (2026-11-28). A kill switch: False makes "unsloth" / "offload" run plain recompute on CUDA
# (same numerics, more GPU memory; adapters.py says so).
ENABLED_ON_CUDA = True
# Tests set this to run the offload paths on CPU (the "host copy" is then a CPU clone).
ON_CPU = False

_side_streams: dict = {}


def _side(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=device)
    return _side_streams[key]


class OffloadedCheckpoint(torch.autograd.Function):
    """``run_layer(layer, x)`` with ``x`` kept in pinned host memory until backward recomputes the layer."""

    @staticmethod
    def forward(ctx, run_layer, layer, x, *params):
        ctx.run_layer, ctx.layer, ctx.device = run_layer, layer, x.device
        ctx.autocast = autocast_state(x.device.type)
        out = run_layer(layer, x)  # autograd.Function.forward runs without grad: nothing is saved
        if x.is_cuda:
            side = _side(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(x, non_blocking=True)
                ctx.copied = torch.cuda.Event()
                ctx.copied.record(side)
            x.record_stream(side)  # the allocator keeps x's memory until the copy has read it
        else:
            host, ctx.copied = x.detach().clone(), None
        ctx.host = host
        return out

    @staticmethod
    def backward(ctx, dy):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        x = ctx.host.to(ctx.device, non_blocking=True)
        params = [p for p in ctx.layer.parameters() if p.requires_grad]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            with torch.autocast(**ctx.autocast):
                out = ctx.run_layer(ctx.layer, xr)
            grads = torch.autograd.grad(out, [xr] + params, grad_outputs=dy, allow_unused=True)
        ctx.host = None
        return (None, None, *grads)


def offloaded_layer(run_layer, layer, x):
    """Run one layer under offloaded checkpointing (see the module docstring)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    return OffloadedCheckpoint.apply(run_layer, layer, x, *params)


def available(x: torch.Tensor) -> bool:
    """Whether offloading applies to activations like ``x`` (see ENABLED_ON_CUDA / ON_CPU)."""
    return ENABLED_ON_CUDA if x.is_cuda else ON_CPU
