"""Time velotune's in-place RoPE kernel against torch eager (HF's apply_rotary_pos_emb) on Llama-3.1-8B
attention shapes (CUDA only).

    python bench/kernels/rope.py [--out bench/kernels/results.jsonl]
Cases: q [B, 32, T, 128] and k [B, 8, T, 128] at bs 2 x 2048 and 1 x 16384, packed position ids,
forward (in place) and forward+backward, in the [B, H, T, D] layout and the [B, T, H, D] one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _common import banner, parse_args, report, require_cuda  # noqa: E402

from velotune.kernels.rope import RoPEFunction, rope_cos_sin, rope_reference  # noqa: E402

LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CASES = {"llama8b_2x2048": (2, 2048), "llama8b_1x16384": (1, 16384)}


def main() -> None:
    require_cuda(__file__)
    from transformers import LlamaConfig

    args = parse_args(__doc__)
    banner("bench/kernels/rope.py")
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_parameters=LLAMA31)
    dtype = torch.bfloat16
    for name, (b, t) in CASES.items():
        cos, sin = rope_cos_sin(config, t, device="cuda")
        pos = (torch.arange(b * t, device="cuda") % 1000).view(b, t)  # packed: restarts every 1000 tokens
        for layout in ("bhtd", "bthd"):
            qs, ks = ((b, 32, t, 128), (b, 8, t, 128)) if layout == "bhtd" else ((b, t, 32, 128), (b, t, 8, 128))
            q = torch.randn(qs, device="cuda", dtype=dtype)
            k = torch.randn(ks, device="cuda", dtype=dtype)
            dq, dk = torch.randn_like(q), torch.randn_like(k)
            n = (q.numel() + k.numel()) * q.element_size()
            shape = (qs, ks)
            with torch.no_grad():  # in place: q, k rotate further each rep, which changes no timing
                report("rope", name, shape, dtype, f"fwd_{layout}",
                       lambda: RoPEFunction.apply(q, k, cos, sin, pos, layout),
                       lambda: rope_reference(q, k, cos, sin, pos, layout), args.rep, args.out, nbytes=2 * n)
            qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()

            def velo():
                # the backward rotates its grad in place: hand it a copy so dq/dk stay the same tensors
                out = RoPEFunction.apply(qg.view_as(qg), kg.view_as(kg), cos, sin, pos, layout)
                return torch.autograd.grad(out, (qg, kg), (dq.clone(), dk.clone()))

            def ref():
                out = rope_reference(qg, kg, cos, sin, pos, layout)
                return torch.autograd.grad(out, (qg, kg), (dq.clone(), dk.clone()))

            report("rope", name, shape, dtype, f"f+b_{layout}", velo, ref, args.rep, args.out, nbytes=4 * n)


if __name__ == "__main__":
    main()
