"""Longest single sequence (batch 1) that trains, and tokens/s at each length (issue #4).

8B-shape QLoRA (r16, 7 targets, AdamW8bit, bf16), random tokens, one peer per process: velotune
(use_gradient_checkpointing="unsloth": layer inputs offloaded to host memory; CUDA graphs stay off above
65,536 tokens by themselves), Unsloth ("unsloth"), HF + PEFT + bitsandbytes (checkpointing on). Within
a peer's process the lengths are tried in ascending order, one optimizer step each (timed,
CUDA-synchronised, after one untimed step at the first length), until the first out-of-memory; the
row per length says ok / oom, the step's seconds, tokens/s and peak memory. A step at 400K tokens is
minutes of GPU work at this shape (attention is quadratic), so pick few lengths per call.

Every peer runs with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (``--alloc-conf``; Unsloth
sets it on import anyway), so fragmentation does not decide the longest length. ``--cap-gib`` (default 79) limits the process to an 80 GB card's usable memory on a bigger card (H200), so
the longest length is the one an H100 80 GB trains. ``--layers N`` is a probe, not the claim: the 8B widths
with N layers (rows carry ``layers``; the report leaves them out) to see one layer's working memory and time
at a length in seconds before spending minutes on the full model.

    python bench/long_context.py --peers velotune --lengths 262144 409600 --results bench/results/long_context.jsonl
    python bench/long_context.py --shape tiny --device cpu --peers velotune --lengths 256 512 --results /tmp/l.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from _child import run_child, write_result
from _peers import fast_model, hf_model

HERE = Path(__file__).resolve().parent


def load(peer: str, ckpt: str, max_len: int, cuda: bool):
    if peer in ("velotune", "unsloth"):
        return fast_model(peer, ckpt, max_len, cuda)[0]
    return hf_model(ckpt, cuda)


PROGRESS_FROM, PROGRESS_EVERY_S = 131072, 30.0


def _progress(peer: str, t: int, t0: float, pool, done) -> None:
    """Every PROGRESS_EVERY_S seconds of a long step: seconds so far, GPU memory now / peak, and (velotune)
    the page-locked host memory, which grows by one layer's input per offloaded layer in the first forward
    at a new length. Reads counters only (no synchronisation)."""
    import torch

    while not done.wait(PROGRESS_EVERY_S):
        host = f", {pool.held_bytes / 2**30:.1f} GiB page-locked" if pool is not None else ""
        now, peak = torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
        print(f"[long] {peer} {t}: {time.perf_counter() - t0:.0f} s into the step, {now:.1f} GiB allocated "
              f"(peak {peak:.1f}){host}", flush=True)


def _host_now() -> dict | None:
    """This process's resident host memory by kind after the step (GiB; Linux), the page-locked pool still
    held: anonymous (the pool's buffers and the heap), file-backed (mapped checkpoint shards, libraries),
    shared; and the machine's used memory (MemTotal - MemAvailable)."""
    try:
        with open("/proc/self/status") as f:
            out = {k: round(int(v.split()[0]) / 2**20, 1) for k, v in (line.split(":", 1) for line in f)
                   if k in ("RssAnon", "RssFile", "RssShmem")}
        with open("/proc/meminfo") as f:
            m = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()}
        out["machine_used"] = round((m["MemTotal"] - m["MemAvailable"]) / 2**20, 1)
        return out
    except (OSError, ValueError, KeyError, IndexError):
        return None


