"""Model families (registry.py) and velotune's fast decoder forward (decoder.py),
CUDA graphs of its layers (graphs.py)."""
from .decoder import install, set_fast_forward
from .graphs import set_cuda_graphs
from .registry import FAMILIES, FamilySpec, family_of

__all__ = ["install", "set_fast_forward", "set_cuda_graphs", "FAMILIES", "FamilySpec", "family_of"]
