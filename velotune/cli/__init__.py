"""Command line: ``velotune demo`` (the README's main job), ``velotune train``, ``velotune export``, ``velotune env``."""
from __future__ import annotations

import argparse
import os
import sys


def _env(_args) -> int:
    import platform

    import torch

    from ..device import default_dtype, is_bfloat16_supported

    print(f"python {platform.python_version()} on {platform.machine()}")
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "triton", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf"):
        try:
            print(f"{name} {version(name)}")
        except PackageNotFoundError:
            print(f"{name} not installed")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, {p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor}, "
              f"bf16 {'yes' if is_bfloat16_supported() else 'no'}")
    else:
        print("GPU: none (CPU run: fp32 LoRA; Triton kernels only under TRITON_INTERPRET=1 for tests)")
    print(f"dtype=None picks {default_dtype()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="velotune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo, export, train

    p = sub.add_parser("demo", help="fine-tune the real small model on the bundled data (the README's main job)")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    p = sub.add_parser("train", help="fine-tune from a YAML config file (+ key=value overrides)",
                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(p)
    p = sub.add_parser("export", help="adapter or model folder -> merged 16-bit safetensors, PEFT adapter, or GGUF",
                       description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_arguments(p)
    p = sub.add_parser("env", help="versions, GPU, and what velotune would pick")
    p.set_defaults(func=_env)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
