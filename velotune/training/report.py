"""The run report of ``velotune train``: ``run_report.json`` + ``run_report.md`` (+ ``loss_curve.png``).

The JSON holds everything needed to compare or reproduce a run: the resolved config, package versions,
the card, wall time, tokens/s, peak memory, final and best training loss (and eval loss), the loss /
learning-rate / grad-norm history, the data counts (read, dropped by reason, truncated) and the paths
written. The markdown is the same for people. The PNG needs matplotlib (optional: when it does not
import, the report says how to get it; the numbers are in the JSON either way).
"""
from __future__ import annotations

import json
import math
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .._notices import say_once

PACKAGES = ("velotune", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "triton")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def card() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def history(log_history: list[dict]) -> list[dict]:
    """One row per logged step: step, loss, learning_rate, grad_norm, eval_loss (what was logged)."""
    rows: dict[int, dict] = {}
    for h in log_history:
        if "step" not in h or not ({"loss", "eval_loss"} & set(h)):
            continue
        row = rows.setdefault(h["step"], {"step": h["step"]})
        for k in ("loss", "learning_rate", "grad_norm", "eval_loss"):
            if k in h:
                row[k] = float(h[k])
    return [rows[s] for s in sorted(rows)]


def loss_summary(hist: list[dict]) -> dict:
    """final / best (lowest) training loss and eval loss, with their steps; NaN rows never count as best."""
    out: dict = {}
    for key, name in (("loss", "train"), ("eval_loss", "eval")):
        pts = [(r["step"], r[key]) for r in hist if key in r]
        finite = [p for p in pts if math.isfinite(p[1])]
        if pts:
            out[f"{name}_final"] = pts[-1][1]
            out[f"{name}_final_step"] = pts[-1][0]
        if finite:
            step, best = min(finite, key=lambda p: p[1])
            out[f"{name}_best"], out[f"{name}_best_step"] = best, step
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: that makes the file 0600
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fmt(v, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    loss, mem, tok, data = report.get("loss", {}), report.get("memory", {}), report.get("tokens", {}), report.get("data", {})
    lines = [
        f"# velotune run report: {report['status']}", "",
        f"- model: `{report['config']['model']['name']}`; data: `{report['config']['data']['path']}`",
        f"- card: {report['card']}" + (f" × {report['processes']} processes (DDP; memory and card of rank 0)"
                                        if (report.get("processes") or 1) > 1 else ""),
        f"- steps: {report.get('steps')} (resumed from `{report['resumed_from']}`)" if report.get("resumed_from")
        else f"- steps: {report.get('steps')}",
        f"- training time: {_fmt(report.get('train_seconds'), '.1f')} s; total {_fmt(report.get('total_seconds'), '.1f')} s",
        f"- tokens: {tok.get('seen')} (non-padding, this session); {_fmt(tok.get('per_second'), '.1f')} tokens/s",
        f"- peak memory: {mem.get('peak_reserved')} GB ({mem.get('card')}; +{mem.get('training_reserved')} GB in "
        "training)",
        f"- loss: final {_fmt(loss.get('train_final'))} (step {loss.get('train_final_step')}), best "
        f"{_fmt(loss.get('train_best'))} (step {loss.get('train_best_step')})",
    ]
    if "eval_final" in loss:
        lines.append(f"- eval loss: final {_fmt(loss['eval_final'])}, best {_fmt(loss.get('eval_best'))} "
                     f"(step {loss.get('eval_best_step')})")
    if data:
        dropped = ", ".join(f"{c} {r}" for r, c in data.get("dropped", {}).items()) or "none"
        lines.append(f"- data: {data.get('rows_read')} rows read, {data.get('rows_used')} used, dropped: {dropped}; "
                     f"{data.get('truncated')} truncated to {data.get('max_seq_length')} tokens")
    if report.get("skipped_masked_batches"):
        lines.append(f"- batches skipped (every label masked): {report['skipped_masked_batches']}")
    if report.get("error"):
        lines += ["", "## What stopped the run", "", "```", report["error"], "```"]
    if report.get("outputs"):
        lines += ["", "## Outputs", ""] + [f"- {k}: `{v}`" for k, v in report["outputs"].items()]
    hist = report.get("history", [])
    if hist:
        lines += ["", "## Loss curve", "", "| step | loss | learning rate | grad norm | eval loss |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['step']} | {_fmt(r.get('loss'))} | {_fmt(r.get('learning_rate'), '.3g')} | "
                  f"{_fmt(r.get('grad_norm'), '.3g')} | {_fmt(r.get('eval_loss'))} |" for r in hist]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), ""]
    return "\n".join(lines)


def write_loss_curve(hist: list[dict], path: Path) -> bool:
    """Train (and eval) loss with the learning rate on a second axis; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say_once("no-matplotlib", "loss_curve.png not written: matplotlib is not installed (`pip install "
                 "matplotlib` to get it; the loss history is in run_report.json and run_report.md)")
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        pts = [(r["step"], r[key]) for r in hist if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr = [(r["step"], r["learning_rate"]) for r in hist if "learning_rate" in r]
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="gray", linestyle="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(report: dict, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write run_report.json, run_report.md and (with matplotlib) loss_curve.png; returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "run_report.json", "markdown": out / "run_report.md"}
    _atomic_write(paths["json"], json.dumps(report, indent=2, default=str, allow_nan=True).encode())
    _atomic_write(paths["markdown"], markdown(report).encode())
    png = out / "loss_curve.png"
    if report.get("history") and write_loss_curve(report["history"], png):
        paths["loss_curve"] = png
    return {k: str(v) for k, v in paths.items()}
