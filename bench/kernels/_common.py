"""Shared plumbing for bench/kernels/<op>.py: CUDA check, timing, one printed line and one JSON row per case.

Each case times velotune's op and the torch-eager reference with triton.testing.do_bench (median of
the rep window, after warmup), prints
    op  case  shape  dtype  mode  ms_velotune  ms_torch  speedup  GB/s  peak_MiB_velotune  peak_MiB_torch
and appends the same as a JSON line (plus card, versions, commit) to --out (STYLE rule 9).
Importable without CUDA; `require_cuda()` exits with a message on such machines.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "bench" / "kernels" / "results.jsonl"
HEADER = (f"{'op':<14}{'case':<18}{'shape':<34}{'dtype':<6}{'mode':<9}{'ms_velo':>9}{'ms_torch':>10}"
          f"{'speedup':>9}{'GB/s':>8}{'TFLOP/s':>9}{'MiB_velo':>10}{'MiB_torch':>10}")


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (times compiled Triton kernels); nothing was measured")


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines results file to append to")
    p.add_argument("--rep", type=int, default=200, help="do_bench rep window in ms")
    return p.parse_args()


def _commit() -> str:
    if os.environ.get("VELOTUNE_COMMIT"):  # device copies carry a stale .git: the caller names the commit
        return os.environ["VELOTUNE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import triton

    return {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": _commit(),
    }


def time_ms(fn, rep: int) -> tuple[float, float]:
    """(median ms of fn, peak MiB allocated during one call above what was allocated before)."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"), peak


def report(op, case, shape, dtype, mode, velo, ref, rep, out: Path, nbytes=None, flops=None) -> dict:
    """Time both callables, print one line, append one JSON row. nbytes/flops: the minimum the fused
    op must move/compute, for GB/s (of velotune) and TFLOP/s (of velotune)."""
    ms_v, mib_v = time_ms(velo, rep)
    ms_t, mib_t = time_ms(ref, rep)
    gbps = nbytes / ms_v / 1e6 if nbytes else None
    tflops = flops / ms_v / 1e9 if flops else None
    dt = str(dtype).replace("torch.", "")
    print(f"{op:<14}{case:<18}{str(shape):<34}{dt:<6}{mode:<9}{ms_v:>9.3f}{ms_t:>10.3f}{ms_t / ms_v:>8.2f}x"
          f"{(f'{gbps:.0f}' if gbps else '-'):>8}{(f'{tflops:.0f}' if tflops else '-'):>9}"
          f"{mib_v:>10.0f}{mib_t:>10.0f}")
    row = {"op": op, "case": case, "shape": list(shape), "dtype": dt, "mode": mode, "ms_velotune": ms_v,
           "ms_torch": ms_t, "gbps_velotune": gbps, "tflops_velotune": tflops, "peak_mib_velotune": mib_v,
           "peak_mib_torch": mib_t,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **environment()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def banner(script: str) -> None:
    env = environment()
    print(f"# {script} on {env['card']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"median ms (do_bench), speedup = torch / velotune, peak = extra MiB allocated by one call")
    print(HEADER)


if __name__ == "__main__":  # pragma: no cover
    print(os.path.basename(__file__), "is a helper; run bench/kernels/<op>.py")
