"""Device facts and the seed's memory report as one call."""
from __future__ import annotations

import torch

import velotune
from velotune.device import default_dtype, is_bfloat16_supported


def test_cpu_defaults():
    if not torch.cuda.is_available():
        assert is_bfloat16_supported() is False
        assert default_dtype() == torch.float32


def test_memory_report_context():
    lines = []
    with velotune.memory_report(print_fn=lines.append) as r:
        x = torch.ones(1 << 20)  # 4 MiB so there is something to measure
        del x
    s = r.stats
    assert {"card", "start_reserved", "peak_reserved", "training_reserved", "seconds"} <= set(s)
    assert s["peak_reserved"] >= s["start_reserved"] >= 0 and s["seconds"] >= 0
    assert any("seconds used for training" in ln for ln in lines)
    assert any("minutes used for training" in ln for ln in lines)
    if torch.cuda.is_available():
        assert any(ln.startswith("GPU = ") for ln in lines)
        assert any("% of max memory" in ln for ln in lines)


def test_memory_report_names_the_graphs_pool(monkeypatch):
    """On a GPU, the seed's peak reserved memory includes what the CUDA graphs' private pool holds: the
    report says how much, and how to give it back (emulated CUDA calls; the numbers are the allocator's)."""
    from velotune import device

    gib = 1024**3
    segments = [{"total_size": gib // 2, "segment_pool_id": (0, 0)}, {"total_size": gib // 4, "segment_pool_id": (1, 0)},
                {"total_size": gib // 8, "segment_pool_id": (1, 0)}]
    assert device.graph_pool_bytes(segments) == 3 * gib // 8
    reserved = iter([1 * gib, 3 * gib])

    class Props:
        name, total_memory = "Emulated GPU", 80 * gib

    for name, fn in {"is_available": lambda: True, "current_device": lambda: 0,
                     "get_device_properties": lambda d: Props, "max_memory_reserved": lambda d: next(reserved),
                     "memory_snapshot": lambda: segments}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    lines = []
    with velotune.memory_report(print_fn=lines.append) as r:
        pass
    assert r.stats["peak_reserved"] == 3 and r.stats["training_reserved"] == 2
    assert r.stats["graph_pool_reserved"] == 0.375
    assert "Of which the CUDA graphs' memory pool = 0.375 GB" in lines[-1] and "set_cuda_graphs" in lines[-1]
    segments[1:] = []
    reserved = iter([1 * gib, 3 * gib])
    lines.clear()
    with velotune.memory_report(print_fn=lines.append) as r:
        pass
    assert r.stats["graph_pool_reserved"] == 0 and not any("graphs" in ln for ln in lines)
