"""Time NF4 dequantisation and the fused LoRA layers against bitsandbytes and PEFT (CUDA only).

Llama-3.1-8B shapes: hidden 4096, intermediate 14336, 32 q heads / 8 kv heads of 128, tokens 4096, bf16,
LoRA r=16 alpha=16 (PEFT's default fp32 adapters), NF4 with double quantisation, blocksize 64.
Weights are random (no download). One line per case, median of ``triton.testing.do_bench``, peers timed
in the same run; ``--results FILE`` appends the rows as JSON lines (STYLE.md 9).

    python bench/kernels/nf4_lora.py [--tokens 4096] [--results bench/results.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run from a checkout without installing velotune
    sys.path.insert(0, str(_ROOT))

HIDDEN, INTER, HEAD, Q_HEADS, KV_HEADS, RANK = 4096, 14336, 128, 32, 8, 16


def _versions() -> dict:
    import bitsandbytes
    import peft
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__, "commit": commit or None}


def _bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _peak_gib(fn) -> float:
    """Peak memory above what was allocated before one call, in GiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _linear4bit(out_f, in_f):
    import bitsandbytes as bnb

    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                          quant_type="nf4")
    m.weight.data = m.weight.data.to(torch.bfloat16)
    return m.cuda()


def _peft_block(kind: str, quant: bool):
    """A tiny module holding the projections of one block, wrapped by PEFT's LoRA."""
    import peft

    make = _linear4bit if quant else (lambda o, i: torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16).cuda())
    names = ["gate_proj", "up_proj", "down_proj"] if kind == "mlp" else ["q_proj", "k_proj", "v_proj"]
    shapes = ([(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)] if kind == "mlp"
              else [(Q_HEADS * HEAD, HIDDEN)] + [(KV_HEADS * HEAD, HIDDEN)] * 2)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, (o, i) in zip(names, shapes):
                setattr(self, n, make(o, i))

        def forward(self, x):
            if kind == "mlp":
                return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    cfg = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=names)
    model = peft.get_peft_model(Block(), cfg)
    mods = [getattr(model.base_model.model, n) for n in names]
    for m in mods:
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)  # PEFT inits B to 0
    return model, mods


def _projections(mods, quant: bool):
    from velotune.quant import NF4Weight

    out = []
    for m in mods:
        base = NF4Weight.from_bnb(m.base_layer) if quant else m.base_layer.weight.detach()
        out.append((base, m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]))
    return out


def _fwd_bwd(fn, x, dys):
    def step():
        outs = fn(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, dys)
    return step


def bench_dequant(rows, tokens):
    import bitsandbytes.functional as F

    from velotune.kernels.nf4 import dequantize_4bit

    for name, (o, i) in [("q/o_proj", (4096, 4096)), ("k/v_proj", (1024, 4096)), ("gate/up_proj", (INTER, HIDDEN)),
                         ("down_proj", (HIDDEN, INTER))]:
        for nested in (True, False):
            w = torch.randn(o, i, dtype=torch.bfloat16, device="cuda")
            packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
            kw = {}
            if nested:
                kw = dict(absmax2=qs.state2.absmax, code2=qs.state2.code, blocksize2=qs.state2.blocksize,
                          offset=qs.offset)
            out = torch.empty(o, i, dtype=torch.bfloat16, device="cuda")
            ours = _bench(lambda: dequantize_4bit(packed, qs.absmax, qs.code, qs.shape, 64, torch.bfloat16,
                                                  out=out, **kw))
            peer = _bench(lambda: F.dequantize_4bit(packed, qs))
            gbytes = (o * i / 2 + o * i * 2 + qs.absmax.numel() * qs.absmax.element_size()) / 1e9
            rows.append(dict(op="nf4_dequant", case=name, shape=[o, i], nested=nested, dtype="bf16",
                             ms=ours, peer="bitsandbytes.dequantize_4bit", peer_ms=peer,
                             gbps=gbytes / (ours / 1e3)))


def bench_lora(rows, tokens, kind: str, quant: bool):
    from velotune.kernels.lora import lora_mlp, lora_qkv

    model, mods = _peft_block(kind, quant)
    projs = _projections(mods, quant)
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    if kind == "mlp":
        dys = [torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")]
        ours_fn = lambda t: lora_mlp(t, *projs, activation="silu")  # noqa: E731
    else:
        dys = [torch.randn(tokens, m.base_layer.out_features, dtype=torch.bfloat16, device="cuda") for m in mods]
        ours_fn = lambda t: lora_qkv(t, *projs)  # noqa: E731
    params = [x] + [p for m in mods for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    cases = [("velotune", _fwd_bwd(ours_fn, x, dys)), ("peft", _fwd_bwd(model, x, dys))]
    res = {}
    for who, step in cases:
        step()  # warm up (cuBLAS handles, Triton compile)
        res[who] = (_bench(step, grad_to_none=params), _peak_gib(step))
    rows.append(dict(op=f"lora_{kind}_fwd_bwd", case="qlora_nf4" if quant else "lora_bf16",
                     shape=[tokens, HIDDEN, INTER if kind == "mlp" else Q_HEADS * HEAD], r=RANK, dtype="bf16",
                     ms=res["velotune"][0], peak_gib=res["velotune"][1],
                     peer="peft+bitsandbytes" if quant else "peft", peer_ms=res["peft"][0],
                     peer_peak_gib=res["peft"][1]))
    del model, mods, projs
    torch.cuda.empty_cache()


def _line(row) -> str:
    extra = f"  {row['gbps']:.0f} GB/s" if "gbps" in row else ""
    if "peak_gib" in row:
        extra = f"  peak {row['peak_gib']:.2f} GiB vs {row['peer_peak_gib']:.2f} GiB"
    return (f"{row['op']:<22} {row['case']:<13} {str(row['shape']):<20} {'nested' if row.get('nested') else '':<6} "
            f"{row['ms']:8.3f} ms  {row['peer']}: {row['peer_ms']:8.3f} ms  x{row['peer_ms'] / row['ms']:.2f}{extra}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--results", help="append one JSON line per case to this file")
    parser.add_argument("--only", choices=["dequant", "lora"], help="run one group")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels/nf4_lora.py needs a CUDA GPU (it times CUDA kernels); "
                         "run it on the device machine")
    torch.manual_seed(0)
    meta = _versions()
    print(f"# {meta['card']}  torch {meta['torch']}  triton {meta['triton']}  bnb {meta['bitsandbytes']}  "
          f"peft {meta['peft']}  tokens {args.tokens}  bf16  r {RANK}")
    rows = []
    if args.only in (None, "dequant"):
        bench_dequant(rows, args.tokens)
        for row in rows:
            print(_line(row), flush=True)
    if args.only in (None, "lora"):
        for kind in ("mlp", "qkv"):
            for quant in (True, False):
                bench_lora(rows, args.tokens, kind, quant)
                print(_line(rows[-1]), flush=True)
    if args.results:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(args.results, "a") as f:
            for row in rows:
                f.write(json.dumps({**meta, "time": stamp, "tokens": args.tokens, **row}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
