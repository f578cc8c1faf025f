"""Run the QLoRA training-step benchmark for several peers and shapes, one card, one command.

Builds a random-init Llama checkpoint per shape (seeded, shared by every peer), runs each peer in its
own process (bench/train_step.py), and writes one JSON row per (shape, peer) with the card, shapes,
dtype and versions. Rows go to ``--results`` (JSON lines, appended); ``bench/report.py`` turns the
results file into BENCHMARKS.md.

    python bench/run_train_step.py --shapes 1b 8b --peers velotune hf unsloth liger --results $OUT/rows.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from _child import run_child

HERE = Path(__file__).resolve().parent
# Llama-3.2-1B and Llama-3.1-8B shapes (config.json of the public releases).
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # Llama-3.1-70B: only as a pre-quantized 4-bit checkpoint (make_4bit_checkpoint; 140 GB in bf16)
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # Mistral-Large-2 (123B) widths and vocabulary on the Llama architecture, pre-quantized only: ~62 GB of
    # 4-bit layers + 0.8 GB of bf16 embeddings (~32 GB a rank on 2); the largest open dense shape below
    # 2 x 80 GB in 4 bits (405B: ~230 GB)
    "123b": dict(hidden_size=12288, intermediate_size=28672, num_hidden_layers=88, num_attention_heads=96,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, vocab_size=32768, bos_token_id=1,
                 eos_token_id=2),
}
PREQUANTIZED = ("70b", "123b")  # built as 4-bit checkpoints (make_4bit_checkpoint), never in bf16
LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
              eos_token_id=128001, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids and Llama-3's special-token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[128000], eos_token=special[128001],
                                   pad_token=special[128004], unk_token="t0")


def make_checkpoint(shape: str, folder: Path, **overrides) -> Path:
    """A random-init Llama checkpoint of ``shape`` (SHAPES) in ``folder``; ``overrides`` change config fields."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    cfg = LlamaConfig(**{**LLAMA3, **SHAPES[shape], **overrides})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer(cfg.vocab_size).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def make_4bit_checkpoint(shape: str, folder: Path, device: str = "cuda", **overrides) -> Path:
    """A random-init Llama checkpoint of ``shape`` saved pre-quantized (bitsandbytes NF4 + double quantisation,
    bf16 compute; transformers' serialisation), built one linear at a time: the bf16 model is never whole
    in memory (70B: ~40 GB written instead of 140 GB). Loads with load_in_4bit=True like a hub 4-bit
    checkpoint. Norms are ones, other weights N(0, 0.02)."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    cfg = LlamaConfig(**{**LLAMA3, **SHAPES[shape], **overrides})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(shape):
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            w = bnb.nn.Params4bit(rand((lin.out_features, lin.in_features)), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
            q.weight = w._quantize(device) if device == "cpu" else w.to(device)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent), attr, q)
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta":
            parent, _, attr = name.rpartition(".")
            data = torch.ones(p.shape, dtype=torch.bfloat16, device=device) if "norm" in attr or "norm" in parent \
                else rand(p.shape)
            setattr(model.get_submodule(parent), attr, torch.nn.Parameter(data, requires_grad=False))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device=device)
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    model.save_pretrained(folder)
    make_tokenizer(cfg.vocab_size).save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def bench_checkpoint(shape: str, work: Path, name: str | None = None, prequantized: bool = False,
                     **overrides) -> Path:
    """The benchmark checkpoint of ``shape`` in ``work`` (built once, reused): "tiny" (the CPU smoke
    model), "70b" / "123b" or ``prequantized`` (pre-quantized 4-bit: make_4bit_checkpoint, built on the GPU),
    else a bf16 random Llama; ``name`` names its folder (default ``llama-{shape}``, ``-nf4`` added for 4 bits),
    ``overrides`` change config fields."""
    work.mkdir(parents=True, exist_ok=True)
    if shape == "tiny":
        from packing import tiny_checkpoint

        return tiny_checkpoint(work / (name or "llama-tiny"))
    if prequantized or shape in PREQUANTIZED:
        return make_4bit_checkpoint(shape, work / f"{name or f'llama-{shape}'}-nf4", **overrides)
    return make_checkpoint(shape, work / (name or f"llama-{shape}"), **overrides)


def run_context(device: str) -> tuple[str, str, dict]:
    """(card, run id, versions): what every benchmark parent stamps on its rows."""
    card = "cpu"
    if device == "cuda":
        import torch

        card = torch.cuda.get_device_name(0)
    return card, datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"), versions()


def versions() -> dict:
    out = {}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "trl", "unsloth", "liger-kernel", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if os.environ.get("VELOTUNE_COMMIT"):  # set by the caller where the tree's .git is not this tree's (device copies)
        out["velotune_commit"] = os.environ["VELOTUNE_COMMIT"]
        return out
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=False).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "velotune"], cwd=HERE,
                               capture_output=True, text=True, check=False).stdout.strip()
        out["velotune_commit"] = f"{commit}+dirty" if commit and dirty else commit  # +dirty: uncommitted changes
    except OSError:
        out["velotune_commit"] = None
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--peers", nargs="+", default=["velotune", "velotune_eager", "hf", "unsloth", "liger"])
    p.add_argument("--results", required=True, help="JSON-lines file to append rows to")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "velotune-bench"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-dir", default=None, help="write velotune's per-op profile of one step here")
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()
    import torch

    card = torch.cuda.get_device_name(0)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    vers = versions()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        t = time.perf_counter()
        ckpt = make_checkpoint(shape, work / f"llama-{shape}")
        print(f"[bench] checkpoint {shape} ready in {time.perf_counter() - t:.0f} s", flush=True)
        for peer in args.peers:
            out = work / f"{shape}-{peer}.json"
            cmd = [sys.executable, str(HERE / "train_step.py"), "--peer", peer, "--ckpt", str(ckpt),
                   "--json", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.profile_dir and peer.startswith("velotune"):
                cmd.append("--profile")
            t = time.perf_counter()
            row = run_child(cmd, out, args.timeout, lambda msg: {"peer": peer, "error": msg})
            prof = row.pop("profile", None)
            if prof and args.profile_dir:  # the first line says what ran (report.py reads the median step from it)
                Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
                head = (f"{card}, run {run_id} (velotune {vers.get('velotune_commit')}, peer {peer}, gc {row.get('gc')}), "
                        f"median step {row['median_step_s'] * 1e3:.1f} ms; profiled: the first timed step\n")
                (Path(args.profile_dir) / f"profile-{shape}-{peer}.txt").write_text(head + prof)
            row.update(run_id=run_id, bench="qlora_train_step", shape=f"llama-{shape}", card=card, dtype="bf16",
                       batch=2, seq=2048, lora="r16 a16, 7 targets", optimizer="adamw_8bit",
                       wall_s=round(time.perf_counter() - t, 1), versions=vers)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[bench] {shape} {peer}: " + json.dumps({k: row.get(k) for k in
                  ("tokens_per_s", "peak_alloc_gib", "peak_reserved_gib", "graph_pool_gib", "losses", "error")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
