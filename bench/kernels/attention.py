"""Which SDPA backend trains causal attention fastest on this card, at Llama-3's attention shapes (CUDA only).

velotune's unpacked path calls ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=...)`` with
torch's cuDNN backend first (models/attention.py, ``PREFER_CUDNN``). This times each backend torch has (flash,
cuDNN, memory-efficient) alone, forward and forward + backward, for q [B, 32, T, d] and k / v [B, 8, T, d]
(d = 128: 8B / 70B, 64: 1B; GQA native, and with k / v
repeated to 32 heads where a backend refuses GQA), from the seed's 2 x 2048 to long single sequences; and
each backend's bf16 error against an fp32 reference at 1 x 4096 (output and the three gradients; max abs
error relative to the reference's max abs), so a faster backend is only taken if it is no less exact.

    python bench/kernels/attention.py [--head-dims 128 64] [--lengths 2048 16384 65536 131072] [--out bench/kernels/results.jsonl]
Rows: op "attention", case = backend + gqa mode, mode fwd / f+b, ms, first_ms (the first call at that
shape, where a backend's per-shape plan build, e.g. cuDNN's, lands), TFLOP/s (causal: 2 x B x H x T^2 x d
forward, 2.5x that backward), peak MiB; "error" rows carry the relative errors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, environment, require_cuda  # noqa: E402

HQ, HK = 32, 8
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _attend(backend, q, k, v, gqa: str):
    if gqa == "repeat":
        k, v = (x.repeat_interleave(HQ // HK, dim=1) for x in (k, v))
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa == "native")


def _time(fn, reps: int) -> tuple[float, float, float]:
    """(median ms over ``reps`` calls after one warm-up call, peak MiB allocated above the start, ms of the
    warm-up call: the first at this shape, which includes any plan the backend builds for it)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], peak, first


def _row(out: Path, **row) -> None:
    row.update(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **environment())
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def errors(out: Path, hd: int) -> None:
    """Each backend's bf16 output / gradient error against fp32 math at 1 x 4096."""
    torch.manual_seed(0)
    t = 4096
    q32, k32, v32 = (torch.randn(1, h, t, hd, device="cuda") for h in (HQ, HK, HK))
    g32 = torch.randn(1, HQ, t, hd, device="cuda")
    leaves = [x.clone().requires_grad_() for x in (q32, k32, v32)]
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, leaves, g32)
    refs = [ref, *ref_grads]
    for name, backend in BACKENDS.items():
        for gqa in ("native", "repeat"):
            leaves = [x.bfloat16().requires_grad_() for x in (q32, k32, v32)]
            try:
                o = _attend(backend, *leaves, gqa)
                got = [o, *torch.autograd.grad(o, leaves, g32.bfloat16())]
            except RuntimeError as e:
                print(f"attention error   {name:<10}{gqa:<8} unavailable: {str(e).splitlines()[0][:90]}")
                continue
            rel = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, refs)]
            print(f"attention error d{hd:<4}{name:<10}{gqa:<8} out {rel[0]:.2e}  dq {rel[1]:.2e}  dk {rel[2]:.2e}  "
                  f"dv {rel[3]:.2e}")
            _row(out, op="attention", case=f"{name}_{gqa}", mode="error", shape=[1, HQ, HK, t, hd], dtype="bfloat16",
                 rel_err={"out": rel[0], "dq": rel[1], "dk": rel[2], "dv": rel[3]})


def main() -> None:
    require_cuda(__file__)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 16384, 65536, 131072])
    p.add_argument("--head-dims", nargs="+", type=int, default=[128], help="128: Llama-3 8B / 70B; 64: Llama-3.2 1B")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    for d in args.head_dims:
        one_head_dim(args, d)


def one_head_dim(args, hd: int) -> None:
    env = environment()
    print(f"# bench/kernels/attention.py on {env['card']}, torch {env['torch']}, commit {env['commit']}, head dim {hd}")
    errors(args.out, hd)
    for t in args.lengths:
        b = 2 if t <= 4096 else 1
        reps = 10 if t <= 16384 else 3
        q = torch.randn(b, HQ, t, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, HK, t, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        g = torch.randn_like(q)
        fwd_flop = 2 * b * HQ * t * t * hd
        for name, backend in BACKENDS.items():
            for gqa in ("native", "repeat"):
                def fwd():
                    with torch.no_grad():
                        return _attend(backend, q, k, v, gqa)

                def both():
                    return torch.autograd.grad(_attend(backend, q, k, v, gqa), (q, k, v), g)

                for mode, fn, flop in (("fwd", fwd, fwd_flop), ("f+b", both, 3.5 * fwd_flop)):
                    try:
                        ms, mib, first = _time(fn, reps)
                    except (RuntimeError, torch.OutOfMemoryError) as e:
                        print(f"attention d{hd:<4}{b}x{t:<7} {name:<10}{gqa:<8}{mode:<5} unavailable: "
                              f"{str(e).splitlines()[0][:80]}")
                        torch.cuda.empty_cache()
                        break
                    tflops = flop / ms / 1e9
                    print(f"attention d{hd:<4}{b}x{t:<7} {name:<10}{gqa:<8}{mode:<5}{ms:>10.2f} ms {tflops:>7.0f} TFLOP/s "
                          f"{mib:>8.0f} MiB, first call {first:.1f} ms")
                    _row(args.out, op="attention", case=f"{name}_{gqa}", mode=mode, shape=[b, HQ, HK, t, hd],
                         dtype="bfloat16", ms=ms, tflops=tflops, peak_mib=mib, first_ms=first)


if __name__ == "__main__":
    main()
