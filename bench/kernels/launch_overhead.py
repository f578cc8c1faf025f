"""CPU cost of launching each op (CUDA): microseconds of host time per call, tiny inputs, no sync.

The fast path is host-bound at 1B shapes and partly at 8B (profile: GPU idle ~40% of a step). This
measures what one call of each building block costs the CPU, so the next change can be aimed.

    python bench/kernels/launch_overhead.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def per_call_us(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    if not torch.cuda.is_available():
        print("launch_overhead: needs CUDA")
        return
    import bitsandbytes as bnb

    from velotune.kernels import lora, rms_norm, rope, swiglu
    from velotune.quant.nf4 import NF4Weight

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(8, 64, device=dev, dtype=dt)
    w = torch.randn(64, device=dev, dtype=dt)
    lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dt, quant_type="nf4").to(dev)
    nf4 = NF4Weight.from_bnb(lin)
    q = torch.randn(1, 4, 8, 16, device=dev, dtype=dt)
    k = torch.randn(1, 2, 8, 16, device=dev, dtype=dt)
    cos = torch.randn(64, 16, device=dev)
    sin = torch.randn(64, 16, device=dev)
    g = torch.randn(8, 128, device=dev, dtype=dt)
    u = torch.randn(8, 128, device=dev, dtype=dt)
    A = torch.randn(4, 64, device=dev, requires_grad=True)
    B = torch.randn(64, 4, device=dev, requires_grad=True)
    wd = torch.randn(64, 64, device=dev, dtype=dt)
    xg = x.clone().requires_grad_()
    rows = {
        "torch.add": lambda: x + x,
        "torch.mm": lambda: x @ wd,
        "nf4.dequantize (triton)": lambda: nf4.dequantize(),
        "rms_norm fwd (triton)": lambda: rms_norm.RMSNormFunction.apply(x, w, 1e-6, 0.0, True),
        "rope fwd (triton)": lambda: rope.rope(q, k, cos, sin, None),
        "glu_forward (triton)": lambda: swiglu.glu_forward(g, u, "silu"),
        "glu_backward_ (triton)": lambda: swiglu.glu_backward_(g.clone(), g.clone(), u.clone(), "silu"),
        "lora_linear fwd, dense": lambda: lora.lora_linear(x, wd, A, B, 1.0),
        "lora_linear fwd+bwd, dense": lambda: lora.lora_linear(xg, wd, A, B, 1.0).sum().backward(),
        "lora_linear fwd+bwd, nf4": lambda: lora.lora_linear(xg, nf4, A, B, 1.0).sum().backward(),
        "F.linear fwd+bwd (reference)": lambda: torch.nn.functional.linear(xg, wd).sum().backward(),
    }
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for name, fn in rows.items():
        print(f"{name:32s} {per_call_us(fn):8.1f} us/call (host)")


if __name__ == "__main__":
    main()
