"""Whether the decoder layer now running is a checkpoint's recompute for its backward.

Such a recompute runs the layer again only to rebuild what its backward reads; the layer's output is
the root of that backward, and autograd never reads its values. The last product of a Llama-style layer,
the MLP's down projection (``x + down(h)``), is then work without a reader: its inputs are what the
backward needs (saved by the fused MLP), its output is not. Skipping it (``output_unused()``) saves a
[tokens, intermediate] x [intermediate, hidden] GEMM and the down weight's dequantisation per recomputed
layer (Llama-3.1-8B, 4,096 tokens: 0.48 TFLOP, ~9% of the step's GEMM work with recompute); gradients
are unchanged bit for bit, since the same kernels run on the same values for everything a gradient
reads. Layers whose MLP output goes through another op before the residual add (Gemma-2's post-MLP
norm, whose backward reads it) compute it as usual: the decoder decides per layer. At long context, where
the MLP runs in row chunks (models/chunked.py) and its backward recomputes every chunk from the MLP's input,
a recompute runs no MLP forward at all (Llama-3.1-8B at 131,072 tokens: ~5% of the step, estimated).

The recomputes that say so: the CUDA graphs' recorded backward of a layer that did not keep its
activations (models/graphs.py), the offloaded checkpoint's backward (models/offload.py) and torch's own
checkpoint on the eager path (FSDP2 layers, graphs off; its recompute saves for backward what the forward
saved, as that checkpoint checks: the skipped product is never saved).

``SKIP_MLP_OUTPUT`` is the kill switch (False: the recompute computes everything, as the forward did).
"""
from __future__ import annotations

import contextlib
import threading

SKIP_MLP_OUTPUT = True
_state = threading.local()  # per thread: autograd runs a backward on its own device thread


@contextlib.contextmanager
def for_backward():
    """Mark the layer run inside as a recompute whose output only roots the backward."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def output_unused() -> bool:
    """Whether the running layer's output values go unread (inside :func:`for_backward`, switch on)."""
    return SKIP_MLP_OUTPUT and getattr(_state, "on", False)
