"""Command line: ``velotune demo`` (the README's main job), ``velotune train``, ``velotune export``,
``velotune chat``, ``velotune env``."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Run one ``velotune`` command; returns its exit code (argument errors exit 2 through argparse)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="velotune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import chat, demo, env, export, train

    p = sub.add_parser("demo", help="fine-tune the real small model on the bundled data (the README's main job)")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    commands = (
        (train, "train", "fine-tune from a YAML config file (+ key=value overrides)"),
        (export, "export", "run, adapter or model folder -> merged 16-bit safetensors, PEFT adapter or GGUF"),
        (chat, "chat", "chat with a model, adapter or run folder in the terminal (streamed)"),
        (env, "env", "versions, GPU, what velotune would pick, which fast paths are on and why not"),
    )
    for module, name, summary in commands:  # each module's docstring is its --help text
        module.add_arguments(sub.add_parser(name, help=summary, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
