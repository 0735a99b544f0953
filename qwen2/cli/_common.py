"""Flags and model resolution shared by the subcommands (named like the Python API)."""
from __future__ import annotations

import argparse

from qwen2.io.demo import model_or_demo

def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint dir, .gguf file or hub id (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), bfloat16 or float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def model_path(args) -> str:
    """--model, or the demo model when it is installed, or a clear error saying how to get one."""
    return model_or_demo(args.model)


def print_rows(rows: list[tuple[str, object]]):
    """A two-column key/value table, keys left-aligned (bench, info)."""
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
