"""Time velotune's SwiGLU/GeGLU kernels against torch eager on Llama-3.1-8B / Gemma-2-9B MLP shapes (CUDA only).

    python bench/kernels/swiglu.py [--out bench/kernels/results.jsonl]
Cases: gate/up outputs [2, 2048, 14336] (Llama-3.1-8B, silu) and [2, 2048, 14336] (Gemma-2-9B,
gelu_pytorch_tanh), forward and forward+backward, the backward both into fresh buffers and in place.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import banner, parse_args, report, require_cuda  # noqa: E402

from velotune.kernels.swiglu import GLUFunction, glu_reference  # noqa: E402

CASES = {  # name -> (shape of g and u, activation)
    "llama8b_2x2048": ((2, 2048, 14336), "silu"),
    "gemma2_9b_2x2048": ((2, 2048, 14336), "gelu_pytorch_tanh"),
    "llama8b_1x16384": ((1, 16384, 14336), "silu"),
}


def main() -> None:
    require_cuda(__file__)
    args = parse_args(__doc__)
    banner("bench/kernels/swiglu.py")
    dtype = torch.bfloat16
    for name, (shape, act) in CASES.items():
        g = torch.randn(shape, device="cuda", dtype=dtype)
        u = torch.randn(shape, device="cuda", dtype=dtype)
        dh = torch.randn_like(g)
        n = g.numel() * g.element_size()
        with torch.no_grad():
            report(f"glu[{act}]", name, shape, dtype, "fwd", lambda: GLUFunction.apply(g, u, act, False),
                   lambda: glu_reference(g, u, act), args.rep, args.out, nbytes=3 * n)
        gg, ug = g.detach().requires_grad_(), u.detach().requires_grad_()
        for inplace in (False, True):
            # in place overwrites g/u with dg/du: values drift between reps but the timing does not care;
            # the views (not the leaves) are handed in, as the decoder hands in projection outputs
            def velo():
                gv, uv = gg.view_as(gg), ug.view_as(ug)
                return torch.autograd.grad(GLUFunction.apply(gv, uv, act, inplace), (gg, ug), dh)

            def ref():
                return torch.autograd.grad(glu_reference(gg, ug, act), (gg, ug), dh)

            report(f"glu[{act}]", name, shape, dtype, "fwd+bwd" + ("_inpl" if inplace else ""), velo, ref,
                   args.rep, args.out, nbytes=8 * n)


if __name__ == "__main__":
    main()
