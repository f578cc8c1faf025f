"""Token-wise sub-blocks run in row chunks at long context, so their intermediates never exist whole.

The MLP of a decoder layer acts on each token alone. At 409,600 tokens of Llama-3.1-8B, its gate and up
projections and their product are 3 x 11 GiB, and the fused MLP keeps two of them for backward: a
single layer's MLP needs more memory than an 80 GB card has left. Above ``MLP_CHUNK_ROWS`` rows,
:func:`row_chunked` runs the MLP on row chunks of ``CHUNK_ROWS``: the forward keeps only its input;
the backward recomputes each chunk with grad and takes its gradients (input rows, and the trainable
parameters summed over chunks in fp32). The cost is one more forward of the MLP per layer, a few per
cent of the step at the lengths where this applies (attention dominates there), except where the layer
itself is a checkpoint's recompute (models/recompute.py): its chunked MLP then runs no forward at all,
since the backward recomputes the chunks anyway. The results are those of the unchunked MLP up to the
rounding of GEMMs split along rows (tests/test_chunked.py).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .graphs import autocast_state

# Calls with more rows (batch x tokens) than this run the MLP in chunks; 0 turns chunking off.
MLP_CHUNK_ROWS = 65536
CHUNK_ROWS = 32768


def wants_chunks(x: torch.Tensor) -> bool:
    """Whether a token-wise block over ``x`` (``[..., features]``) should run in row chunks."""
    return bool(MLP_CHUNK_ROWS) and x.numel() // x.shape[-1] > MLP_CHUNK_ROWS


class _RowChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, rows, need_output, x, *params):
        ctx.fn, ctx.rows, ctx.n_params = fn, rows, len(params)
        ctx.autocast = autocast_state(x.device.type)
        ctx.save_for_backward(x, *params)
        if not need_output:  # the backward recomputes every chunk from x: nothing to run now
            return torch.zeros_like(x)
        return _chunks_nograd(fn, x, rows)

    @staticmethod
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        want_dx = ctx.needs_input_grad[3]
        want = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if want_dx else None
        sums: list = [None] * len(want)
        for i in range(0, x2.shape[0], ctx.rows):
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                xc = x2[i:i + ctx.rows].detach().requires_grad_(want_dx)
                yc = ctx.fn(xc)
            inputs = ([xc] if want_dx else []) + want
            grads = torch.autograd.grad(yc, inputs, dy2[i:i + ctx.rows], allow_unused=True)
            if want_dx:
                dx[i:i + ctx.rows] = grads[0]
                grads = grads[1:]
            for j, g in enumerate(grads):
                if g is not None:
                    sums[j] = g.float() if sums[j] is None else sums[j].add_(g)
        by_param = iter(s.to(p.dtype) if s is not None else None for s, p in zip(sums, want))
        out = [next(by_param) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, dx.view_as(x) if want_dx else None, *out)


def _chunks_nograd(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = None
    with torch.no_grad():
        for i in range(0, x2.shape[0], rows):
            y = fn(x2[i:i + rows])
            if out is None:
                out = torch.empty((x2.shape[0], y.shape[-1]), dtype=y.dtype, device=y.device)
            out[i:i + rows] = y
    return out.view(*x.shape[:-1], out.shape[-1])


def row_chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                rows: int = 0, need_output: bool = True) -> torch.Tensor:
    """``fn(x)`` for a token-wise ``fn`` (``[n, features] -> [n, out]``), run ``rows`` rows at a time.

    ``params`` are the trainable tensors ``fn`` reads (their gradients come back through this call);
    ``fn`` must be deterministic (no dropout: the backward recomputes it). ``rows`` defaults to
    ``CHUNK_ROWS``. Without grad, just the chunk loop. ``need_output`` False (with grad): nothing will
    read the output's values, only backpropagate through it (a checkpoint's recompute,
    models/recompute.py): the forward runs nothing and returns zeros shaped like ``x`` (``fn`` must map
    features to as many features, as a residual block does); the gradients are the same, since the
    backward recomputes each chunk from ``x`` either way.
    """
    rows = rows or CHUNK_ROWS
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return _chunks_nograd(fn, x, rows)
    return _RowChunked.apply(fn, rows, bool(need_output), x, *params)
