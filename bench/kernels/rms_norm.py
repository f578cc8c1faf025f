"""Time velotune's RMSNorm kernel against the torch-eager reference on Llama-3.1-8B shapes (CUDA only).

    python bench/kernels/rms_norm.py [--out bench/kernels/results.jsonl]
Cases: the decoder norm at bs 2 x 2048 and 1 x 16384 tokens (H = 4096), a Qwen3-style qk-norm
(head_dim 128 over 32 heads), each forward and forward+backward with a frozen weight (LoRA) and a
trainable one (full fine-tune).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import banner, parse_args, report, require_cuda  # noqa: E402

from velotune.kernels.rms_norm import RMSNormFunction, rms_norm_reference  # noqa: E402

CASES = {  # name -> (x shape, eps)
    "llama8b_2x2048": ((2, 2048, 4096), 1e-5),
    "llama8b_1x16384": ((1, 16384, 4096), 1e-5),
    "qwen3_qknorm": ((2, 2048, 32, 128), 1e-6),
}


def main() -> None:
    require_cuda(__file__)
    args = parse_args(__doc__)
    banner("bench/kernels/rms_norm.py")
    dtype = torch.bfloat16
    for name, (shape, eps) in CASES.items():
        x = torch.randn(shape, device="cuda", dtype=dtype)
        w = torch.rand(shape[-1], device="cuda", dtype=dtype) + 0.5
        dy = torch.randn_like(x)
        n = x.numel() * x.element_size()
        with torch.no_grad():
            report("rms_norm", name, shape, dtype, "fwd", lambda: RMSNormFunction.apply(x, w, eps, 0.0, True),
                   lambda: rms_norm_reference(x, w, eps), args.rep, args.out, nbytes=2 * n)
        for train_w in (False, True):
            xg = x.detach().requires_grad_()
            wg = w.detach().requires_grad_(train_w)
            inputs = (xg, wg) if train_w else (xg,)

            def step(fn):
                return lambda: torch.autograd.grad(fn(xg, wg, eps, 0.0, True), inputs, dy)

            report("rms_norm", name, shape, dtype, "fwd+bwd" + ("+dw" if train_w else ""),
                   step(RMSNormFunction.apply), step(rms_norm_reference), args.rep, args.out, nbytes=5 * n)


if __name__ == "__main__":
    main()
