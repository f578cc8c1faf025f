"""Packed vs padded training on variable-length data: tokens/s of real (non-pad) tokens (issue #4).

velotune's SFTTrainer, the seed's settings (QLoRA r16 on 7 targets, "unsloth" checkpointing, AdamW8bit,
bf16) on a random-init Llama checkpoint of the named shape, over a pre-tokenized dataset whose example
lengths are drawn uniformly from ``--min-len``..``--max-len`` (seeded). Two modes, each in its own process:

* ``padded``: ``per_device_train_batch_size=2``, ``max_length=--max-len``: rows padded to the batch's
  longest (and then to velotune's bucket lengths, for CUDA graphs);
* ``packed``: ``packing=True`` (TRL's best-fit-decreasing packing, padding-free rows with positions
  restarting per example), the same ``per_device_train_batch_size=2`` and ``max_length``;
* ``padfree``: ``padding_free=True`` without packing: each batch's 2 examples in one row, no pad tokens
  (what Unsloth 2026.10 picks by itself on H100 / H200 when ``padding_free`` is left unset, so its
  ``unsloth_padded`` mode runs padding-free there: unsloth/utils/padding_choice.py).

The peers run the same SFTTrainer workflow the seed describes, each with its own stack, in modes of their
own: ``unsloth_padded`` / ``unsloth_packed`` (Unsloth's FastLanguageModel + TRL's SFTTrainer, its "unsloth"
checkpointing) and ``hf_padded`` / ``hf_packed`` (transformers + PEFT + bitsandbytes + TRL, SDPA, recompute
checkpointing): the whole trainer step (collation, logging, optimizer), not only the model's step.
``--logging-steps 1`` is the seed's (a loss read, i.e. a host sync, every step).

Real tokens per step are counted in TRL's collator, before velotune's bucket padding; tokens/s = real tokens of steps after ``--warmup`` / their
wall time (CUDA-synchronised at each step end). One JSON row per mode goes to ``--results``.

    python bench/packing.py --shape 1b --results bench/results/packing.jsonl
    python bench/packing.py --shape tiny --device cpu --examples 24 --results /tmp/p.jsonl   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _child import run_child, write_result
from _memory import log_captures, start_trace, write_trace
from _peers import fast_model, hf_model

HERE = Path(__file__).resolve().parent
MODES = ("padded", "packed", "padfree", "unsloth_padded", "unsloth_packed", "hf_padded", "hf_packed")


def lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def make_dataset(n: int, lo: int, hi: int, vocab: int, seed: int):
    """Pre-tokenized examples (``input_ids``) of random tokens with the drawn lengths."""
    import random

    from datasets import Dataset

    rng = random.Random(seed + 1)
    ids = [[rng.randrange(10, vocab) for _ in range(t)] for t in lengths(n, lo, hi, seed)]
    return Dataset.from_dict({"input_ids": ids})


def tiny_checkpoint(folder: Path) -> Path:
    """A small random Llama (for the CPU smoke run) with the benchmark's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(HERE))
    from run_train_step import make_tokenizer

    if (folder / "config.json").is_file():
        return folder
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok = make_tokenizer(cfg.vocab_size)
    tok.bos_token, tok.eos_token, tok.pad_token = "t1", "t2", "t0"
    tok.save_pretrained(folder)
    return folder


class _Counter:
    """Wraps TRL's collator (inside velotune's bucket padding); records each batch's real tokens: the
    attention mask's ones for padded rows, every token of a padding-free packed row."""

    def __init__(self, collator):
        self.collator, self.counts = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        self.counts.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch


def _peer_model(peer: str, ckpt: str, max_len: int, cuda: bool):
    """(model, tokenizer, SFTTrainer class) of ``peer`` (bench/_peers.py), 4-bit on CUDA."""
    if peer in ("velotune", "unsloth"):
        model, tok = fast_model(peer, ckpt, max_len, cuda)
        if peer == "unsloth":
            from trl import SFTTrainer
        else:
            from velotune import SFTTrainer
        return model, tok, SFTTrainer
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    return hf_model(ckpt, cuda), AutoTokenizer.from_pretrained(ckpt), SFTTrainer


