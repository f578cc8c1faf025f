"""``velotune export SOURCE --to merged_16bit|lora|gguf [--quant ...] --out DIR``.

SOURCE is a ``velotune train`` run folder (its final ``lora`` export when the run finished, else its
newest complete ``checkpoint-N``, else its ``merged_16bit`` export; which one is said on stderr; the
run's ``model.max_seq_length`` and ``model.load_in_4bit`` are the defaults), a PEFT adapter folder
(adapter_config.json: velotune restores its base + the adapter, as
``FastLanguageModel.from_pretrained(adapter_dir)`` does, then merges in fp32) or a Hugging Face model
folder (config.json: ``--to gguf`` converts its weights straight from the folder, nothing loaded
into a model; ``--to merged_16bit`` re-saves it as 16-bit safetensors).

Bad arguments (missing source, unknown --to / --quant, options that do not fit the source) exit
with code 2 and a message naming the fix, before anything is loaded. A failure during the export
(an unknown pre-tokenizer, too little disk, ...) exits with code 1 and its message; no half file
is left behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._runs import folder_kind, resolve_run, run_config

TARGETS = ("merged_16bit", "lora", "gguf")
DEFAULT_QUANT = "q8_0"  # what save_pretrained_gguf's default "fast_quantized" means
# A run folder's weights for exporting: the exact trained adapter first (the final export, else the newest
# checkpoint); the merged 16-bit export (already rounded once) only when no adapter is left.
RUN_ORDER = ("lora", "checkpoint", "merged_16bit")
DEFAULT_MAX_SEQ = 2048


def _run_defaults(args: argparse.Namespace, run: Path, kind: str) -> None:
    """Options not given take the run's own: ``model.max_seq_length`` (the RoPE scaling it trained with) and,
    for an adapter, ``model.load_in_4bit`` (merge onto the base it trained on: 4-bit for QLoRA, 16-bit else)."""
    model = run_config(run).get("model") or {}
    if args.max_seq_length is None and isinstance(model.get("max_seq_length"), int):
        args.max_seq_length = model["max_seq_length"]
    if kind == "adapter" and args.load_in_4bit is None and isinstance(model.get("load_in_4bit"), bool):
        args.load_in_4bit = model["load_in_4bit"]
        print(f"velotune export: the run trained on a {'4-bit' if args.load_in_4bit else '16-bit'} base "
              f"(model.load_in_4bit: {str(args.load_in_4bit).lower()}): merging onto the same", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a velotune train run folder, a PEFT adapter folder (adapter_config.json) or a "
                                  "Hugging Face model folder")
    p.add_argument("--to", required=True, choices=TARGETS,
                   help="merged_16bit: LoRA merged in fp32, 16-bit safetensors; lora: the PEFT adapter; "
                        "gguf: llama.cpp / Ollama files")
    p.add_argument("--quant", nargs="+", action="extend", metavar="METHOD",
                   help=f"GGUF method(s), one file each (default {DEFAULT_QUANT}): f16, bf16, f32, q8_0, q6_k, "
                        "q5_k_m, q4_k_m, q3_k_m, q2_k, ... (velotune.export.gguf.METHODS / ALIASES)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="N",
                   help="context the adapter was trained for; beyond the model's, RoPE scaling is applied "
                        "as at training time (default: a run folder's model.max_seq_length, else 2048)")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="adapter sources: load the base in 4-bit NF4 and merge onto its dequantised weights, "
                        "as QLoRA trained it (default; for a run folder, its model.load_in_4bit), or in 16-bit "
                        "with --no-load-in-4bit")
    p.set_defaults(func=run, _parser=p)


def _check(args: argparse.Namespace) -> str:
    """Validate the arguments without loading anything; returns the source kind ("adapter" or "model").
    A run folder is replaced in ``args.source`` by the folder picked in it (said). Exits 2 on error."""
    from ..export.gguf import resolve_method

    err = args._parser.error
    source = Path(args.source).expanduser()
    if not source.exists():
        err(f"SOURCE {args.source}: no such folder; pass a PEFT adapter folder, a Hugging Face model folder or a "
            "velotune train run folder")
    if not source.is_dir():
        err(f"SOURCE {args.source} is a file; pass the folder that holds adapter_config.json or config.json")
    kind = folder_kind(source)
    if kind is None:
        err(f"SOURCE {args.source} holds neither adapter_config.json (PEFT adapter) nor config.json "
            "(Hugging Face model) nor a velotune train run (run_report.json, checkpoint-N); point it at the folder "
            "that holds one")
    if kind == "run":
        path, kind = resolve_run("export", "SOURCE", args.source, source, RUN_ORDER, err)
        args.source = str(path)
        _run_defaults(args, source, kind)
    if args.max_seq_length is None:
        args.max_seq_length = DEFAULT_MAX_SEQ
    if args.quant and args.to != "gguf":
        err(f"--quant applies to --to gguf only (got --to {args.to}); drop --quant or use --to gguf")
    for q in args.quant or ():
        try:
            resolve_method(q)
        except ValueError as e:
            err(f"--quant {q}: {e}")
    if args.max_seq_length <= 0:
        err(f"--max-seq-length {args.max_seq_length} must be a positive number of tokens, e.g. 2048")
    if kind == "model" and args.to == "lora":
        err(f"SOURCE {args.source} is a model folder, not a PEFT adapter: --to lora needs an adapter folder "
            "(adapter_config.json); use --to merged_16bit or --to gguf")
    if kind == "model" and args.load_in_4bit:
        err("--load-in-4bit applies to adapter folders (the base the adapter is merged onto); a model folder "
            "is exported from its own weights")
    return kind


def _export(args: argparse.Namespace, kind: str) -> list[Path]:
    from ..api import FastLanguageModel
    from ..export.gguf import export_gguf

    quant = args.quant or [DEFAULT_QUANT]
    if kind == "model" and args.to == "gguf":
        return export_gguf(args.source, args.out, quant)
    load_in_4bit = kind == "adapter" and args.load_in_4bit is not False
    model, tok = FastLanguageModel.from_pretrained(args.source, max_seq_length=args.max_seq_length,
                                                   load_in_4bit=load_in_4bit)
    if args.to == "gguf":
        return model.save_pretrained_gguf(args.out, tok, quantization_method=quant)
    return [model.save_pretrained_merged(args.out, tok, save_method=args.to)]


def run(args: argparse.Namespace) -> int:
    kind = _check(args)
    try:
        paths = _export(args, kind)
    except (ValueError, OSError) as e:  # VelotuneError is a ValueError: bad input met during the export
        print(f"velotune export: error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"wrote {p}")
    return 0
