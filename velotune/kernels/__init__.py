"""Fused Triton kernels, one op per file; each has a pure-torch reference and an autograd.Function."""
