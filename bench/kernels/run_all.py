"""Run every kernel benchmark in one process (CUDA only): rms_norm, rope, swiglu, cross_entropy.

    python bench/kernels/run_all.py [--out bench/kernels/results.jsonl] [--rep 200]
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_cuda  # noqa: E402

if __name__ == "__main__":
    require_cuda(__file__)
    for op in ("rms_norm", "rope", "swiglu", "cross_entropy"):
        importlib.import_module(op).main()
