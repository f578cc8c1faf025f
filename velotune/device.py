"""Device facts (GPU capability, bf16 support, default dtype) and the memory report.

The memory report is the seed workflow's "GPU memory report" as one call::

    with velotune.memory_report() as report:
        trainer_stats = trainer.train()

It prints the card, total memory and memory reserved at the start, and at the end the training time,
peak reserved memory, the part used by training, and both as % of the card. ``report.stats`` holds
the same numbers as a dict. On a CPU run it reports the process's peak resident memory instead.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

_GIB = 1024**3


def is_bfloat16_supported() -> bool:
    """True when the current CUDA GPU computes in bf16 natively (compute capability >= 8.0, Ampere+).

    On a machine without a CUDA GPU this returns False, matching ``torch.cuda.is_bf16_supported()``
    as the seed script uses it.
    """
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


def default_dtype(device_type: str | None = None) -> torch.dtype:
    """The dtype velotune picks for ``dtype=None``.

    CUDA: bfloat16 on compute capability >= 8.0 (A100, H100, RTX 30xx/40xx), else float16 (T4, V100).
    CPU: float32, because CPU bf16 matmuls are slower than fp32 on most CPUs and round every
    product, and float16 has no fast CPU kernels; fp32 keeps CPU runs exact and reproducible.
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.bfloat16 if is_bfloat16_supported() else torch.float16
    return torch.float32


def _cpu_peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _GIB


def in_graph_pool(segment: dict) -> bool:
    """Whether a segment of ``torch.cuda.memory_snapshot()`` belongs to a CUDA-graph private pool (reserved for
    the graphs' replays alone, not lent to the rest of the process)."""
    return tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)


def graph_pool_bytes(segments: list) -> int:
    """Bytes of the snapshot's segments that belong to CUDA-graph private pools."""
    return sum(seg["total_size"] for seg in segments if in_graph_pool(seg))


@dataclass
class MemoryReport:
    """Seed-style memory report. Use ``with memory_report():`` or call ``start()`` / ``stop()``.

    Fields (GiB, rounded to 3 decimals like the seed): ``card``, ``total``, ``start_reserved``,
    ``peak_reserved``, ``training_reserved`` (peak - start), ``peak_pct``, ``training_pct``,
    ``seconds``. On CPU, ``card`` is "CPU" and the peaks are the process's peak resident memory.
    """

    device: int | None = None  # CUDA device index; None: the current one (cuda:LOCAL_RANK under DDP)
    print_fn: object = print
    stats: dict = field(default_factory=dict)
    _t0: float = 0.0

    def start(self) -> "MemoryReport":
        """Print the card, its memory and the memory reserved so far; start the clock. Returns self."""
        self._t0 = time.perf_counter()
        if torch.cuda.is_available():
            if self.device is None:
                self.device = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(self.device)
            total = round(props.total_memory / _GIB, 3)
            reserved = round(torch.cuda.max_memory_reserved(self.device) / _GIB, 3)
            self.stats = {"card": props.name, "total": total, "start_reserved": reserved}
            self.print_fn(f"GPU = {props.name}. Max memory = {total} GB.")
            self.print_fn(f"{reserved} GB of memory reserved.")
        else:
            rss = round(_cpu_peak_rss_gib(), 3)
            self.stats = {"card": "CPU", "total": None, "start_reserved": rss}
            self.print_fn(f"No CUDA GPU: training on the CPU. Process peak memory so far = {rss} GB.")
        return self

    def stop(self, trainer_stats=None) -> dict:
        """Print the training time and the peak reserved memory (all of it, the part since ``start()``, and
        both as % of the card; the part the CUDA graphs' pool holds when there is one), and return
        ``stats``. ``trainer_stats``: what ``trainer.train()`` returned; its ``train_runtime`` is the time."""
        seconds = time.perf_counter() - self._t0
        if trainer_stats is not None and getattr(trainer_stats, "metrics", None):
            seconds = trainer_stats.metrics.get("train_runtime", seconds)
        s = self.stats
        s["seconds"] = round(seconds, 2)
        if torch.cuda.is_available():
            peak = round(torch.cuda.max_memory_reserved(self.device) / _GIB, 3)
        else:
            peak = round(_cpu_peak_rss_gib(), 3)
        s["peak_reserved"] = peak
        s["training_reserved"] = round(peak - s["start_reserved"], 3)
        self.print_fn(f"{s['seconds']} seconds used for training.")
        self.print_fn(f"{round(seconds / 60, 2)} minutes used for training.")
        if s["total"]:
            s["peak_pct"] = round(peak / s["total"] * 100, 3)
            s["training_pct"] = round(s["training_reserved"] / s["total"] * 100, 3)
            self.print_fn(f"Peak reserved memory = {peak} GB.")
            self.print_fn(f"Peak reserved memory for training = {s['training_reserved']} GB.")
            self.print_fn(f"Peak reserved memory % of max memory = {s['peak_pct']} %.")
            self.print_fn(f"Peak reserved memory for training % of max memory = {s['training_pct']} %.")
            s["graph_pool_reserved"] = round(graph_pool_bytes(torch.cuda.memory_snapshot()) / _GIB, 3)
            if s["graph_pool_reserved"]:
                self.print_fn(f"Of which the CUDA graphs' memory pool = {s['graph_pool_reserved']} GB "
                              "(velotune.set_cuda_graphs(model, False) gives it back, at the cost of speed).")
        else:
            self.print_fn(f"Process peak memory = {peak} GB (CPU run; +{s['training_reserved']} GB during training).")
        return s

    def __enter__(self) -> "MemoryReport":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def memory_report(device: int | None = None, print_fn=print) -> MemoryReport:
    """Memory report for a training run; use as ``with memory_report() as r: trainer.train()``."""
    return MemoryReport(device=device, print_fn=print_fn)
