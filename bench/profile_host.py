"""Where the host (CPU) time of velotune's QLoRA step goes, on a CUDA card.

The fast path is host-bound at the 1B shape (bench/NOTES.md): the GPU waits for Python. This script
writes three views of one step into ``--out``:

* ``phases.txt``: CUDA-synchronised wall time of forward, backward and optimizer step (median of
  ``--steps``), with gradient checkpointing on and off, and the host time of a forward when the GPU
  is never waited for (launch-only: ``torch.cuda.synchronize`` only at the end).
* ``cprofile-*.txt``: cProfile of the same steps, sorted by own time and by cumulative time (Python
  functions, including every Triton launch's Python side).
* ``torch-self-cpu-*.txt``: torch.profiler ops sorted by self CPU time.
* ``micro.txt``: host microseconds per call of the fused LoRA Functions (forward, forward+backward)
  at a tiny size, with cProfile of the forward+backward.

    python bench/profile_host.py --ckpt /tmp/velotune-bench/llama-1b --out $OUT/host
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _stats(prof: cProfile.Profile, sort: str, n: int = 45) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).strip_dirs().sort_stats(sort).print_stats(n)
    return s.getvalue()


def micro(out: Path) -> None:
    import bitsandbytes as bnb

    from velotune.kernels import lora
    from velotune.quant.nf4 import NF4Weight

    dev, dt = "cuda", torch.bfloat16
    lines = [f"# {torch.cuda.get_device_name()}  torch {torch.__version__}"]

    def nf4(o, i):
        return NF4Weight.from_bnb(bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=dt, quant_type="nf4").to(dev))

    def lora_ab(o, i, r=4):
        return (torch.randn(r, i, device=dev, requires_grad=True), torch.randn(o, r, device=dev, requires_grad=True))

    x = torch.randn(8, 64, device=dev, dtype=dt, requires_grad=True)
    p = lambda o, i: (nf4(o, i), *lora_ab(o, i), 1.0)  # noqa: E731
    q, k, v, o_ = p(64, 64), p(32, 64), p(32, 64), p(64, 64)
    gate, up, down = p(128, 64), p(128, 64), p(64, 128)
    cases = {
        "lora_linear nf4": lambda: lora.lora_linear(x, *o_),
        "lora_qkv nf4": lambda: sum(t.sum() for t in lora.lora_qkv(x, q, k, v)),
        "lora_mlp nf4": lambda: lora.lora_mlp(x, gate, up, down),
        "F.linear (reference)": lambda: torch.nn.functional.linear(x, o_[0].dequantize(dt)),
    }
    for name, fn in cases.items():
        for mode in ("fwd", "fwd+bwd"):
            def call():
                y = fn()
                if mode == "fwd+bwd":
                    y.sum().backward()
            for _ in range(30):
                call()
            torch.cuda.synchronize()
            n = 300
            t = time.perf_counter()
            for _ in range(n):
                call()
            us = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            lines.append(f"{name:24s} {mode:8s} {us:8.1f} us/call (host)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        lora.lora_mlp(x, gate, up, down).sum().backward()
    prof.disable()
    torch.cuda.synchronize()
    lines += ["", "## cProfile: 200 x lora_mlp fwd+bwd, by own time", _stats(prof, "tottime", 40)]
    (out / "micro.txt").write_text("\n".join(lines))
    print("\n".join(lines[:9]), flush=True)


def step(args, out: Path, gc: bool) -> None:
    import bitsandbytes as bnb

    from velotune import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(args.ckpt, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing=gc, random_state=3407)
    model.train()
    opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (args.bs, args.seq), device="cuda")

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    def one(sync: bool):
        t0 = time.perf_counter()
        loss = fwd()
        if sync:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        if sync:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    for _ in range(3):
        one(True)
    synced = [one(True) for _ in range(args.steps)]
    free = [one(False) for _ in range(args.steps)]
    # launch-only forward: host time when nothing waits (the GPU queue absorbs the kernels)
    host_fwd = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            fwd()
        host_fwd.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    med = lambda xs, i: 1e3 * statistics.median(x[i] for x in xs)  # noqa: E731
    tag = "gc" if gc else "nogc"
    lines = [f"## {torch.cuda.get_device_name()} {Path(args.ckpt).name} bs {args.bs} x {args.seq}, "
             f"gradient checkpointing {'on' if gc else 'off'}",
             f"synced phases (ms): forward {med(synced, 0):.1f}  backward {med(synced, 1):.1f}  "
             f"optimizer {med(synced, 2):.1f}  step {med(synced, 0) + med(synced, 1) + med(synced, 2):.1f}",
             f"unsynced step (ms): {1e3 * statistics.median(sum(x) for x in free):.1f}",
             f"no-grad forward, host time until the last launch (ms): {1e3 * statistics.median(host_fwd):.1f}",
             f"peak allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", ""]
    with open(out / "phases.txt", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        one(False)
    prof.disable()
    (out / f"cprofile-{tag}.txt").write_text("## by own time (2 steps)\n" + _stats(prof, "tottime", 60)
                                             + "\n## by cumulative time\n" + _stats(prof, "cumulative", 60))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tp:
        one(False)
    (out / f"torch-self-cpu-{tag}.txt").write_text(
        tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=50, max_name_column_width=70))
    del model, opt
    torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="1b", help="built at --ckpt when it holds no model yet")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--gc", nargs="+", default=["on", "off"], choices=["on", "off"])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.ckpt) / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_train_step import make_checkpoint

        make_checkpoint(args.shape, Path(args.ckpt))
    if not args.no_micro:
        micro(out)
    for g in args.gc:
        step(args, out, g == "on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
