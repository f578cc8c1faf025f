"""Shared helpers for the Triton kernels: dispatch and launch sizing.

Dispatch rule (ARCHITECTURE.md): compiled Triton on CUDA tensors; on CPU the pure-torch reference.
Tests on CPU exercise the Triton code through Triton's interpreter by calling a kernel's
`autograd.Function` directly with ``TRITON_INTERPRET=1`` set before triton is imported
(tests/conftest.py does this on machines without a GPU).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (it is absent on some platforms, e.g. macOS)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether a public op should launch its Triton kernel for tensor ``x``.

    CUDA tensors take the compiled kernel; everything else takes the reference path.
    """
    return x.is_cuda and triton_available()


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def errors_vs_truth(
    kernel: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor
) -> tuple[float, float, float]:
    """(max|kernel - truth|, max|torch - truth|, max|truth|) in float64, for STYLE rule 3:
    a kernel passes when err(kernel) <= err(torch at the same dtype) + tol."""
    t = truth.detach().to(torch.float64)
    k = kernel.detach().to(torch.float64)
    r = torch_same_dtype.detach().to(torch.float64)
    if k.shape != t.shape or r.shape != t.shape:
        raise ValueError(f"shape mismatch: kernel {tuple(k.shape)}, torch {tuple(r.shape)}, truth {tuple(t.shape)}")
    scale = t.abs().max().item() if t.numel() else 0.0
    # A NaN anywhere in k makes err_k NaN (max propagates it), and `nan <= bound` is False: the
    # caller's `assert err_k <= bound` then fails, which is what poisoned outputs rely on.
    err_k = (k - t).abs().max().item() if t.numel() else 0.0
    err_r = (r - t).abs().max().item() if t.numel() else 0.0
    return err_k, err_r, scale


class poison_empty:
    """Context manager for tests: torch.empty / torch.empty_like return NaN-filled float tensors, so an
    output element a kernel forgets to write shows up as NaN instead of stale memory that happens to
    be right. Restores both functions on exit; not thread-safe (tests only)."""

    def __enter__(self):
        self._empty, self._empty_like = torch.empty, torch.empty_like

        def _fill(t: torch.Tensor) -> torch.Tensor:
            return t.fill_(float("nan")) if t.is_floating_point() else t

        orig_empty, orig_like = self._empty, self._empty_like
        torch.empty = lambda *a, **k: _fill(orig_empty(*a, **k))
        torch.empty_like = lambda *a, **k: _fill(orig_like(*a, **k))
        return self

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self._empty, self._empty_like
        return False
