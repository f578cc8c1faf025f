"""Data shipped with velotune (written by us; see scripts/make_bundled_data.py)."""
from __future__ import annotations

import json
from importlib import resources

ALPACA_FILE = "alpaca_velotune.json"
DATE_TRAIN_SEED = 1  # the seed scripts/make_bundled_data.py used for the date-task training rows
DATE_EVAL_SEED = 2


def load_alpaca_rows() -> list[dict]:
    """The bundled Alpaca rows: dicts with instruction / input / output (strings)."""
    return json.loads(resources.files(__package__).joinpath(ALPACA_FILE).read_text(encoding="utf-8"))


def load_alpaca_dataset():
    """The bundled Alpaca rows as a ``datasets.Dataset``."""
    from datasets import Dataset

    rows = load_alpaca_rows()
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})


def date_eval_rows(n: int = 32) -> list[dict]:
    """Held-out rows of the date task: a different seed, excluding every date used in training."""
    from ..tasks import date_examples

    train = {r["output"] for r in load_alpaca_rows() if r["instruction"].startswith("Rewrite the date")}
    return date_examples(n, seed=DATE_EVAL_SEED, exclude=train)
