"""Launch settings of the NF4 dequantisation kernel, swept at the Llama-3.1-8B projection shapes (CUDA only).

For each shape (double quantisation, blocksize 64, bf16 out) and each (elements per program, warps): the
output is checked bit for bit against ``bitsandbytes.functional.dequantize_4bit`` (a setting that differs is
reported, never timed), then timed with ``triton.testing.do_bench`` (median); bitsandbytes' own kernel and a
plain copy of the output's bytes (the card's read + write bandwidth, for scale) are timed in the same run.
One line per case; ``--out`` appends JSON rows (card, versions, commit).

    python bench/kernels/nf4_dequant_sweep.py [--out bench/kernels/results.jsonl]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_OUT, environment, require_cuda  # noqa: E402

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}
ELEMS = (2048, 4096, 8192, 16384, 32768)
WARPS = (2, 4, 8, 16)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--rep", type=int, default=100)
    args = p.parse_args()
    require_cuda("nf4_dequant_sweep.py")
    import bitsandbytes.functional as F
    import triton
    import triton.testing

    from velotune.kernels import nf4

    env = environment()
    rows = []
    for case, (o, i) in SHAPES.items():
        w = torch.randn(o, i, dtype=torch.bfloat16, device="cuda")
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        want = F.dequantize_4bit(packed, qs)
        out = torch.empty(o, i, dtype=torch.bfloat16, device="cuda")
        n = o * i
        nbytes = n // 2 + 2 * n + qs.absmax.numel()
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")  # noqa: E731
        ms_bnb = bench(lambda: F.dequantize_4bit(packed, qs))
        copy_src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        ms_copy = bench(lambda: copy_dst.copy_(copy_src))  # reads and writes nbytes / 2 each
        for elems in ELEMS:
            for warps in WARPS:
                bpp = elems // 64

                def launch():
                    nf4._dequant_4bit_kernel[(triton.cdiv(qs.absmax.numel(), bpp),)](
                        packed.reshape(-1), qs.absmax, qs.code, qs.state2.absmax, qs.state2.code,
                        qs.offset.reshape(1), out, n, BLOCKSIZE=64, BLOCKSIZE2=qs.state2.blocksize, NESTED=True,
                        BLOCKS_PER_PROGRAM=bpp, SOFT_BF16=False, num_warps=warps, enable_fp_fusion=False)

                out.fill_(float("nan"))
                try:
                    launch()
                    torch.cuda.synchronize()
                except Exception as e:  # e.g. too many registers for one setting: reported, the sweep goes on
                    print(f"{case:<14} elems {elems:>6} warps {warps:>2}: failed: {type(e).__name__}: {e}"[:200])
                    continue
                same = torch.equal(out.view(torch.int16), want.view(torch.int16))
                ms = bench(launch) if same else None
                row = dict(op="nf4_dequant_sweep", case=case, shape=[o, i], dtype="bf16", nested=True,
                           elems_per_program=elems, num_warps=warps, bit_identical=same, ms=ms,
                           gbps=nbytes / ms / 1e6 if ms else None, bnb_ms=ms_bnb, copy_ms=ms_copy,
                           current=(elems == nf4._ELEMS_PER_PROGRAM and warps == nf4._NUM_WARPS), **env)
                rows.append(row)
                print(f"{case:<14} elems {elems:>6} warps {warps:>2}: "
                      + (f"{ms * 1e3:7.1f} us {row['gbps']:6.0f} GB/s" if ms else "NOT bit-identical")
                      + f"  (bitsandbytes {ms_bnb * 1e3:.1f} us, copy {ms_copy * 1e3:.1f} us)"
                      + ("  <- current" if row["current"] else ""), flush=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
