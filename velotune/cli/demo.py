"""``velotune demo``: the README's main job, end to end on the real small model.

Fine-tunes SmolLM2-135M-Instruct (the fixture built by ``python -m velotune.fixtures``) on the bundled
Alpaca data with the seed workflow: QLoRA (4-bit NF4, bf16/fp16) on a GPU, LoRA in fp32 on a CPU.
Shows progress, the memory report, a before/after sample and the exact-match score on held-out rows
of the date task, then saves the adapter and the merged 16-bit model, and lists the defaults it used.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SAMPLE_INSTRUCTION = ("Rewrite the date in ISO 8601 format (YYYY-MM-DD).", "July 4, 1976")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the SmolLM2-135M-Instruct fixture)")
    p.add_argument("--output-dir", default="velotune_demo_output", help="where adapter, merged model, logs go")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 45 on CPU, 60 on GPU)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--eval-rows", type=int, default=24, help="held-out date-task rows scored before/after")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--no-save", action="store_true", help="skip saving adapter and merged model")


def _sample(model, tok, instruction, inp) -> str:
    from ..data.alpaca import format_alpaca

    enc = tok([format_alpaca(instruction, inp, "")], return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _score(model, tok, rows, label: str) -> float:
    from ..api import FastLanguageModel
    from ..data.tasks import evaluate_exact_match

    FastLanguageModel.for_inference(model)
    t = time.perf_counter()
    acc, results = evaluate_exact_match(model, tok, rows)
    print(f"[{label}] date task exact match: {acc:.0%} of {len(rows)} held-out rows "
          f"({time.perf_counter() - t:.0f} s); e.g. {results[0][0]!r} -> {results[0][1].strip()!r} "
          f"(want {results[0][2]!r})")
    print(f"[{label}] sample: {SAMPLE_INSTRUCTION[1]!r} -> {_sample(model, tok, *SAMPLE_INSTRUCTION)!r}")
    FastLanguageModel.for_training(model)
    return acc


def run(args: argparse.Namespace) -> int:
    from transformers import TrainingArguments

    from .. import FastLanguageModel, SFTTrainer, get_alpaca_formatter, is_bfloat16_supported, memory_report
    from ..data.bundled import date_eval_rows, load_alpaca_dataset
    from ..fixtures import build_smollm2
    from ..loading import state_of

    gpu = torch.cuda.is_available()
    model_dir = args.model or str(build_smollm2())
    steps = args.max_steps or (60 if gpu else 45)
    out = Path(args.output_dir)
    t0 = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=args.max_seq_length, dtype=None,
                                                   load_in_4bit=gpu)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing=gpu, random_state=3407)
    model.print_trainable_parameters()
    rows = date_eval_rows(args.eval_rows)
    before = _score(model, tok, rows, "before")
    dataset = load_alpaca_dataset().map(get_alpaca_formatter(tok), batched=True)
    trainer = SFTTrainer(
        model=model, tokenizer=tok, train_dataset=dataset, dataset_text_field="text",
        max_seq_length=args.max_seq_length,
        args=TrainingArguments(
            per_device_train_batch_size=4, gradient_accumulation_steps=2, warmup_steps=3, max_steps=steps,
            learning_rate=args.learning_rate, fp16=gpu and not is_bfloat16_supported(),
            bf16=is_bfloat16_supported(), logging_steps=5, optim="adamw_8bit", weight_decay=0.01,
            lr_scheduler_type="linear", seed=3407, output_dir=str(out / "trainer"), report_to="none",
            save_strategy="no"),
    )
    with memory_report():
        trainer.train()
    after = _score(model, tok, rows, "after")
    if not args.no_save:
        model.save_pretrained_merged(out / "lora_adapter", tok, save_method="lora")
        model.save_pretrained_merged(out / "merged_16bit", tok, save_method="merged_16bit")
        print(f"saved: {out / 'lora_adapter'} (PEFT adapter), {out / 'merged_16bit'} (merged, 16-bit safetensors)")
    mode = "QLoRA: 4-bit NF4 base" if gpu else "LoRA: fp32 base on CPU"
    print(f"\nvelotune demo done in {time.perf_counter() - t0:.0f} s. Exact match {before:.0%} -> {after:.0%}.")
    print(f"Defaults used: model={model_dir}; {mode}; dtype={str(state_of(model).dtype).replace('torch.', '')}; "
          f"r=16, lora_alpha=16, 7 target modules, dropout 0; batch 4 x grad-accum 2; {steps} steps; "
          f"lr {args.learning_rate} linear, warmup 3; adamw_8bit; max_seq_length {args.max_seq_length}; seed 3407; "
          f"data: {len(dataset)} bundled Alpaca rows; eval: {len(rows)} held-out date rows.")
    return 0
