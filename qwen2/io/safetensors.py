"""Hugging Face safetensors files: find them (single file, or shards plus an index), read them
lazily from memory-mapped files, write them (sharded past a size). Never unpickles anything."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen2.errors import CheckpointError


def safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: bad index ({type(e).__name__}: {e})") from None
        for f in files:
            if not isinstance(f, str) or "/" in f or not (ckpt / f).exists():
                raise CheckpointError(f"{index}: names shard {f!r}, which is missing")
        return [ckpt / f for f in files]
    single = ckpt / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(ckpt.glob("*.safetensors"))
    if found:
        return found
    if list(ckpt.glob("*.bin")) or list(ckpt.glob("*.pt")):
        raise CheckpointError(f"{ckpt}: only pickle weights (*.bin/*.pt) found; they are never unpickled "
                              "here. Convert them to safetensors first.")
    raise CheckpointError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs read lazily from memory-mapped safetensors files."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e})") from None


def count_safetensors(files: list[Path]) -> int:
    n = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                n += len(list(st.keys()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return n


_MADV_PAGEOUT = 21  # Linux 5.4+


def release_pages(t: torch.Tensor):
    """Tell the kernel that a tensor read by iter_safetensors (a view of the memory-mapped file)
    will not be read again: the pages wholly inside it leave this process's resident memory
    (MADV_PAGEOUT: the file still holds them; pages shared with other tensors stay). The fused
    projections copy their parts out of the file, which would otherwise stay resident beside the
    copies. A no-op where the call is unavailable."""
    if t.device.type == "cpu":
        madvise_pages(t.data_ptr(), t.numel() * t.element_size(), _MADV_PAGEOUT)


MADV_DONTNEED = 4


def madvise_pages(ptr: int, nbytes: int, advice: int) -> None:
    """madvise(advice) over the whole pages inside [ptr, ptr + nbytes); a no-op off Linux or
    where libc cannot be loaded."""
    global _libc
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    if _libc is None:
        import ctypes
        import ctypes.util
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if end > start:
        _libc.madvise(start, end - start, advice)


_libc = None


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int = 2 * 1024 ** 3):
    """Write (name, tensor) pairs as out/model.safetensors, or as model-0000k-of-0000n.safetensors
    shards of at most max_shard_bytes plus model.safetensors.index.json; replaces any safetensors
    already there."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors:
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += nb
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
