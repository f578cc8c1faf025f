"""Training data from files, folders or saved datasets, checked row by row, as a ``text`` column.

Sources (``data.path`` of ``velotune train``):

- a ``.json`` file (a list of objects, or JSON Lines), ``.jsonl`` / ``.ndjson``, ``.csv``, ``.parquet``;
- a folder of such files (read in name order, concatenated), or a ``datasets`` folder written by
  ``save_to_disk`` (a ``DatasetDict`` takes ``data.split``);
- ``bundled:alpaca``: velotune's own Alpaca rows.

Formats: ``alpaca`` (instruction / input / output -> the Alpaca prompt + EOS), ``sharegpt``
(conversations of from/value, normalised by ``standardize_sharegpt``), ``messages`` (role/content lists),
both rendered with the chat template (``get_chat_template`` when ``data.chat_template`` names one),
and ``text`` (one string per row). ``auto`` picks one from the columns.

Bad data never stops a run without a message. A whole-source problem (no such file, no rows, a column
that no row has, a format that cannot be told) raises ``VelotuneError`` naming the file and the fix. A
bad row (invalid JSON line, missing or non-string field, malformed conversation, empty text) is dropped
and counted by reason, the first one of each reason quoted with its file and line; with
``on_bad_row="error"`` it raises instead. Rows longer than ``max_seq_length`` tokens are counted and
truncated by the trainer; all counts land in :class:`DataReport` (and the run report).

Rows are read into Python dicts for the row-level checks: fine for fine-tuning sets (1M short rows take
about a GB and some seconds); stream larger corpora through ``datasets`` and the Python API instead.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from .._notices import VelotuneError, say
from .alpaca import format_alpaca

FILE_TYPES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")
BUNDLED = ("alpaca",)
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_CHAT_COLUMNS = {"sharegpt": "conversations", "messages": "messages"}


@dataclass
class DataReport:
    """What happened to the rows: counts by reason, the first example of each, truncation."""

    source: str
    format: str = ""
    rows_read: int = 0
    rows_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_bad: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    longest_tokens: int = 0
    max_seq_length: int = 0
    eval_rows: int = 0

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_bad.setdefault(reason, f"{where}: {detail}")

    def summary(self) -> str:
        parts = [f"data: {self.rows_read} rows read from {self.source} (format {self.format}), {self.rows_used} used"]
        if self.eval_rows:
            parts[0] += f" ({self.eval_rows} held out for eval)"
        if self.dropped:
            n = sum(self.dropped.values())
            parts.append(f"{n} dropped: " + "; ".join(
                f"{c} {r} (first: {self.first_bad[r]})" for r, c in self.dropped.items()))
        if self.truncated:
            parts.append(f"{self.truncated} rows longer than max_seq_length={self.max_seq_length} tokens "
                         f"(longest {self.longest_tokens}) are truncated to {self.max_seq_length}: raise "
                         "model.max_seq_length to keep their ends")
        return ". ".join(parts)


class _Rows:
    """Rows read from a source, each with where it came from ("file.jsonl line 7")."""

    def __init__(self, report: DataReport, strict: bool):
        self.rows: list[dict] = []
        self.where: list[str] = []
        self.report = report
        self.strict = strict

    def add(self, row: dict, where: str) -> None:
        self.rows.append(row)
        self.where.append(where)

    def bad(self, reason: str, where: str, detail: str) -> None:
        _reject(self.report, self.strict, reason, where, detail)


def _reject(report: DataReport, strict: bool, reason: str, where: str, detail: str) -> None:
    """A bad row: raise with its location (``on_bad_row="error"``) or drop it and count it."""
    if strict:
        raise VelotuneError(f"{where}: {detail} (data.on_bad_row=error; set it to drop to skip such rows)")
    report.drop(reason, where, detail)


# ----------------------------------------------------------------------------------- readers
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VelotuneError(f"{path}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def _object_row(value, rows: _Rows, where: str) -> None:
    if isinstance(value, dict):
        rows.add(value, where)
    else:
        rows.bad("not an object", where, f"a row must be a JSON object {{...}}, got {type(value).__name__} "
                                         f"{json.dumps(value)[:60]}")


def _read_jsonl(path: Path, text: str, rows: _Rows) -> None:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            rows.bad("invalid JSON", f"{path} line {n}", f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        _object_row(value, rows, f"{path} line {n}")


def _read_json(path: Path, rows: _Rows) -> None:
    text = _read_text(path)
    if path.suffix != ".json":
        return _read_jsonl(path, text, rows)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or text.lstrip().startswith("{"):  # JSON Lines in a .json file
            return _read_jsonl(path, text, rows)
        raise VelotuneError(f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg}); fix the file "
                            "(a list of objects, or one object per line)") from None
    if isinstance(value, dict):
        return _object_row(value, rows, f"{path} line 1")
    if not isinstance(value, list):
        raise VelotuneError(f"{path}: holds a JSON {type(value).__name__}; velotune reads a list of objects "
                            "(one per row) or JSON Lines")
    for i, item in enumerate(value):
        _object_row(item, rows, f"{path} item {i}")


def _read_csv(path: Path, rows: _Rows) -> None:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames or []
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row or None in row.values():
                    got = len(row) - 1 + len(row.get(None, ())) if None in row else \
                        sum(v is not None for v in row.values())
                    rows.bad("wrong field count", where, f"{got} fields, the header has {len(header)}")
                    continue
                rows.add(row, where)
        except (csv.Error, UnicodeDecodeError) as e:
            raise VelotuneError(f"{path} line {reader.line_num}: unreadable CSV ({e}); fix the file") from None


def _read_parquet(path: Path, rows: _Rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise VelotuneError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        rows.add(row, f"{path} row {i}")


def _read_saved_dataset(path: Path, split: str, rows: _Rows) -> None:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise VelotuneError(f"{path}: looks like a datasets folder but cannot be loaded ({e})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise VelotuneError(f"{path} has no split {split!r} (splits: {list(ds)}); set data.split")
        ds = ds[split]
    for i, row in enumerate(ds.to_list()):
        rows.add(row, f"{path} row {i}")


_READERS = {".json": _read_json, ".jsonl": _read_json, ".ndjson": _read_json, ".csv": _read_csv,
            ".parquet": _read_parquet}


def _read_file(path: Path, rows: _Rows) -> None:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise VelotuneError(f"data.path {path}: unsupported file type {path.suffix or '(none)'!r}; use "
                            f"{', '.join(FILE_TYPES)}, a folder of them, or a datasets folder (save_to_disk)")
    reader(path, rows)


def read_rows(path: str, split: str = "train", report: DataReport | None = None, strict: bool = False) -> _Rows:
    """All rows of ``path`` (file, folder, saved dataset or ``bundled:NAME``) with their locations."""
    report = report or DataReport(source=str(path))
    rows = _Rows(report, strict)
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED:
            raise VelotuneError(f"data.path {path}: no bundled data set {name!r}; bundled: "
                                + ", ".join(f"bundled:{b}" for b in BUNDLED))
        from .bundled import load_alpaca_rows

        for i, row in enumerate(load_alpaca_rows()):
            rows.add(row, f"{path} row {i}")
        return rows
    p = Path(path).expanduser()
    if not p.exists():
        raise VelotuneError(f"data.path {path}: no such file or folder")
    if p.is_file():
        _read_file(p, rows)
    elif any((p / m).is_file() for m in _DATASETS_MARKERS):
        _read_saved_dataset(p, split, rows)
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_TYPES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise VelotuneError(f"data.path {path}: the folder holds no {', '.join(FILE_TYPES)} files and is not "
                                "a datasets folder written by save_to_disk")
        for f in files:
            _read_file(f, rows)
    return rows


# ----------------------------------------------------------------------------------- formats
def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def detect_format(columns: list[str], cfg) -> str:
    """The format ``auto`` means for these columns (text, alpaca, sharegpt, messages)."""
    if cfg.text_field in columns:
        return "text"
    if cfg.instruction_field in columns and cfg.output_field in columns:
        return "alpaca"
    if cfg.conversations_field and cfg.conversations_field in columns:
        return "sharegpt"
    for fmt, col in _CHAT_COLUMNS.items():
        if col in columns:
            return fmt
    raise VelotuneError(
        f"cannot tell the data format from the columns {columns}: set data.format to alpaca ("
        f"{cfg.instruction_field}/{cfg.input_field}/{cfg.output_field}), sharegpt (conversations), messages, "
        f"or text ({cfg.text_field}), and the data.*_field names to your columns")


def _required(fmt: str, cfg) -> list[str]:
    if fmt == "text":
        return [cfg.text_field]
    if fmt == "alpaca":
        return [cfg.instruction_field, cfg.output_field]
    return [cfg.conversations_field or _CHAT_COLUMNS[fmt]]


def _string_fields(row: dict, names: list[str], optional: tuple = ()) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``row`` lacks one of ``names`` or holds a non-string there, else None."""
    for name in names:
        value = row.get(name)
        if value is None and name in optional:
            continue
        if value is None:
            return "missing field", f"missing {name!r}"
        if not isinstance(value, str):
            return "non-string field", (f"{name!r} is {type(value).__name__}, not a string: "
                                        f"{json.dumps(value, default=str)[:60]}")
    return None