def one_mode(args) -> dict:
    cuda = args.device == "cuda"
    peer, packed = ("velotune", args.mode == "packed") if args.mode in ("padded", "packed", "padfree") else \
        (args.mode.split("_")[0], args.mode.endswith("packed"))
    if peer != "velotune" and not cuda:
        raise RuntimeError(f"the {peer} peer runs on CUDA only (TRL's SFTTrainer computes its loss with a fused "
                           "LM head that needs a CUDA Triton driver)")
    model, tok, trainer_cls = _peer_model(peer, args.ckpt, args.max_len, cuda)  # first: Unsloth patches at import
    if args.no_graphs and peer == "velotune":
        from velotune import set_cuda_graphs

        set_cuda_graphs(model, False)
    if args.buckets and peer == "velotune":
        from velotune.training import buckets

        buckets.N_BUCKETS = args.buckets
    if peer == "velotune" and (args.no_pool_sizing or args.loss_apart):  # the controls: graphs' switches off
        from velotune.models import graphs

        graphs.RESERVE_POOL = graphs.RESERVE_POOL and not args.no_pool_sizing
        graphs.LOSS_IN_POOL = graphs.LOSS_IN_POOL and not args.loss_apart
    variant = ("-nographs" if args.no_graphs else "") + (f"-b{args.buckets}" if args.buckets else "") + \
        ("-unsized" if args.no_pool_sizing else "") + ("-lossapart" if args.loss_apart else "") + \
        ("-hostnan" if args.host_nan_check else "")
    if args.memory_trace and cuda and peer == "velotune":
        log_captures(str(Path(args.memory_trace) / f"captures-{args.mode}{variant}.txt"))
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig

    ds = make_dataset(args.examples, args.min_len, args.max_len, model.config.vocab_size, args.seed)
    times, seen = [], []  # per optimizer step: its end time, and how many batches the collator had made by then
    captures = _record_captures() if cuda and peer == "velotune" else []  # (step, shape, seconds) per capture
    prof = {}

    class _Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.profile_steps and len(times) == args.profile_steps[0]:
                prof["p"] = _start_profiler(cuda)

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            seen.append(len(counter.counts))
            for c in captures:
                c.setdefault("step", len(times) - 1)  # the step whose forward recorded it
            if "p" in prof and len(times) == args.profile_steps[1]:
                prof["summary"] = _stop_profiler(prof.pop("p"), times[args.profile_steps[0] - 1:], args)

    targs = SFTConfig(output_dir=str(Path(args.workdir) / f"out-{args.mode}"), per_device_train_batch_size=2,
                      num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="linear",
                      optim="adamw_8bit" if cuda else "adamw_torch", bf16=cuda, logging_steps=args.logging_steps,
                      save_strategy="no", report_to="none", seed=3407, use_cpu=not cuda, dataloader_num_workers=0,
                      packing=packed, disable_tqdm=True,
                      # TRL: padding-free rows without packing take no max_length (the examples are <= --max-len)
                      **({"padding_free": True, "max_length": None} if args.mode == "padfree" else
                         {"max_length": args.max_len}))
    trainer = trainer_cls(model=model, processing_class=tok, train_dataset=ds, args=targs, callbacks=[_Clock()])
    if args.host_nan_check and peer == "velotune":  # the control: transformers' host read of every loss
        trainer._nan_check_on_host()
    outer = trainer.data_collator
    if type(outer).__name__ == "BucketPadding":  # velotune's: count inside it, before its bucket padding
        counter = outer.collator = _Counter(outer.collator)
    else:
        counter = trainer.data_collator = _Counter(outer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.memory_trace and cuda:
        start_trace()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    if args.memory_trace and cuda:
        how = "graphs off" if args.no_graphs and peer == "velotune" else "graphs as set"
        write_trace(str(Path(args.memory_trace) / f"memory-{args.mode}{variant}.txt"),
                    f"{args.mode} ({how}), {Path(args.ckpt).name}, {len(times)} steps")
    # Tokens are attributed to steps by the collator's count at each step end, not one batch per step: a
    # trainer may take several batches a step (Unsloth's took 2 per step in this workflow, 2026-11-28) or
    # collate one ahead; both shift every step's window alike.
    w = min(args.warmup, len(times) - 1)
    steady_tokens = sum(counter.counts[seen[w]: seen[-1]])
    steady_s = times[-1] - times[w]
    return {
        "mode": args.mode, "peer": peer, "packing": packed, "logging_steps": args.logging_steps, "steps": len(times),
        "batches_per_step": round(len(counter.counts) / max(1, len(times)), 2), "real_tokens": sum(counter.counts),
        "tokens_per_s": round(steady_tokens / steady_s, 1) if steady_s > 0 else None,
        "tokens_per_s_with_warmup": round(sum(counter.counts[: seen[-1]]) / total, 1),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
        # each step's wall time (the first from the start of train()): where captures and syncs land
        "step_s": [round(b - a, 4) for a, b in zip([t0] + times[:-1], times)],
        **({"captures": captures} if captures else {}),
        **({"profile": prof["summary"]} if "summary" in prof else {}),
        **({"graphs": False} if args.no_graphs and peer == "velotune" else {}),
        **({"buckets": args.buckets} if args.buckets and peer == "velotune" else {}),
        **({"pool_sizing": False} if args.no_pool_sizing and peer == "velotune" else {}),
        **({"loss_in_pool": False} if args.loss_apart and peer == "velotune" else {}),
        **({"nan_filter": "host"} if args.host_nan_check and peer == "velotune" else {}),
    }


def _steps_line(row: dict) -> str:
    """Step times at a glance: median, the slowest five (step index: seconds) and each capture's step."""
    st = row.get("step_s") or []
    if not st:
        return ""
    slow = sorted(range(len(st)), key=lambda i: -st[i])[:5]
    caps = ", ".join(f"{c['shape']}@{c.get('step')}:{c['s']}s" for c in row.get("captures", []))
    return (f"; step median {sorted(st)[len(st) // 2] * 1e3:.1f} ms, slowest "
            + ", ".join(f"{i}:{st[i]:.2f}" for i in slow) + (f"; captures {caps}" if caps else ""))


def _record_captures() -> list:
    """From now on, one dict per CUDA-graph set velotune records: the batch shape and the seconds it took (the
    step it happened in is filled in at that step's end)."""
    from velotune.models import graphs

    out, init = [], graphs.GraphSet.__init__

    def timed(self, make_run_layer, layers, x_example, *a, **k):
        t = time.perf_counter()
        init(self, make_run_layer, layers, x_example, *a, **k)
        out.append({"shape": list(x_example.shape[:2]), "s": round(time.perf_counter() - t, 3)})

    graphs.GraphSet.__init__ = timed
    return out


def _start_profiler(cuda: bool):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    p = torch.profiler.profile(activities=acts)
    p.__enter__()
    return p


def _stop_profiler(p, ends: list, args) -> dict:
    """Stop the profiler of steps ``--profile-steps A B``: the ops table (written next to the results), and per
    step the wall time against the time the GPU was busy with kernels (the union of kernel intervals on
    any stream but the copy engines'; what is left of the wall time the GPU waited for the host)."""
    p.__exit__(None, None, None)
    spans = sorted((e.time_range.start, e.time_range.end) for e in p.events()
                   if e.device_type.name == "CUDA" and not e.name.startswith("Memcpy") and e.time_range.end > 0)
    busy, cur_s, cur_e = 0.0, None, None
    for s_, e_ in spans:  # union of intervals, microseconds
        if cur_e is None or s_ > cur_e:
            busy += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = s_, e_
        else:
            cur_e = max(cur_e, e_)
    busy += (cur_e - cur_s) if cur_e is not None else 0.0
    steps = args.profile_steps[1] - args.profile_steps[0]
    wall = ends[-1] - ends[0]
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)
    if args.profile_out:
        Path(args.profile_out).mkdir(parents=True, exist_ok=True)
        (Path(args.profile_out) / f"workflow-{args.mode}.txt").write_text(
            f"{args.mode}, steps {args.profile_steps[0]}-{args.profile_steps[1] - 1}: wall {wall * 1e3 / steps:.1f} ms a "
            f"step, GPU busy {busy / 1e3 / steps:.1f} ms a step\n{table}\n")
    return {"steps": list(args.profile_steps), "wall_ms_per_step": round(wall * 1e3 / steps, 2),
            "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 2)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--ckpt")
    p.add_argument("--json")
    p.add_argument("--shape", default="1b", choices=["1b", "8b", "tiny"])
    p.add_argument("--modes", nargs="+", default=["padded", "packed"], choices=MODES)
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=8, help="steps left out of tokens/s (graph captures happen here)")
    p.add_argument("--logging-steps", type=int, default=1, help="the seed's 1: a loss read (host sync) every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--results")
    p.add_argument("--timeout", type=int, default=500)
    p.add_argument("--memory-trace", help="folder: each mode writes where its GPU memory went (memory-MODE.txt)")
    p.add_argument("--no-graphs", action="store_true", help="velotune's modes without CUDA graphs (a control)")
    p.add_argument("--buckets", type=int, default=None, help="velotune's bucket lengths (training.buckets.N_BUCKETS)")
    p.add_argument("--no-pool-sizing", action="store_true",
                   help="velotune's graphs' pool not sized for the longest batch (models.graphs.RESERVE_POOL; a control)")
    p.add_argument("--loss-apart", action="store_true",
                   help="velotune's loss temporaries in the default pool, not the graphs' (models.graphs.LOSS_IN_POOL; a control)")
    p.add_argument("--host-nan-check", action="store_true",
                   help="velotune's modes with transformers' NaN/Inf loss check on the host (a sync per micro-batch; a control)")
    p.add_argument("--profile-steps", type=int, nargs=2, metavar=("A", "B"),
                   help="torch.profiler over trainer steps A..B-1: wall vs GPU-busy ms a step in the row")
    p.add_argument("--profile-out", help="folder for the profiled steps' op tables (workflow-MODE.txt)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "velotune-bench"))
    args = p.parse_args()
    if args.mode:  # child process: one mode
        write_result(args.json, lambda: one_mode(args), lambda msg: {"mode": args.mode, "error": msg})
        return 0
    sys.path.insert(0, str(HERE))
    from run_train_step import bench_checkpoint, run_context

    if args.device == "cuda":  # one card: with several visible, transformers' Trainer wraps the model in
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # DataParallel (TRL refuses it, other stacks slow down)
    work = Path(args.workdir)
    ckpt = bench_checkpoint(args.shape, work)
    card, run_id, vers = run_context(args.device)
    for mode in args.modes:
        out = work / f"packing-{args.shape}-{mode}.json"
        cmd = [sys.executable, __file__, "--mode", mode, "--ckpt", str(ckpt), "--json", str(out), "--examples",
               str(args.examples), "--min-len", str(args.min_len), "--max-len", str(args.max_len), "--warmup",
               str(args.warmup), "--seed", str(args.seed), "--device", args.device, "--workdir", str(work),
               "--logging-steps", str(args.logging_steps)]
        cmd += (["--memory-trace", args.memory_trace] if args.memory_trace else []) + \
            (["--no-graphs"] if args.no_graphs else []) + (["--buckets", str(args.buckets)] if args.buckets else []) + \
            (["--no-pool-sizing"] if args.no_pool_sizing else []) + (["--loss-apart"] if args.loss_apart else []) + \
            (["--profile-steps", *map(str, args.profile_steps)] if args.profile_steps else []) + \
            (["--profile-out", args.profile_out] if args.profile_out else []) + \
            (["--host-nan-check"] if args.host_nan_check else [])
        t = time.perf_counter()
        row = run_child(cmd, out, args.timeout, lambda msg: {"mode": mode, "error": msg})
        row.update(run_id=run_id, bench="packing", shape=f"llama-{args.shape}", card=card, examples=args.examples,
                   lengths=f"{args.min_len}-{args.max_len}", batch=2, gc="unsloth", wall_s=round(time.perf_counter() - t, 1),
                   versions=vers)
        if args.profile_steps:  # a diagnostic run: the profiler slows its window, so BENCHMARKS' tables leave it out
            row["note"] = f"steps {args.profile_steps[0]}-{args.profile_steps[1] - 1} profiled"
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[packing] {args.shape} {mode}: " + json.dumps({k: row.get(k) for k in
              ("tokens_per_s", "tokens_per_s_with_warmup", "steps", "batches_per_step", "real_tokens", "peak_alloc_gib",
               "peak_reserved_gib", "profile", "error")}) + _steps_line(row),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