def one_peer(args) -> list[dict]:
    import torch

    cuda = args.device == "cuda"
    lengths = sorted(args.lengths)
    pool = None
    if cuda and args.peer == "velotune":
        from velotune.models.offload import pinned_pool

        pool = pinned_pool(torch.device("cuda", 0))
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    model = load(args.peer, args.ckpt, max(lengths), cuda)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if cuda:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=2e-4)
        if args.peer == "velotune":
            from velotune.training.optim import without_host_syncs

            opt = without_host_syncs(opt)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    dev = "cuda" if cuda else "cpu"
    vocab = model.config.vocab_size

    def step(t: int) -> float:
        ids = torch.randint(0, vocab, (1, t), device=dev)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = threading.Event()
        if cuda and t >= PROGRESS_FROM:  # a step of minutes: say how far it got, in case the call's limit ends it
            threading.Thread(target=_progress, args=(args.peer, t, t0, pool, done), daemon=True).start()
        try:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        finally:
            done.set()
        return time.perf_counter() - t0

    print(f"[long] {args.peer} loaded at {time.strftime('%X')}", flush=True)
    rows = []
    step(min(lengths[0], 4096))  # warm-up: kernels compiled, optimizer state allocated
    for t in lengths:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        pinning = (pool.register_s, pool.wait_s) if pool is not None else (0.0, 0.0)
        try:
            dt = step(t)
        except torch.OutOfMemoryError as e:
            rows.append({"peer": args.peer, "length": t, "ok": False, "error": f"OutOfMemoryError: {str(e)[:300]}"})
            break
        rows.append({"peer": args.peer, "length": t, "ok": True, "cap_gib": args.cap_gib if cuda else None, "step_s": round(dt, 2),
                     "tokens_per_s": round(t / dt, 1),
                     "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                     "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                     "host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
                     "host_after_gib": _host_now(),
                     # velotune: seconds spent page-locking new host buffers (once per length), and of those
                     # the seconds the step waited for (the rest ran on the helper thread: offload.PIN_AHEAD)
                     "pinning_s": round(pool.register_s - pinning[0], 2) if pool is not None else None,
                     "pinning_waited_s": round(pool.wait_s - pinning[1], 2) if pool is not None else None,
                     "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")})
        print(f"[long] {args.peer} {t}: {rows[-1]}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", choices=["velotune", "unsloth", "hf"])
    p.add_argument("--ckpt")
    p.add_argument("--json")
    p.add_argument("--shape", default="8b", choices=["1b", "8b", "tiny"])
    p.add_argument("--peers", nargs="+", default=["velotune", "unsloth", "hf"])
    p.add_argument("--lengths", nargs="+", type=int, default=[131072, 262144, 409600])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--results")
    p.add_argument("--timeout", type=int, default=580)
    p.add_argument("--cap-gib", type=float, default=79.0, help="GPU memory limit (0: the whole card)")
    p.add_argument("--alloc-conf", default="expandable_segments:True", help="PYTORCH_CUDA_ALLOC_CONF of every peer")
    p.add_argument("--layers", type=int, default=None, help="probe: the 8B widths with this many layers")
    p.add_argument("--prequantized", action="store_true",
                   help="build the checkpoint in 4 bits on the GPU (run_train_step.make_4bit_checkpoint): ~1/3 of the "
                        "bytes to write and read, no quantisation at load; a long step's call keeps that time")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "velotune-bench"))
    args = p.parse_args()
    if args.alloc_conf:  # before torch is imported (the children import it)
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    if args.peer:  # child process: one peer
        write_result(args.json, lambda: one_peer(args), lambda msg: [{"peer": args.peer, "error": msg}])
        return 0
    sys.path.insert(0, str(HERE))
    from run_train_step import bench_checkpoint, run_context

    work = Path(args.workdir)
    if args.shape == "tiny":
        ckpt = bench_checkpoint("tiny", work)
    else:  # the declared context covers the longest length (Llama-3's RoPE tables are computed per position)
        layers = {"num_hidden_layers": args.layers} if args.layers else {}
        ckpt = bench_checkpoint(args.shape, work, f"llama-{args.shape}-long{args.layers or ''}", args.prequantized,
                                max_position_embeddings=max(1 << 20, *args.lengths), **layers)
    print(f"[long] checkpoint ready at {time.strftime('%X')}", flush=True)
    card, run_id, vers = run_context(args.device)
    for peer in args.peers:
        out = work / f"long-{args.shape}-{peer}.json"
        cmd = [sys.executable, __file__, "--peer", peer, "--ckpt", str(ckpt), "--json", str(out), "--device",
               args.device, "--cap-gib", str(args.cap_gib), "--lengths", *map(str, args.lengths)]
        rows = run_child(cmd, out, args.timeout, lambda msg: [{"peer": peer, "error": msg}])
        with open(args.results, "a") as f:
            for r in rows:
                if args.layers:
                    r["layers"] = args.layers
                r.update(run_id=run_id, bench="long_context", shape=f"llama-{args.shape}", card=card, batch=1,
                         lora="r16 a16, 7 targets", versions=vers)
                f.write(json.dumps(r) + "\n")
        print(f"[long] {peer}: longest ok {max([r['length'] for r in rows if r.get('ok')], default=None)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
