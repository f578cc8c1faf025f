"""One QLoRA training step, timed, for one peer: velotune | hf | unsloth | liger.

Same step for every peer (issue #3): random-init Llama checkpoint of a real shape, NF4 + double
quantisation, bf16 compute, LoRA r16 alpha16 on all 7 projections, gradient checkpointing on,
batch 2 x 2048 random tokens (labels = inputs), bitsandbytes AdamW8bit lr 2e-4, bf16 autocast;
``--warmup`` untimed steps then ``--steps`` timed ones (CUDA-synchronised wall time per step).
Prints one JSON row (median step seconds, tokens/s, peak max_memory_allocated and
max_memory_reserved, first losses). ``velotune`` runs with CUDA graphs ("auto": recorded in the first
warm-up step), ``velotune_eager`` without (the same kernels launched one by one); both with
use_gradient_checkpointing="unsloth" (offloaded, as the seed and the Unsloth peer), ``velotune_recompute``
with True, ``velotune_auto`` with "auto" (the planner; budget: the free memory), ``velotune_auto_16g`` with a
16 GiB budget in all (about half the 8B layers kept, the rest recomputed from GPU inputs),
``velotune_auto_16g_offload`` the same with the other layers' inputs in host memory
(graphs.AUTO_OFFLOAD_ON_CUDA), ``velotune_auto_equal`` with Unsloth's measured peak as the budget (and the
rest offloaded), ``velotune_expandable`` = ``velotune`` with the allocator's expandable segments on
(``PYTORCH_ALLOC_CONF``, before torch 2.10 ``PYTORCH_CUDA_ALLOC_CONF``: what Unsloth sets for its own process at
import, so its peak reserved is measured with them; velotune leaves the allocator as the user set it),
``velotune_noskip`` = ``velotune`` with its recomputes running the MLP's down projection too
(``models.recompute.SKIP_MLP_OUTPUT = False``: what the skip saves), ``velotune_poolfit`` / ``velotune_poolsized`` = ``velotune``
with the graphs' pool of this one-shape step cut by its capture / sized by its warm-up
(``models.graphs.SIZE_FIXED_SHAPE_POOL`` False / True, whatever the default), ``velotune_lossapart`` = ``velotune``
with the fused loss's temporaries in the default pool instead of the graphs' (``models.graphs.LOSS_IN_POOL = False``).
velotune's optimizer is bitsandbytes' AdamW8bit through ``without_host_syncs``, as velotune's SFTTrainer builds
it (its 8-bit updates called directly,
velotune.training.optim.DIRECT_ON_CUDA; rows of the peers ``velotune_direct`` / ``velotune_auto_direct`` in
the results are from before that was the default, when it was measured apart).
Run each peer in its own process (Unsloth patches transformers at import): bench/run_train_step.py.

    python bench/train_step.py --peer hf --ckpt /tmp/llama-1b --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _child import write_result
from _memory import start_trace, write_trace
from _peers import fast_model, hf_model

PEERS = ["velotune", "velotune_eager", "velotune_auto", "velotune_auto_resident", "velotune_auto_16g",
         "velotune_auto_16g_offload", "velotune_auto_equal", "velotune_recompute", "velotune_expandable",
         "velotune_noskip", "velotune_poolfit", "velotune_poolsized", "velotune_lossapart", "hf", "unsloth", "liger"]
# use_gradient_checkpointing per peer: the seed's (and Unsloth's) "unsloth" = offloaded checkpointing
GC = {"velotune": "unsloth", "velotune_eager": "unsloth", "velotune_auto": "auto", "velotune_auto_resident": "auto",
      "velotune_auto_16g": "auto", "velotune_auto_16g_offload": "auto", "velotune_auto_equal": "auto",
      "velotune_recompute": True, "velotune_expandable": "unsloth", "velotune_noskip": "unsloth",
      "velotune_poolfit": "unsloth", "velotune_poolsized": "unsloth", "velotune_lossapart": "unsloth",
      "unsloth": "unsloth", "hf": True, "liger": True}


# Unsloth's peak reserved memory for this step (H200, bench/results/train_step.jsonl), by hidden size:
# velotune_auto_equal's budget (issue #4: tokens/s at equal memory)
UNSLOTH_PEAK_GIB = {2048: 1.87, 4096: 7.11}


def load_peer(peer: str, ckpt: str, seq: int):
    if peer == "unsloth":
        return fast_model("unsloth", ckpt, seq, cuda=True)[0]
    if peer.startswith("velotune"):
        from velotune import set_cuda_graphs
        from velotune.models import graphs, offload
        if peer == "velotune_noskip":  # recomputes run the MLP's down projection too (as before 2026-11-28)
            from velotune.models import recompute

            recompute.SKIP_MLP_OUTPUT = False
        if peer in ("velotune_poolfit", "velotune_poolsized"):  # the pool cut by its one capture / sized by its
            graphs.SIZE_FIXED_SHAPE_POOL = peer == "velotune_poolsized"  # warm-up (graphs.SIZE_FIXED_SHAPE_POOL)
        if peer == "velotune_lossapart":  # the loss's temporaries in the default pool (graphs.LOSS_IN_POOL)
            graphs.LOSS_IN_POOL = False
        if peer == "velotune_auto_resident":  # "auto" holding the 4-bit weights dequantised (the default since
            graphs.RESIDENT_ON_CUDA = True  # 2026-11-28; this peer says so whatever the default)
        if not (graphs.KEEP_ON_CUDA and offload.ENABLED_ON_CUDA):
            raise RuntimeError("a velotune GPU path is switched off (velotune env); this benchmark measures them on")
        model = fast_model("velotune", ckpt, seq, cuda=True, gc=GC[peer])[0]
        set_cuda_graphs(model, False if peer == "velotune_eager" else "auto")  # auto: recorded in warm-up step 1
        if peer.startswith(("velotune_auto_16g", "velotune_auto_equal")):
            from velotune import set_memory_budget

            # 16 GiB in all keeps about half the 8B layers; "equal": Unsloth's measured peak (H200, reserved)
            budget = 16 if "16g" in peer else UNSLOTH_PEAK_GIB[model.config.hidden_size]
            set_memory_budget(model, budget)
            graphs.AUTO_OFFLOAD_ON_CUDA = peer.endswith(("_offload", "_equal"))  # the rest: inputs on the host
        return model
    if peer == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    return hf_model(ckpt, cuda=True)


def run(args) -> dict:
    import bitsandbytes as bnb
    import torch

    torch.cuda.set_device(0)
    t_load = time.perf_counter()
    model = load_peer(args.peer, args.ckpt, args.seq)
    load_s = time.perf_counter() - t_load
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0)
    if args.peer.startswith("velotune"):
        from velotune.training.optim import without_host_syncs

        opt = without_host_syncs(opt)  # what velotune's SFTTrainer does to optim="adamw_8bit"
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(1234)
    batches = [torch.randint(0, vocab, (args.bs, args.seq), device="cuda", generator=g)
               for _ in range(args.warmup + args.steps)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if args.memory_trace:  # from here on: every allocation and segment, with the Python stack that made it
        start_trace()
    times, losses = [], []
    prof_table = None
    for i, ids in enumerate(batches):
        profile = args.profile and i == args.warmup
        if profile:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if profile:
            prof.__exit__(None, None, None)
            prof_table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60,
                                                      max_name_column_width=80)
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
    if args.memory_trace:
        write_trace(args.memory_trace, f"{args.peer}, {Path(args.ckpt).name}, batch {args.bs} x {args.seq}, "
                                       f"{args.warmup + args.steps} steps")
    # imported after the steps: a peer's process (Unsloth's) must import its own stack before transformers
    from velotune.device import graph_pool_bytes

    med = statistics.median(times)
    return {
        "peer": args.peer, "median_step_s": round(med, 4), "tokens_per_s": round(args.bs * args.seq / med, 1),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        # CUDA graphs keep their memory pool reserved and replays bypass the allocator's counters, so the
        # reserved peak is recorded too (the fair number when one peer uses graphs)
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3), "losses": [round(x, 5) for x in losses[:5]],
        "step_times_s": [round(t, 4) for t in times], "load_s": round(load_s, 1), "profile": prof_table,
        "graph_pool_gib": round(graph_pool_bytes(torch.cuda.memory_snapshot()) / 2**30, 3), "gc": GC[args.peer],
        # the allocator's settings as the peer left them (Unsloth sets expandable segments at import)
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True, choices=PEERS)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--memory-trace", help="write where the GPU memory went (segments, their callers) to this file")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.peer.endswith("_expandable"):  # before torch starts CUDA: the allocator reads it once
        from importlib.metadata import version

        # Unsloth's rule (unsloth_zoo/__init__.py): torch >= 2.10 reads the unified variable
        major, minor = (int(v) for v in version("torch").split(".")[:2])
        os.environ["PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"] = \
            "expandable_segments:True"
    row = write_result(args.json, lambda: run(args), lambda msg: {"peer": args.peer, "error": msg})
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
