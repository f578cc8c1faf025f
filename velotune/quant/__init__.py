"""Frozen-weight formats read from the ecosystem's storage (bitsandbytes 4-bit today; fp8 later)."""
from .nf4 import NestedAbsmax, NF4Weight

__all__ = ["NF4Weight", "NestedAbsmax"]
