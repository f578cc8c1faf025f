"""Multi-GPU scaling of velotune's QLoRA step (issue #8): DDP (a whole model per GPU) or FSDP2 (sharded).

The train_step.py step (random-init Llama checkpoint of the named shape, NF4 + double quant, bf16 autocast,
LoRA r16 alpha16 on the 7 projections, "unsloth" offloaded checkpointing, CUDA graphs "auto", random
tokens, batch ``--bs`` x ``--seq`` PER RANK) run by ``torchrun`` on 1 and on N processes of one machine.
``ddp``: torch DistributedDataParallel over the PEFT model, bitsandbytes AdamW8bit through
``without_host_syncs`` (what velotune's SFTTrainer builds); ``fsdp``: velotune.distributed.fsdp_shard
(every decoder layer one FSDP2 unit) with torch AdamW (bitsandbytes' 8-bit optimizers do not take
sharded parameters). Each rank's loss is the mean over its tokens (equal counts: the mean of the ranks'
losses is the global batch's). Tokens/s = N x bs x seq / median step (CUDA-synchronised on every rank);
efficiency = tokens/s on N / tokens/s on 1 (target for DDP: >= 1.85 on 2 GPUs). One JSON row per world
size goes to ``--results``.

    python bench/ddp_scaling.py --shape 8b --gpus 2 --results bench/results/ddp_scaling.jsonl
    python bench/ddp_scaling.py --shape tiny --device cpu --gpus 2 --steps 2 --warmup 1 --results /tmp/d.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _child import write_result
from _peers import TARGETS

HERE = Path(__file__).resolve().parent


def rank_run(args) -> dict:
    """One rank's part (under torchrun): load, wrap, train, time."""
    import torch
    import torch.distributed as dist

    from velotune import FastLanguageModel, set_cuda_graphs

    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        if args.cap_gib:  # e.g. 79: an 80 GB card's memory on a bigger one
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, args.cap_gib * 2**30 / torch.cuda.get_device_properties(local).total_memory))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    host = {"device_map": "cpu"} if args.host_load else {}  # FSDP: shards go to the GPU, the whole copy never
    model, _ = FastLanguageModel.from_pretrained(args.ckpt, max_seq_length=args.seq, dtype=dtype, load_in_4bit=cuda,
                                                 **host)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    set_cuda_graphs(model, {"auto": "auto", "off": False}[args.graphs])
    model.train()
    vocab = model.config.vocab_size
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if args.mode == "fsdp":
        from velotune.distributed import fsdp_shard

        fsdp_shard(model)
        net = model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
        optim_name = "torch AdamW"
    else:
        net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if cuda else None)
        params = [p for p in model.parameters() if p.requires_grad]
        if cuda:
            import bitsandbytes as bnb

            from velotune.training.optim import without_host_syncs

            opt, optim_name = without_host_syncs(bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0)), "AdamW8bit"
        else:
            opt, optim_name = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0), "torch AdamW"
    g = torch.Generator(device=dev).manual_seed(1234 + rank)  # each rank its own data
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    profile = None
    for i in range(args.warmup + args.steps + int(args.profile)):
        prof = None
        if i == args.warmup + args.steps:  # one more step, profiled (not timed)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []))
            prof.__enter__()
        ids = torch.randint(0, vocab, (args.bs, args.seq), device=dev, generator=g)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = torch.tensor([time.perf_counter() - t0], device=dev)  # NCCL reduces device tensors only
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
        total = loss.detach().float().reshape(1)
        dist.all_reduce(total)
        if prof is not None:
            prof.__exit__(None, None, None)
            avg = prof.key_averages()
            profile = "\n".join(avg.table(sort_by=key, row_limit=18, max_name_column_width=60)
                                for key in (["cuda_time_total"] if cuda else []) + ["cpu_time_total"])
            continue
        losses.append(total.item() / world)
        if i >= args.warmup:
            times.append(dt.item())
    med = statistics.median(times)
    row = {"mode": args.mode, "world": world, "median_step_s": round(med, 4),
           "tokens_per_s": round(world * args.bs * args.seq / med, 1), "optimizer": optim_name,
           "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
           "losses": [round(x, 5) for x in losses[:5]], "step_times_s": [round(t, 4) for t in times],
           "graphs": args.graphs, **_graph_state(model),
           "peer_access": torch.cuda.can_device_access_peer(0, 1) if cuda and torch.cuda.device_count() > 1 else None}
    if profile is not None:
        row["profile"] = profile
    dist.barrier()
    dist.destroy_process_group()
    return row if rank == 0 else {}


