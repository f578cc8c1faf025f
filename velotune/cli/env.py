"""``velotune env``: versions, the GPU, what velotune would pick, and which fast paths are active here.

Each fast-path line reads ``NAME: on (...)`` or ``NAME: off: why``, so a bug report shows at once
why a run was slower than expected. Nothing here loads a model; the bitsandbytes line quantizes and
dequantizes one 64x64 tensor to prove the library works on this machine (its CPU or CUDA backend).
"""
from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "triton", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf")
FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with fp8 tensor cores (torch.float8_e4m3fn matmuls)
BF16_CAPABILITY = (8, 0)  # Ampere


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``velotune env`` takes no options."""
    p.set_defaults(func=run)


def _versions() -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    for name in PACKAGES:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} not installed")
    return lines


def _capability():
    import torch

    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


def _cuda_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA: on (CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s))"
    if torch.version.cuda is None:
        return f"CUDA: off: torch {torch.__version__} is a CPU build; install a CUDA build of torch for GPU training"
    return (f"CUDA: off: torch is built for CUDA {torch.version.cuda} but sees no GPU (driver, "
            "CUDA_VISIBLE_DEVICES)")


def _triton_line(cuda: bool) -> str:
    from ..kernels._utils import interpreting

    try:
        import triton
    except ImportError as e:
        return f"Triton kernels: off: triton is not importable ({e}); the pure-torch references run"
    if cuda:
        return f"Triton kernels: on (triton {triton.__version__}, compiled for the GPU)"
    interp = "; TRITON_INTERPRET=1 is set: tests run them through the CPU interpreter" if interpreting() else ""
    return (f"Triton kernels: off: no CUDA GPU, the pure-torch references run on the CPU (triton "
            f"{triton.__version__} importable{interp})")


def _dtype_lines(cap) -> list[str]:
    if cap is None:
        return ["bf16: off: needs a CUDA GPU of compute capability >= 8.0; CPU runs train in fp32",
                "fp8: off: needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper)"]
    name = f"compute capability {cap[0]}.{cap[1]}"
    bf16 = (f"bf16: on ({name} >= 8.0)" if cap >= BF16_CAPABILITY else
            f"bf16: off: {name} < 8.0; dtype=None trains in fp16 here")
    fp8 = (f"fp8: supported by this GPU ({name} >= 8.9); velotune does not train in fp8 yet" if cap >= FP8_CAPABILITY
           else f"fp8: off: {name} < 8.9 (fp8 tensor cores arrived with Ada and Hopper)")
    return [bf16, fp8]


def _bitsandbytes_line(cuda: bool) -> str:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        return f"bitsandbytes 4-bit: off: not importable ({e}); load_in_4bit=True will fail, pip install bitsandbytes"
    import torch

    device = "cuda" if cuda else "cpu"
    x = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
    try:
        q, state = bnbf.quantize_4bit(x, quant_type="nf4")
        err = (bnbf.dequantize_4bit(q, state) - x).abs().max().item()
    except (RuntimeError, NotImplementedError, AttributeError, ValueError) as e:  # reported: this is the point
        return f"bitsandbytes 4-bit: off: an NF4 round trip on {device} failed ({type(e).__name__}: {e})"
    if not err < 0.2:  # NF4's widest gap between codes is 0.30 of absmax (-1 to -0.70): error <= 0.15 if it works
        return f"bitsandbytes 4-bit: off: an NF4 round trip on {device} is off by {err:.3f} of 1.0 (broken backend)"
    return f"bitsandbytes 4-bit: on (NF4 round trip on {device}, max error {err:.3f} of 1.0)"


def _graphs_line(cuda: bool) -> str:
    import torch

    if not hasattr(torch.cuda, "CUDAGraph"):
        return f"CUDA graphs for training steps: off: torch {torch.__version__} has no torch.cuda.CUDAGraph"
    if not cuda:
        return "CUDA graphs for training steps: off: no CUDA GPU (the eager fast forward runs)"
    return ("CUDA graphs for training steps: on (decoder layers of checkpointed LoRA steps; "
            "velotune.set_cuda_graphs(model, False) turns them off)")


def _pending_line(cuda: bool) -> str:
    """The GPU paths switched off by their kill-switch flag (all on by default, each GPU-tested)."""
    from ..kernels import lora, nf4_matmul
    from ..models import attention, decode_graphs, generation, graphs, offload, recompute
    from ..training import optim

    flags = {"offloaded checkpointing": offload.ENABLED_ON_CUDA, "memory planner / no-recompute graphs":
             graphs.KEEP_ON_CUDA, "graphs for packed rows and masks": graphs.STATIC_INPUTS_ON_CUDA,
             "fused generation path": generation.DECODE_ON_CUDA, "recorded decode steps": decode_graphs.ENABLED,
             "few-row 4-bit matmul for decoding": nf4_matmul.ON_CUDA,
             "bitsandbytes' 4-bit GEMV for batch-1 decoding": lora.BNB_GEMV_ON_CUDA,
             "4-bit weights held dequantised (auto, memory left)": graphs.RESIDENT_ON_CUDA,
             "auto: inputs of the layers it does not keep in host memory": graphs.AUTO_OFFLOAD_ON_CUDA,
             "parameter views in recorded backwards (outside DDP)": graphs.PARAM_VIEWS is not False,
             "8-bit optimizer updates called directly": optim.DIRECT_ON_CUDA,
             "recomputes skip the unread down projection": recompute.SKIP_MLP_OUTPUT,
             "causal attention through cuDNN first": attention.PREFER_CUDNN,
             "graphs' pool sized for the longest batch": graphs.RESERVE_POOL,
             "capture warm-ups inside the graphs' pool": graphs.WARM_UP_IN_POOL,
             "the loss's temporaries inside the graphs' pool": graphs.LOSS_IN_POOL}
    waiting = [name for name, on in flags.items() if not on]
    if not cuda:
        return "GPU paths: n/a (no CUDA GPU)"
    if not waiting:
        return "GPU paths: all on"
    return f"GPU paths switched off (their flag; the plain paths run instead): {', '.join(waiting)}"


def _families_line() -> str:
    from ..models import FAMILIES

    return (f"fast forward: model_type {', '.join(FAMILIES)}; any other model_type keeps the HF forward "
            "with velotune's fused cross-entropy loss")


def fast_path_lines() -> list[str]:
    """One line per fast path: whether it is on here and, when off, why."""
    import torch

    cuda = torch.cuda.is_available()
    return [_cuda_line(), _triton_line(cuda), *_dtype_lines(_capability()), _bitsandbytes_line(cuda),
            _graphs_line(cuda), _pending_line(cuda), _families_line()]


def run(_args: argparse.Namespace) -> int:
    """Print versions, the GPU, the default dtype and the fast-path lines."""
    import torch

    from ..device import default_dtype, is_bfloat16_supported

    for line in _versions():
        print(line)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, {p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor}, "
              f"bf16 {'yes' if is_bfloat16_supported() else 'no'}")
    else:
        print("GPU: none (CPU run: fp32 LoRA; Triton kernels only under TRITON_INTERPRET=1 for tests)")
    print(f"dtype=None picks {default_dtype()}")
    print("fast paths:")
    for line in fast_path_lines():
        print(f"  {line}")
    return 0