def _alpaca_item(row: dict, cfg):
    problem = _string_fields(row, [cfg.instruction_field, cfg.input_field, cfg.output_field],
                             optional=(cfg.input_field,))
    if problem:
        return None, problem
    if not row[cfg.output_field].strip():
        return None, ("empty text", f"{cfg.output_field!r} is empty")
    return (row[cfg.instruction_field], row.get(cfg.input_field) or "", row[cfg.output_field]), None


def _text_item(row: dict, cfg):
    problem = _string_fields(row, [cfg.text_field])
    if problem:
        return None, problem
    if not row[cfg.text_field].strip():
        return None, ("empty text", f"{cfg.text_field!r} is empty")
    return row[cfg.text_field], None


def _chat_item(column: str):
    from .sharegpt import standardize_sharegpt

    def item(row: dict, _cfg):
        conv = row.get(column)
        if conv is None:
            return None, ("missing field", f"missing {column!r}")
        if not isinstance(conv, list):
            return None, ("malformed conversation", f"{column!r} must be a list of messages, got "
                                                     f"{type(conv).__name__}")
        try:
            return standardize_sharegpt([conv])[0], None
        except VelotuneError as e:
            return None, ("malformed conversation", str(e).removeprefix("row 0: ").removeprefix("row 0, "))

    return item


