"""4-bit decoding speed: velotune's generation path (eager, and decode steps recorded as CUDA graphs) vs HF
generate (dynamic cache, and static cache + torch.compile) vs Unsloth's for_inference (issue #7).

Random-init Llama checkpoint of the named shape (bench/run_train_step.py builds it), NF4 + double
quantisation, bf16 compute, a LoRA adapter (r16, 7 targets) as after training, greedy decoding of
``--new`` tokens after a ``--prompt``-token prompt, batch 1 and 8. Each peer runs in its own process
(Unsloth patches transformers at import); tokens/s = batch x new tokens / wall time of generate (after
one warm-up generate). Rows go to ``--results`` (JSON lines) with card, shapes, dtype and versions.

    python bench/decode.py --shapes 8b --peers velotune hf unsloth --results bench/results/decode.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from _child import run_child, write_result
from _peers import TARGETS

HERE = Path(__file__).resolve().parent
# velotune: the generation path, dynamic cache, kernels launched one by one; velotune_graphs: for_inference's
# defaults where decode steps are recorded (static cache, CUDA graphs); velotune_gemv: those plus the few-row
# 4-bit matmul (kernels/nf4_matmul.py) in place of dequantise + GEMM; velotune_bnbgemv: velotune_graphs with
# bitsandbytes' 4-bit GEMV for one-row products (batch 1; kernels/lora.py BNB_GEMV_ON_CUDA, velotune's default
# since 2026-11-28; the other velotune peers run without it); hf_static: HF with
# a static cache (generate then torch.compiles the forward: its warm-up generate includes the compile)
PEERS = ["velotune", "velotune_graphs", "velotune_gemv", "velotune_bnbgemv", "hf", "hf_static", "unsloth"]


def one_peer(args) -> dict:
    import torch

    if args.peer == "unsloth":
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(args.ckpt, max_seq_length=2048, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16)
        FastLanguageModel.for_inference(model)
    elif args.peer.startswith("velotune"):
        from velotune import FastLanguageModel
        from velotune.models import decode_graphs, generation

        # velotune: the generation path eagerly over a dynamic cache (on CUDA only recorded steps take it by
        # default: generation.DECODE_ON_CUDA); velotune_graphs: the defaults (static cache, steps recorded)
        generation.EAGER_DECODE_ON_CUDA = args.peer == "velotune"
        decode_graphs.ENABLED = args.peer in ("velotune_graphs", "velotune_gemv", "velotune_bnbgemv")
        from velotune.kernels import lora, nf4_matmul

        nf4_matmul.ON_CUDA = args.peer == "velotune_gemv"  # few-row 4-bit matmul instead of dequantise + GEMM
        lora.BNB_GEMV_ON_CUDA = args.peer == "velotune_bnbgemv"  # bitsandbytes' GEMV for one row
        model, _ = FastLanguageModel.from_pretrained(args.ckpt, max_seq_length=2048, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=16)
        FastLanguageModel.for_inference(model)  # velotune_graphs: static cache by default, steps recorded
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.ckpt, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
        model.eval()
    rows = []
    vocab = model.config.vocab_size
    for bs in args.batch:
        ids = torch.randint(0, vocab, (bs, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                  do_sample=False, pad_token_id=0)
        if args.peer == "hf_static":  # HF's own fast decode: static cache, the forward torch.compiled by generate
            kw["cache_implementation"] = "static"
        with torch.no_grad():
            model.generate(**{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(**kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        rows.append({"peer": args.peer, "batch": bs, "prompt": args.prompt, "new_tokens": args.new,
                     "tokens_per_s": round(bs * args.new / dt, 1), "wall_s": round(dt, 3),
                     "first_ids": out[0, args.prompt:args.prompt + 8].tolist(),
                     "cache": kw.get("cache_implementation") or model.generation_config.cache_implementation or "dynamic",
                     "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)})
    return {"rows": rows}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", choices=PEERS)
    p.add_argument("--ckpt")
    p.add_argument("--json")
    p.add_argument("--shapes", nargs="+", default=["8b"])
    p.add_argument("--peers", nargs="+", default=PEERS, choices=PEERS)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--results")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "velotune-bench"))
    args = p.parse_args()
    if args.peer:  # child process: one peer
        write_result(args.json, lambda: one_peer(args), lambda msg: {"rows": [{"peer": args.peer, "error": msg}]})
        return 0
    import torch

    sys.path.insert(0, str(HERE))
    from run_train_step import make_checkpoint, versions

    card, vers = torch.cuda.get_device_name(0), versions()
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for shape in args.shapes:
        ckpt = make_checkpoint(shape, Path(args.workdir) / f"llama-{shape}")
        for peer in args.peers:
            out = Path(args.workdir) / f"decode-{shape}-{peer}.json"
            cmd = [sys.executable, __file__, "--peer", peer, "--ckpt", str(ckpt), "--json", str(out),
                   "--prompt", str(args.prompt), "--new", str(args.new), "--batch", *map(str, args.batch)]
            rows = run_child(cmd, out, 900, lambda msg: {"rows": [{"peer": peer, "error": msg}]})["rows"]
            with open(args.results, "a") as f:
                for r in rows:
                    r.update(run_id=run_id, bench="decode_4bit", shape=f"llama-{shape}", card=card, dtype="bf16",
                             lora="r16 a16, 7 targets", versions=vers)
                    f.write(json.dumps(r) + "\n")
                    print(f"[decode] {shape} {peer} bs {r.get('batch')}: {r.get('tokens_per_s')} tok/s "
                          f"{r.get('error', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
