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