def _graph_state(model) -> dict:
    """Whether the CUDA graphs were recorded on this rank (a failed capture leaves the step eager)."""
    from velotune.models import graphs

    st = graphs.state_of(model.get_base_model())
    return {"graph_captures": st.captures, "graph_broken": (st.broken or "")[:200] or None}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt")
    p.add_argument("--json")
    p.add_argument("--shape", default="8b", choices=["1b", "8b", "70b", "123b", "tiny"],
                   help="70b, 123b: built pre-quantized in 4 bits (run_train_step.make_4bit_checkpoint)")
    p.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--gpus", type=int, default=2, help="the world size compared with 1")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--graphs", default="auto", choices=["auto", "off"], help="set_cuda_graphs mode")
    p.add_argument("--profile", action="store_true", help="profile one more step (rank 0's table in the row)")
    p.add_argument("--worlds", type=int, nargs="+", help="world sizes to run (default: 1 and --gpus)")
    p.add_argument("--cap-gib", type=float, default=None, help="cap each rank's GPU memory (79: an 80 GB card)")
    p.add_argument("--host-load", action="store_true", help="fsdp: load each rank's copy in host memory "
                   "(device_map='cpu'); fsdp_shard moves the shards to the GPU")
    p.add_argument("--results")
    p.add_argument("--timeout", type=int, default=300, help="seconds per world size")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "velotune-bench"))
    args = p.parse_args()
    if args.rank_child:
        rank = int(os.environ.get("RANK", "0"))
        path = args.json if rank == 0 else f"{args.json}.rank{rank}"
        write_result(path, lambda: rank_run(args), lambda msg: {"mode": args.mode, "error": msg})
        return 0
    sys.path.insert(0, str(HERE))
    from run_train_step import PREQUANTIZED, bench_checkpoint, run_context

    work = Path(args.workdir)
    ckpt = bench_checkpoint(args.shape, work, **({"device": args.device} if args.shape in PREQUANTIZED else {}))
    card, run_id, vers = run_context(args.device)
    rows = []
    for world in args.worlds or (1, args.gpus):
        out = work / f"ddp-{args.shape}-{args.mode}-{world}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
               "--rank-child", "--ckpt", str(ckpt), "--json", str(out), "--mode", args.mode, "--device", args.device,
               "--bs", str(args.bs), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--graphs", args.graphs] + (["--profile"] if args.profile else []) + (
                   ["--cap-gib", str(args.cap_gib)] if args.cap_gib else []) + (["--host-load"] if args.host_load else [])
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        try:
            subprocess.run(cmd, timeout=args.timeout, check=False, env=env)
            row = json.loads(out.read_text())
        except (subprocess.TimeoutExpired, OSError, ValueError) as e:
            row = {"mode": args.mode, "world": world, "error": f"{type(e).__name__}: {e}"}
        row.update(run_id=run_id, bench="ddp_scaling", shape=f"llama-{args.shape}", card=card, world=world,
                   cap_gib=args.cap_gib, host_load=args.host_load,
                   batch_per_rank=args.bs, seq=args.seq, lora="r16 a16, 7 targets", gc="unsloth", versions=vers)
        rows.append(row)
        if row.get("profile"):
            print(f"[ddp] {args.mode} world {world} profile (rank 0, one step):\n{row['profile']}", flush=True)
        print(f"[ddp] {args.mode} world {world}: {json.dumps({k: row.get(k) for k in ('tokens_per_s', 'median_step_s', 'peak_reserved_gib', 'losses', 'peer_access', 'error')})}", flush=True)
    one, many = rows[0].get("tokens_per_s"), rows[-1].get("tokens_per_s")
    if one and many and len(rows) > 1 and rows[0]["world"] == 1:
        rows[-1]["efficiency"] = round(many / one, 3)
        print(f"[ddp] {args.mode}: {args.gpus} ranks = {many / one:.2f}x one", flush=True)
    with open(args.results, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
