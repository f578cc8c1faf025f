"""A procedural task with an exact-match metric: rewrite a written date in ISO 8601.

"Rewrite the date in ISO 8601 format (YYYY-MM-DD)."  +  "March 5, 2021"  ->  "2021-03-05"

Small instruct models get the format wrong before fine-tuning (they answer in prose, swap day and
month, drop the zero padding); a short LoRA run on the bundled data teaches it, so the demo can show
that fine-tuning changed behaviour with a number, not an anecdote. Examples are generated from a
seed; training and evaluation use disjoint seeds and the evaluation set excludes training dates.
"""
from __future__ import annotations

import random

from .alpaca import format_alpaca

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
DATE_INSTRUCTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD)."


def _written(rng: random.Random, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    style = rng.randrange(3)
    if style == 0:
        return f"{name} {day}, {year}"
    if style == 1:
        return f"{day} {name} {year}"
    return f"{name[:3]} {day}, {year}"


def date_examples(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` Alpaca rows (instruction/input/output) of the date task, drawn from ``seed``."""
    rng = random.Random(seed)
    exclude = set(exclude or ())
    rows, seen = [], set()
    while len(rows) < n:
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, DAYS_IN_MONTH[m - 1])
        iso = f"{y:04d}-{m:02d}-{d:02d}"
        if iso in seen or iso in exclude:
            continue
        seen.add(iso)
        rows.append({"instruction": DATE_INSTRUCTION, "input": _written(rng, y, m, d), "output": iso})
    return rows


def exact_match(prediction: str, reference: str) -> bool:
    """True when the first line of the prediction, stripped, equals the reference."""
    lines = prediction.strip().splitlines()
    return bool(lines) and lines[0].strip() == reference.strip()


def evaluate_exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 12, batch_size: int = 8):
    """Greedy-decode each row's Alpaca prompt; returns (accuracy in [0, 1], list of (input, prediction, ref))."""
    import torch

    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            prompts = [format_alpaca(r["instruction"], r["input"], "") for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                results.append((r["input"], tokenizer.decode(seq, skip_special_tokens=True), r["output"]))
    finally:
        tokenizer.padding_side = old_side
    acc = sum(exact_match(p, ref) for _, p, ref in results) / max(len(results), 1)
    return acc, results
