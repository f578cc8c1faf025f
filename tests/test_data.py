"""Alpaca formatting (EOS always appended), bundled data, the date task and its metric."""
from __future__ import annotations

import pytest

from velotune import VelotuneError, alpaca_prompt, get_alpaca_formatter
from velotune.data.bundled import date_eval_rows, load_alpaca_dataset, load_alpaca_rows
from velotune.data.tasks import DATE_INSTRUCTION, date_examples, exact_match


class _Tok:
    eos_token = "</s>"


def test_formatter_appends_eos_batched():
    ds = load_alpaca_dataset().select(range(10))
    out = ds.map(get_alpaca_formatter(_Tok()), batched=True)
    assert all(t.endswith("</s>") for t in out["text"])
    row = out[0]
    expect = (alpaca_prompt.format(row["instruction"], row["input"], row["output"]) if row["input"]
              else None)
    if expect:
        assert row["text"] == expect + "</s>"
    assert all("### Response:\n" + r["output"] + "</s>" in r["text"] for r in out)


def test_formatter_errors():
    with pytest.raises(VelotuneError, match="no eos_token"):
        get_alpaca_formatter(type("T", (), {"eos_token": None})())
    fmt = get_alpaca_formatter("</s>")
    with pytest.raises(VelotuneError, match="no 'output' column"):
        fmt({"instruction": ["a"], "answer": ["b"]})
    with pytest.raises(VelotuneError, match="row 0: output must be a string, got int"):
        fmt({"instruction": ["a"], "input": [""], "output": [3]})


def test_bundled_data_and_date_task():
    rows = load_alpaca_rows()
    assert len(rows) >= 300 and all(set(r) == {"instruction", "input", "output"} for r in rows)
    train_dates = {r["output"] for r in rows if r["instruction"] == DATE_INSTRUCTION}
    assert len(train_dates) >= 200
    ev = date_eval_rows(32)
    assert len(ev) == 32 and not train_dates & {r["output"] for r in ev}
    assert date_examples(5, seed=3) == date_examples(5, seed=3)
    assert exact_match(" 2021-03-05\nmore", "2021-03-05") and not exact_match("2021-3-5", "2021-03-05")
    assert not exact_match("", "2021-03-05")
