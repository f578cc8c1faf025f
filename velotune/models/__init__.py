"""Model families (registry.py) and velotune's fast decoder forward (decoder.py)."""
from .decoder import install, set_fast_forward
from .registry import FAMILIES, FamilySpec, family_of

__all__ = ["install", "set_fast_forward", "FAMILIES", "FamilySpec", "family_of"]
