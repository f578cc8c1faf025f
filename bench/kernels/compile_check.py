"""Compile every rms_norm/rope/swiglu/cross_entropy kernel variant to sm_90 (H100) cubin, no GPU needed.

The CPU tests run the kernels through Triton's interpreter, which skips the compiler's type checks
(e.g. "Return type mismatch" between the branches of a constexpr `if`) and never allocates registers.
This script runs the real compiler front to back (TTIR -> PTX -> ptxas) for the same variants the
launch wrappers can pick, and with `--ptxas-report` prints registers and spill stores per variant.

    TRITON_INTERPRET=0 python bench/kernels/compile_check.py [--ptxas-report]
To check another Triton (the H100 machines run 3.6.0): `pip install --target DIR triton==3.6.0` and run
with PYTHONPATH=DIR. Exit status 1 on the first variant that fails to compile.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from velotune.kernels import cross_entropy, rms_norm, rope, swiglu  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _ints(names: str, ty: str = "i32") -> dict:
    return {n: ty for n in names.split()}


def variants():
    """(kernel, signature, constexprs, num_warps) for every variant the wrappers can launch."""
    for dt, wdt in [("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp16")]:
        for h in (128, 4096, 16384):
            bh, br, nw = rms_norm._launch_shape(h)
            for cbw, dw in itertools.product([True, False], [True, False]):
                yield (rms_norm._rms_norm_fwd_kernel,
                       {"X": f"*{dt}", "W": f"*{wdt}", "Y": f"*{dt}", "RSTD": "*fp32",
                        **_ints("stride_x stride_y n_rows n_cols"), "eps": "fp32", "offset": "fp32"},
                       {"CAST_BEFORE_WEIGHT": cbw, "BLOCK_ROWS": br, "BLOCK_H": bh}, nw)
                yield (rms_norm._rms_norm_bwd_kernel,
                       {"DY": f"*{dt}", "X": f"*{dt}", "W": f"*{wdt}", "RSTD": "*fp32", "DX": f"*{dt}",
                        "DW_PARTIAL": "*fp32", **_ints("stride_dy stride_x stride_dx n_rows n_cols rows_per_program"),
                        "offset": "fp32"},
                       {"CAST_BEFORE_WEIGHT": cbw, "COMPUTE_DW": dw, "BLOCK_ROWS": br, "BLOCK_H": bh}, nw)
    for dt, tdt, pdt in [("bf16", "fp32", "i64"), ("fp32", "fp32", "i32"), ("bf16", "bf16", "i64")]:
        for bwd in (False, True):
            yield (rope._rope_kernel,
                   {"Q": f"*{dt}", "K": f"*{dt}", "COS": f"*{tdt}", "SIN": f"*{tdt}", "POS": f"*{pdt}",
                    **_ints("q_sb q_sh q_st k_sb k_sh k_st pos_sb pos_st cos_st sin_st", "i64"),
                    **_ints("seq_len n_qh n_kh half")},
                   {"BACKWARD": bwd, "BLOCK_QH": 32, "BLOCK_KH": 8, "BLOCK_D": 64}, 4)
    for dt, act in itertools.product(("bf16", "fp32", "fp16"), (0, 1, 2)):
        yield (swiglu._glu_fwd_kernel,
               {"G": f"*{dt}", "U": f"*{dt}", "H": f"*{dt}", **_ints("stride_g stride_u stride_h n_cols")},
               {"ACT": act, "BLOCK": swiglu._BLOCK}, 4)
        for store_h in (False, True):
            yield (swiglu._glu_bwd_kernel,
                   {**{p: f"*{dt}" for p in ("DH", "G", "U", "DG", "DU", "H")},
                    **_ints("stride_dh stride_g stride_u stride_dg stride_du stride_h n_cols")},
                   {"ACT": act, "STORE_H": store_h, "BLOCK": swiglu._BLOCK}, 4)
    for dt, ldt in [("bf16", "i64"), ("fp32", "i64"), ("fp16", "i32")]:
        for cap, grad in itertools.product([False, True], [False, True]):
            yield (cross_entropy._ce_rows_kernel,
                   {"LOGITS": f"*{dt}", "LABELS": f"*{ldt}", "LOSS": "*fp32", "SCALE": "*fp32",
                    **_ints("stride_row n_vocab"), "softcap": "fp32"},
                   {"HAS_SOFTCAP": cap, "COMPUTE_GRAD": grad, "BLOCK_V": cross_entropy._MAX_BLOCK_V}, 16)


def _ptxas_report(ptx: str) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        err = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", err)
    spills = re.findall(r"(\d+) bytes spill stores", err)
    return f"regs {regs[0] if regs else '?'}, spill stores {spills[0] if spills else '?'} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptxas-report", action="store_true", help="print registers and spills per variant")
    args = parser.parse_args()
    t0, n = time.time(), 0
    for fn, sig, consts, warps in variants():
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        try:
            compiled = triton.compile(src, target=TARGET, options={"num_warps": warps})
        except Exception as e:  # report which variant, then stop: the message is the compiler's
            sys.exit(f"FAIL {fn.__name__} {consts} warps={warps}: {type(e).__name__}: {e}")
        n += 1
        if args.ptxas_report:
            print(f"{fn.__name__:<22} {str(consts):<75} warps={warps:<3} {_ptxas_report(compiled.asm['ptx'])}")
    print(f"triton {triton.__version__}: {n} kernel variants compiled to sm_90 cubin in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
