"""GGUF quantizer throughput (M weights/s per type) and an 8B-shape q4_k_m export, end to end.

    python bench/gguf_quant.py                       # every type on CPU (and CUDA when present)
    python bench/gguf_quant.py --types q4_k q8_0 --rows 1024
    python bench/gguf_quant.py --export-8b /tmp/out  # Llama-3.1-8B shapes, random bf16, q4_k_m
    python bench/gguf_quant.py --types --export-model CKPT --tokenizer TOKDIR --export-8b /tmp/out
        # end to end as a user runs it: CKPT loaded in 4 bits, a LoRA adapter, save_pretrained_gguf timed

Each row is one JSON line (append them to a results file with ``--append FILE``). When
llama-cpp-python is installed, ggml's own reference quantizer (``ggml_quantize_chunk``, one thread,
what llama-quantize runs per thread) is timed in the same run on the same data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velotune.export.gguf import quants  # noqa: E402

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _card(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _commit() -> str:
    if os.environ.get("VELOTUNE_COMMIT"):  # see run_train_step.versions
        return os.environ["VELOTUNE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ours(x: torch.Tensor, qtype: str, repeat: int) -> float:
    quants.quantize(x[: max(1, x.shape[0] // 8)], qtype)  # warm-up (CUDA context, allocator)
    _sync(x.device.type)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        quants.quantize(x, qtype)
        _sync(x.device.type)
        best = min(best, time.perf_counter() - t)
    return best


def time_ggml(x: np.ndarray, qtype: str) -> float | None:
    try:
        from tests.export.make_golden import ggml_quantize
    except ImportError:
        return None
    try:
        ggml_quantize(x[:1], qtype.upper())  # loads the library
        t = time.perf_counter()
        ggml_quantize(x, qtype.upper())
        return time.perf_counter() - t
    except ImportError:
        return None


def bench_types(types, rows: int, cols: int, repeat: int, devices) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(rows, cols, generator=g) * 0.02
    for device in devices:
        x = x_cpu.to(device)
        for qtype in types:
            n = x.numel()
            dt = time_ours(x, qtype, repeat)
            row = {"bench": "gguf_quant", "type": qtype.upper(), "device": device, "card": _card(device),
                   "shape": [rows, cols], "mweights_per_s": round(n / dt / 1e6, 2), "seconds": round(dt, 4),
                   "torch": torch.__version__, "commit": _commit()}
            if device == "cpu":
                ref = time_ggml(x_cpu.numpy(), qtype)
                if ref is not None:
                    row["ggml_ref_1thread_mweights_per_s"] = round(n / ref / 1e6, 2)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


SMOKE = dict(LLAMA31_8B, vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=2)


def export_8b(out_dir: str, method: str, device: str, shape: dict = LLAMA31_8B) -> dict:
    """Random bf16 Llama-3.1-8B-shape tensors generated on ``device`` and streamed into write_gguf."""
    from transformers import LlamaConfig

    from velotune.export.gguf import convert, vocab as vocab_mod

    cfg = LlamaConfig(**shape)
    shapes = convert.model_tensor_shapes(cfg)
    n_vocab = cfg.vocab_size
    # A synthetic vocab: the benchmark times weights, not tokenizer conversion.
    v = vocab_mod.Vocab("gpt2", "llama-bpe", [f"t{i}" for i in range(n_vocab)], [vocab_mod.NORMAL] * n_vocab)

    def tensors():
        g = torch.Generator(device=device).manual_seed(0)
        for name, shape in shapes.items():
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
            yield name, t.to(torch.bfloat16)

    path = Path(out_dir) / f"llama8b-shape.{method.upper()}.gguf"
    _sync(device)
    t = time.perf_counter()
    convert.write_gguf(path, cfg, None, tensors(), method, device=device, vocab=v)
    _sync(device)
    dt = time.perf_counter() - t
    bench = "gguf_export_8b" if shape is LLAMA31_8B else "gguf_export_smoke"
    row = {"bench": bench, "method": method, "device": device, "card": _card(device),
           "weights": sum(int(np.prod(s)) for s in shapes.values()), "seconds": round(dt, 1),
           "file_gib": round(path.stat().st_size / 2**30, 2), "torch": torch.__version__, "commit": _commit()}
    path.unlink()
    print(json.dumps(row), flush=True)
    return row


def export_model(ckpt: str, tokenizer_dir: str, out_dir: str, method: str) -> dict:
    """The user's last step, timed: ``model.save_pretrained_gguf`` of a QLoRA model (4-bit base + r16 adapter
    on 7 targets, B non-zero so the merge is real work) loaded from ``ckpt``; the tokenizer from ``tokenizer_dir``
    (any BPE llama.cpp knows; ids past its vocab are written as padding, as llama.cpp's converter does)."""
    from transformers import AutoTokenizer

    from velotune import FastLanguageModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = FastLanguageModel.from_pretrained(ckpt, max_seq_length=2048, dtype=torch.bfloat16,
                                                 load_in_4bit=device == "cuda")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    _sync(device)
    t = time.perf_counter()
    paths = model.save_pretrained_gguf(out_dir, tok, quantization_method=method)
    _sync(device)
    dt = time.perf_counter() - t
    cfg = model.config
    row = {"bench": "gguf_export_qlora", "method": method, "device": device, "card": _card(device),
           "shape": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "vocab_size")},
           "base": "nf4 4-bit" if device == "cuda" else "bf16", "lora": "r16 a16, 7 targets",
           "seconds": round(dt, 1), "file_gib": round(paths[0].stat().st_size / 2**30, 2),
           "torch": torch.__version__, "commit": _commit()}
    for p in paths:
        p.unlink()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--rows", type=int, default=512, help="rows of 4096 weights (default 2M weights)")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--export-8b", metavar="DIR", help="also time a q4_k_m export of an 8B-shape model into DIR")
    ap.add_argument("--method", default="q4_k_m")
    ap.add_argument("--smoke", action="store_true", help="export a small Llama shape instead of 8B (checks the path)")
    ap.add_argument("--export-model", metavar="CKPT", help="with --export-8b DIR: time save_pretrained_gguf of CKPT "
                    "loaded as QLoRA (4-bit on CUDA) with an r16 adapter, into DIR")
    ap.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for --export-model")
    ap.add_argument("--append", metavar="FILE", help="append the JSON rows to FILE")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = bench_types(args.types, args.rows, args.cols, args.repeat, args.devices)
    if args.export_8b:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        Path(args.export_8b).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.export_8b) as d:
            if args.export_model:
                rows.append(export_model(args.export_model, args.tokenizer or args.export_model, d, args.method))
            else:
                rows.append(export_8b(d, args.method, device, SMOKE if args.smoke else LLAMA31_8B))
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