@dataclass
class PreparedData:
    """Rows read and checked, not yet rendered to text (that needs the tokenizer): alpaca triples,
    texts, or role/content message lists, each with its location."""

    format: str
    items: list
    where: list[str]
    report: DataReport
    strict: bool


def prepare_data(cfg) -> PreparedData:
    """Read ``cfg.path`` and check every row against ``cfg.format`` (no tokenizer needed: run it before
    loading a model so bad data fails in seconds). ``cfg`` is a ``velotune.config.DataConfig``."""
    report = DataReport(source=cfg.path)
    strict = cfg.on_bad_row == "error"
    rows = read_rows(cfg.path, cfg.split, report, strict=strict)
    if cfg.max_rows:
        rows.rows, rows.where = rows.rows[:cfg.max_rows], rows.where[:cfg.max_rows]
    report.rows_read = len(rows.rows) + sum(report.dropped.values())
    if not rows.rows:
        raise VelotuneError(f"data.path {cfg.path} holds no usable rows" + (
            f" ({report.summary()})" if report.dropped else "; check the file, the split, or data.max_rows"))
    columns = _columns(rows.rows)
    fmt = detect_format(columns, cfg) if cfg.format == "auto" else cfg.format
    report.format = fmt
    missing = [c for c in _required(fmt, cfg) if c not in columns]
    if missing:
        raise VelotuneError(f"data.path {cfg.path}: no row has the column {missing[0]!r} that data.format={fmt} "
                            f"needs (columns: {columns}); set data.format or the data.*_field names to your columns")
    check = {"alpaca": _alpaca_item, "text": _text_item}.get(fmt) or _chat_item(_required(fmt, cfg)[0])
    items, where = [], []
    for row, w in zip(rows.rows, rows.where):
        item, problem = check(row, cfg)
        if problem:
            rows.bad(problem[0], w, problem[1])
        else:
            items.append(item)
            where.append(w)
    if not items:
        raise VelotuneError(f"every row of {cfg.path} was dropped: {report.summary()}")
    return PreparedData(fmt, items, where, report, strict)


