"""Time velotune's fused linear cross-entropy against torch eager (materialised logits, HF's loss) on
Llama-3.1-8B and Gemma-2-9B lm_head shapes (CUDA only). Peak memory is the point as much as time.

    python bench/kernels/cross_entropy.py [--out bench/kernels/results.jsonl]
Cases: N tokens x H -> V logits in bf16, with 0% or 50% of labels ignored (responses-only SFT), a
frozen lm_head (LoRA) or a trainable one (tied embeddings / modules_to_save), Gemma's softcap 30.
TFLOP/s counts the lm_head matmuls on non-ignored tokens only (2 N' H V per matmul: logits, dh, dW).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import banner, parse_args, report, require_cuda  # noqa: E402

from velotune.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402

CASES = {  # name -> (N, H, V, softcap, ignored fraction)
    "llama8b_2x2048": (4096, 4096, 128256, None, 0.0),
    "llama8b_2x2048_resp": (4096, 4096, 128256, None, 0.5),
    "llama8b_1x16384": (16384, 4096, 128256, None, 0.0),
    "gemma2_9b_2x2048": (4096, 3584, 256000, 30.0, 0.0),
}


def main() -> None:
    require_cuda(__file__)
    args = parse_args(__doc__)
    banner("bench/kernels/cross_entropy.py")
    dtype = torch.bfloat16
    for name, (n, h, v, softcap, ignored) in CASES.items():
        hidden = torch.randn(n, h, device="cuda", dtype=dtype)
        weight = torch.randn(v, h, device="cuda", dtype=dtype) * h**-0.5
        labels = torch.randint(0, v, (n,), device="cuda")
        labels[torch.rand(n, device="cuda") < ignored] = -100
        n_valid = int((labels != -100).sum())
        shape = (n, h, v)
        with torch.no_grad():
            report("lin_ce", name, shape, dtype, "fwd",
                   lambda: linear_cross_entropy(hidden, weight, labels, softcap=softcap),
                   lambda: linear_cross_entropy_reference(hidden, weight, labels, softcap=softcap),
                   args.rep, args.out, flops=2 * n_valid * h * v)
        for train_w in (False, True):
            hg = hidden.detach().requires_grad_()
            wg = weight.detach().requires_grad_(train_w)
            inputs = (hg, wg) if train_w else (hg,)

            def step(fn):
                return lambda: torch.autograd.grad(fn(hg, wg, labels, softcap=softcap), inputs)

            report("lin_ce", name, shape, dtype, "fwd+bwd" + ("+dw" if train_w else ""),
                   step(linear_cross_entropy), step(linear_cross_entropy_reference), args.rep, args.out,
                   flops=(3 if train_w else 2) * 2 * n_valid * h * v)
            del hg, wg
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
