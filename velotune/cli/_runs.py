"""What a CLI ``MODEL`` / ``SOURCE`` argument names: a model folder, a PEFT adapter folder, or a
``velotune train`` run folder, and which folder of a run to use.

A run folder (``training.output_dir``) holds ``checkpoint-N`` folders (PEFT adapters, or full models
after full fine-tuning), the exports ``lora/`` and ``merged_16bit/`` (or under ``export.dir``),
``velotune_config.yaml`` and ``run_report.json``. Its usable weights, in the caller's order of
preference:

- ``lora`` / ``merged_16bit``: the final exports. Trusted only when the run report says training
  finished (status ``completed`` or ``export failed``) or when there is no report at all (a run killed
  before writing one); after a failed or interrupted resume the exports are older than the newest
  checkpoint, so they come after it.
- ``checkpoint``: the newest *complete* checkpoint (one with ``trainer_state.json``; the staging
  folders of an interrupted save are never picked).

Nothing here loads a model: only file names, ``run_report.json`` and ``velotune_config.yaml`` are read.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .._notices import VelotuneError

REPORT = "run_report.json"
CONFIG_COPY = "velotune_config.yaml"  # the name velotune train writes (cli/train.py CONFIG_COPY)
EXPORTS = ("lora", "merged_16bit")
_FINISHED = ("completed", "export failed")  # training reached its last step in these report statuses


@dataclass(frozen=True)
class Pick:
    """The folder chosen in a run folder: ``path``, what it is (``what``: "lora", "merged_16bit",
    "checkpoint") and ``why`` (a short reason shown to the user)."""

    path: Path
    what: str
    why: str


def folder_kind(folder: Path) -> str | None:
    """"adapter" (adapter_config.json), "model" (config.json), "run" (a velotune train output folder), or None."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    if is_run_folder(folder):
        return "run"
    return None


def is_run_folder(folder: Path) -> bool:
    """True for a ``velotune train`` output folder: a run report, the config copy, or a checkpoint-N."""
    if (folder / REPORT).is_file() or (folder / CONFIG_COPY).is_file():
        return True
    return any(p.is_dir() and p.name.startswith("checkpoint-") for p in folder.iterdir())


def _read_report(run: Path) -> dict | None:
    path = run / REPORT
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise VelotuneError(f"{path} is not valid JSON ({e}); pass one of the run's checkpoint-N folders or "
                            "its lora/ folder instead") from None
    return data if isinstance(data, dict) else None


def run_config(run: Path) -> dict:
    """The config a run was started with (``velotune_config.yaml``, else the report's copy), or {}."""
    config = run / CONFIG_COPY
    if config.is_file():
        import yaml

        try:
            saved = yaml.safe_load(config.read_text())
        except yaml.YAMLError as e:
            raise VelotuneError(f"{config} is not valid YAML ({e}); pass the run's lora/ or checkpoint-N "
                                "folder instead") from None
    else:
        saved = (_read_report(run) or {}).get("config")
    return saved if isinstance(saved, dict) else {}


def _export_dirs(run: Path) -> list[Path]:
    """Where the run's exports may be: ``export.dir`` of its config (when set), then the run folder."""
    d = (run_config(run).get("export") or {}).get("dir")
    return ([Path(d).expanduser()] if isinstance(d, str) and d else []) + [run]


def _usable(folder: Path) -> bool:
    return folder.is_dir() and folder_kind(folder) in ("adapter", "model")


def _find_export(run: Path, report: dict | None, what: str) -> tuple[Path | None, bool]:
    """The export folder ``what`` and whether the report named it: the report's path (also tried inside
    the run folder, for a report written with a relative output_dir from another working directory),
    else the default place (``export.dir`` or the run folder, + ``what``)."""
    outputs = (report or {}).get("outputs")
    named = outputs.get(what) if isinstance(outputs, dict) else None
    if isinstance(named, str):
        for c in (Path(named).expanduser(), run / Path(named).name):
            if _usable(c):
                return c, True
    return next((c for c in (d / what for d in _export_dirs(run)) if _usable(c)), None), False


def pick_from_run(run: Path, order: tuple[str, ...]) -> Pick:
    """The folder of run folder ``run`` to load, the first of ``order`` ("lora", "merged_16bit",
    "checkpoint") that exists; exports of an unfinished run go after the newest checkpoint.

    Raises ``VelotuneError`` naming the fix when the run holds nothing loadable.
    """
    from ..training.checkpoints import checkpoints

    report = _read_report(run)
    status = report.get("status") if report else None
    stale = report is not None and status not in _FINISHED
    if stale:  # a failed / interrupted (resumed) run: its newest checkpoint is newer than any export
        order = tuple(w for w in order if w == "checkpoint") + tuple(w for w in order if w != "checkpoint")
    found = [p for p in checkpoints(run) if _usable(p)]
    for what in order:
        if what == "checkpoint":
            if found:
                before = order[:order.index("checkpoint")]  # the exports preferred to it, none found
                why = f"the newest complete checkpoint of {len(found)}"
                if stale:
                    why += f"; the run report says {status!r}"
                elif before:
                    why += f"; the run has no final {' or '.join(before)} export"
                return Pick(found[-1], "checkpoint", why)
            continue
        path, named = _find_export(run, report, what)
        if path is not None:
            why = (f"the run's final {what} export" + (" (named by run_report.json)" if named else "")
                   + (f"; from an earlier finish: the run report says {status!r}" if stale else ""))
            return Pick(path, what, why)
    partial = sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", ".tmp-checkpoint-")))
    hint = f" ({', '.join(partial[:3])} incomplete: no trainer_state.json or weights)" if partial else ""
    raise VelotuneError(f"{run} is a velotune train run folder but holds no final export (lora/, merged_16bit/) and "
                        f"no complete checkpoint-N{hint}; train until the first save (training.save_steps), or "
                        "pass a model or adapter folder")


def resolve_run(prog: str, label: str, value: str, run: Path, order: tuple[str, ...], err) -> tuple[Path, str | None]:
    """A CLI argument that named a run folder -> (the folder picked from it, its kind), said on stderr;
    ``err(message)`` (exits 2) when the run holds nothing usable."""
    try:
        pick = pick_from_run(run, order)
    except VelotuneError as e:
        err(f"{label} {e}")
    print(f"velotune {prog}: {value} is a run folder: using {pick.path} ({pick.why})", file=sys.stderr)
    return pick.path, folder_kind(pick.path)