def _render(data: PreparedData, tokenizer) -> list[str]:
    if data.format == "text":
        return list(data.items)
    if data.format == "alpaca":
        eos = tokenizer.eos_token
        if not eos:
            raise VelotuneError("the tokenizer has no eos_token; alpaca texts must end in one (set tokenizer.eos_token)")
        return [format_alpaca(ins, inp, out, eos) for ins, inp, out in data.items]
    if not getattr(tokenizer, "chat_template", None):
        raise VelotuneError(f"data.format={data.format} needs a chat template, and this tokenizer has none: set "
                            "data.chat_template (chatml, llama-3, ...; velotune.data.template_names())")
    from jinja2 import TemplateError

    texts = []
    for messages, where in zip(data.items, data.where):
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except TemplateError as e:  # raise_exception() in a template: e.g. a role order it does not accept
            _reject(data.report, data.strict, "rejected by the chat template", where, str(e))
    return texts


def _count_long(texts: list[str], tokenizer, max_seq_length: int, report: DataReport) -> None:
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
    report.max_seq_length = max_seq_length
    report.longest_tokens = max(lengths, default=0)
    report.truncated = sum(n > max_seq_length for n in lengths)


def to_datasets(data: PreparedData, tokenizer, max_seq_length: int, *, chat_template: str | None = None,
                eval_fraction: float = 0.0, seed: int = 3407):
    """Render the prepared rows with ``tokenizer`` into ``(train, eval or None)`` datasets of one ``text``
    column; counts rows longer than ``max_seq_length`` (the trainer truncates them) and says the summary."""
    from datasets import Dataset

    report = data.report
    if chat_template and data.format in _CHAT_COLUMNS:
        from .chat_templates import get_chat_template

        get_chat_template(tokenizer, chat_template=chat_template)
    texts = _render(data, tokenizer)
    if not texts:
        raise VelotuneError(f"every row of {report.source} was dropped: {report.summary()}")
    report.rows_used = len(texts)
    _count_long(texts, tokenizer, max_seq_length, report)
    train, evaluation = Dataset.from_dict({"text": texts}), None
    if eval_fraction > 0:
        n_eval = max(1, round(len(texts) * eval_fraction))
        if n_eval >= len(texts):
            raise VelotuneError(f"data.eval_fraction={eval_fraction} leaves no training rows of {len(texts)}; "
                                "lower it or add rows")
        split = train.train_test_split(test_size=n_eval, seed=seed)
        train, evaluation = split["train"], split["test"]
        report.eval_rows = n_eval
        report.rows_used -= n_eval
    say(report.summary())
    return train, evaluation


def load_training_data(cfg, tokenizer, max_seq_length: int, seed: int = 3407):
    """``(train_dataset, eval_dataset or None, DataReport)`` for a ``velotune.config.DataConfig``:
    :func:`prepare_data` then :func:`to_datasets`."""
    data = prepare_data(cfg)
    train, evaluation = to_datasets(data, tokenizer, max_seq_length, chat_template=cfg.chat_template,
                                    eval_fraction=cfg.eval_fraction, seed=seed)
    return train, evaluation, data.report
