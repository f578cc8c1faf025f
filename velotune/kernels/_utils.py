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
