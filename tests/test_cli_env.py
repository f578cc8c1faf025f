"""``velotune env``: versions and one line per fast path saying whether it is on here and why not."""
from __future__ import annotations

import re
import sys
from importlib.metadata import version

import pytest
import torch

from velotune.cli import env, main
from velotune.models import FAMILIES


def test_env_prints_versions_and_fast_paths(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"torch {torch.__version__}" in lines and f"transformers {version('transformers')}" in lines
    fast = lines[lines.index("fast paths:") + 1:]
    assert [line.split(":")[0].strip() for line in fast] == [
        "CUDA", "Triton kernels", "bf16", "fp8", "bitsandbytes 4-bit", "CUDA graphs for training steps",
        "GPU paths" if not torch.cuda.is_available() else fast[6].split(":")[0].strip(), "fast forward"]
    assert fast[-1] == (f"  fast forward: model_type {', '.join(FAMILIES)}; any other model_type keeps the HF "
                        "forward with velotune's fused cross-entropy loss")
    bnb = next(line for line in fast if "bitsandbytes" in line)
    m = re.search(r"on \(NF4 round trip on (cpu|cuda), max error ([\d.]+) of 1.0\)", bnb)
    assert m and m.group(1) == ("cuda" if torch.cuda.is_available() else "cpu") and float(m.group(2)) < 0.2, bnb
    if not torch.cuda.is_available():
        cpu_build = torch.version.cuda is None
        want = (f"  CUDA: off: torch {torch.__version__} is a CPU build; install a CUDA build of torch for GPU "
                "training" if cpu_build else
                f"  CUDA: off: torch is built for CUDA {torch.version.cuda} but sees no GPU (driver, "
                "CUDA_VISIBLE_DEVICES)")
        assert fast[0] == want
        assert "  CUDA graphs for training steps: off: no CUDA GPU (the eager fast forward runs)" in fast
        triton = next(line for line in fast if "Triton" in line)
        assert triton.startswith("  Triton kernels: off: no CUDA GPU, the pure-torch references run on the CPU")
        assert "  bf16: off: needs a CUDA GPU of compute capability >= 8.0; CPU runs train in fp32" in fast
    else:
        assert fast[0].startswith("  CUDA: on") and "CUDA graphs for training steps: on" in out


@pytest.mark.parametrize("cap,bf16,fp8", [
    ((7, 5), "bf16: off: compute capability 7.5 < 8.0; dtype=None trains in fp16 here",
     "fp8: off: compute capability 7.5 < 8.9"),
    ((8, 0), "bf16: on (compute capability 8.0 >= 8.0)", "fp8: off: compute capability 8.0 < 8.9"),
    ((8, 6), "bf16: on", "fp8: off: compute capability 8.6 < 8.9"),
    ((8, 9), "bf16: on", "fp8: supported by this GPU (compute capability 8.9 >= 8.9)"),
    ((9, 0), "bf16: on", "fp8: supported by this GPU (compute capability 9.0 >= 8.9)"),
])
def test_bf16_and_fp8_lines_follow_compute_capability(cap, bf16, fp8):
    got_bf16, got_fp8 = env._dtype_lines(cap)
    assert got_bf16.startswith(bf16) and got_fp8.startswith(fp8)


def test_off_lines_say_why(monkeypatch):
    import bitsandbytes.functional as bnbf

    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", broken)
    assert env._bitsandbytes_line(cuda=False) == ("bitsandbytes 4-bit: off: an NF4 round trip on cpu failed "
                                                  "(RuntimeError: no kernel for this device)")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert env._triton_line(cuda=True).startswith("Triton kernels: off: triton is not importable (")
    assert env._graphs_line(cuda=True).startswith("CUDA graphs for training steps: on")
    monkeypatch.delattr(torch.cuda, "CUDAGraph")
    assert env._graphs_line(cuda=True) == (f"CUDA graphs for training steps: off: torch {torch.__version__} has no "
                                           "torch.cuda.CUDAGraph")


def test_switched_off_gpu_paths_are_listed(monkeypatch):
    from velotune.cli import env
    from velotune.kernels import lora, nf4_matmul
    from velotune.models import attention, generation, graphs, offload, recompute
    from velotune.training import optim

    assert env._pending_line(cuda=False) == "GPU paths: n/a (no CUDA GPU)"
    # the defaults: the few-row 4-bit matmul (slower) is off, the rest on
    line = env._pending_line(cuda=True)
    assert "few-row 4-bit matmul" in line and "optimizer updates called directly" not in line
    assert "parameter views" not in line and "held dequantised" not in line
    assert "4-bit GEMV" not in line and "does not keep" not in line and "unread down" not in line
    assert "cuDNN" not in line and "pool" not in line
    for mod, attr in ((offload, "ENABLED_ON_CUDA"), (graphs, "KEEP_ON_CUDA"), (graphs, "STATIC_INPUTS_ON_CUDA"),
                      (generation, "DECODE_ON_CUDA"), (nf4_matmul, "ON_CUDA"), (graphs, "PARAM_VIEWS"),
                      (graphs, "RESIDENT_ON_CUDA"), (lora, "BNB_GEMV_ON_CUDA"), (graphs, "AUTO_OFFLOAD_ON_CUDA"),
                      (optim, "DIRECT_ON_CUDA"), (recompute, "SKIP_MLP_OUTPUT"),
                      (attention, "PREFER_CUDNN"), (graphs, "RESERVE_POOL"), (graphs, "WARM_UP_IN_POOL"),
                      (graphs, "LOSS_IN_POOL")):
        monkeypatch.setattr(mod, attr, True)
    assert env._pending_line(cuda=True) == "GPU paths: all on"
    monkeypatch.setattr(offload, "ENABLED_ON_CUDA", False)
    monkeypatch.setattr(generation, "DECODE_ON_CUDA", False)
    line = env._pending_line(cuda=True)
    assert "offloaded checkpointing" in line and "fused generation path" in line
    assert "memory planner" not in line and "packed rows" not in line
    monkeypatch.setattr(graphs, "WARM_UP_IN_POOL", False)
    assert "capture warm-ups inside the graphs' pool" in env._pending_line(cuda=True)
    monkeypatch.setattr(graphs, "LOSS_IN_POOL", False)
    assert "the loss's temporaries inside the graphs' pool" in env._pending_line(cuda=True)
