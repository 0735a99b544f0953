"""Flags and model resolution shared by the subcommands (named like the Python API)."""
from __future__ import annotations

import argparse
from pathlib import Path

from qwen2.errors import Qwen2Error
from qwen2.io.demo import model_or_demo


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint dir, .gguf file or hub id (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), bfloat16 or float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def model_path(args) -> str:
    """--model, or the demo model when it is installed, or a clear error saying how to get one;
    --device checked first (one line, before any loading)."""
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if args.model:
        p = Path(args.model).expanduser()
        if p.is_dir() and not (p / "config.json").is_file() and not any(p.glob("*.gguf")):
            raise Qwen2Error(f"{p}: not a Qwen2 checkpoint (no config.json and no .gguf file in this directory)")
    return model_or_demo(args.model)


def check_device(name: str) -> None:
    """A device this torch can use, or a one-line error."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise Qwen2Error(f"--device {name!r}: not a device (expected cpu, cuda, cuda:N, mps, ...)") from None
    if dev.type == "cpu":
        return
    mod = getattr(torch, dev.type, None)
    ok = getattr(mod, "is_available", None)
    if ok is None or not ok():
        build = "" if dev.type != "cuda" or torch.version.cuda else " (this PyTorch is a CPU-only build)"
        raise Qwen2Error(f"--device {name}: no {dev.type} device is available{build}; use --device cpu")
    count = getattr(mod, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise Qwen2Error(f"--device {name}: there are {count()} {dev.type} device(s)")


def check_max_new_tokens(llm, max_new_tokens: int | None, prompt_tokens: int = 1) -> None:
    """The server's rule (max_tokens plus the prompt within the model's context) on the command
    line, where a huge --max-new-tokens would otherwise be cut silently."""
    if max_new_tokens is None:
        return
    limit = int(llm.model.config.max_position_embeddings)
    if max_new_tokens + prompt_tokens > limit:
        raise Qwen2Error(f"--max-new-tokens {max_new_tokens} plus the prompt's {prompt_tokens} tokens exceeds the "
                         f"maximum context length of {limit} tokens")


def print_rows(rows: list[tuple[str, object]]):
    """A two-column key/value table, keys left-aligned (bench, info)."""
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
