"""The `qwen2` command: a thin shell over the Python API.

Each subcommand lives in its own module in this package and exposes `register(subparsers)`,
which adds its parser and sets `func=run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from qwen2 import __version__
from qwen2.errors import Qwen2Error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description="Run, serve, quantize and evaluate Qwen2 models.")
    parser.add_argument("--version", action="version", version=f"qwen2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()   # imports every subcommand (torch): seconds, when Ctrl-C comes too
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _join_tensor_parallel_group(args)
        return int(args.func(args) or 0)
    except Qwen2Error as e:
        print(f"qwen2: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except MemoryError:
        print("qwen2: error: out of memory; try --dtype bfloat16, a quantized model or a smaller model",
              file=sys.stderr)
        return 1



def _join_tensor_parallel_group(args):
    """Under `torchrun --nproc-per-node N -m qwen2 ...`: join the group, so that loading gives each
    rank its share (qwen2.model.tp); only rank 0 writes to stdout (the others run the same steps)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from qwen2.model.tp import init_from_env
    rank, _ = init_from_env(getattr(args, "device", None) or "cpu")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
