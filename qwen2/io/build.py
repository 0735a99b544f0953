"""Build a model from a stream of named checkpoint tensors, placed where the checkpoint format's
name table (qwen2.io.names) says; every loader (safetensors, GGUF, first-generation Qwen, GPTQ)
feeds it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from qwen2.errors import CheckpointError, Qwen2Error
from qwen2.io.names import HF_NAMES, NameTable
from qwen2.model.config import ModelConfig
from qwen2.model.decoder import Qwen2, fused_linears

if TYPE_CHECKING:
    from qwen2.model.tp import TPShard


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype, config: ModelConfig | None = None) -> torch.dtype:
    """'auto' (the checkpoint's dtype), a name, or a torch.dtype. float16 is refused: Qwen2 was
    trained in bfloat16 and overflows float16 in late layers (NaN logits, replies of '!!!!')."""
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in (None, "auto"):
        name = (config.torch_dtype if config else None) or "bfloat16"
        dt = DTYPES.get(str(name).removeprefix("torch."), torch.bfloat16)
        if dt == torch.float16:  # an fp16 checkpoint still runs safely in bf16
            dt = torch.bfloat16
    else:
        try:
            dt = DTYPES[str(dtype).lower().removeprefix("torch.")]
        except KeyError:
            raise Qwen2Error(f"unknown dtype {dtype!r}; use auto, bfloat16 or float32") from None
    if dt == torch.float16:
        raise Qwen2Error(
            "float16 is not supported: Qwen2 activations exceed the float16 range (65504) and give NaN "
            "logits; use bfloat16 (same memory) or float32")
    return dt


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not sys.stderr.isatty(), leave=False)


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device="cpu", source: str = "checkpoint", total: int | None = None,
                names: NameTable = HF_NAMES, release: Callable[[torch.Tensor], None] | None = None,
                shard: "TPShard | None" = None) -> Qwen2:
    """Create the model without allocating, then place each checkpoint tensor as it arrives (one at
    a time, converted to dtype on the fly), where `names` (the checkpoint format's name table) says:
    a whole parameter, or its rows of a fused projection. Peak memory stays near the size of the
    weights: a whole parameter of the right dtype is used as it is (a view of a memory-mapped file);
    `release(t)`, if given, is told when a checkpoint tensor has been copied into a fused
    projection and is no longer needed.

    A meta tensor is a placeholder: its parameter (all of its parts) stays unallocated, for a
    module the caller replaces (the GPTQ loader's quantized linears).

    shard (qwen2.model.tp.TPShard): build this tensor-parallel rank's model and keep only its share
    of each tensor (a slice of the memory-mapped file is all that is read)."""
    with torch.device("meta"):
        model = shard.build() if shard is not None else Qwen2(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    fused = fused_linears(model)
    tied = config.tie_word_embeddings
    parts: dict[str, dict[int, bool]] = {}  # fused parameter -> {part: is a placeholder}
    buffers: dict[str, torch.Tensor] = {}   # fused parameters being assembled
    loaded: set[str] = set()
    bar = _progress(total or len(params), f"loading {Path(source).name}")
    for name, t in tensors:
        bar.update(1)
        if names.ignored(name):
            continue
        targets = names.to_model(name, t)
        if targets is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {list(t.shape)})")
        for pname, part, x in targets:
            if tied and pname == "lm_head.weight":
                continue  # some tied checkpoints also store the (identical) head
            if shard is not None and (x := shard.slice(pname, part, x)) is None:
                continue  # another rank's
            p = params.get(pname)
            if p is None:
                raise CheckpointError(f"{source}: unexpected tensor {name!r} (shape {list(t.shape)})")
            if pname in loaded:
                raise CheckpointError(f"{source}: tensor {name!r} sets {pname} a second time")
            mod = pname.rpartition(".")[0]
            if part is None:
                _check_shape(source, name, x, tuple(p.shape))
                if not x.is_meta:
                    # a slice of a stacked tensor is copied, so that the whole stack is not kept
                    _set_param(model, pname, x.to(device=device, dtype=dtype, copy=x is not t))
                loaded.add(pname)
                continue
            sizes = fused[mod]
            lo = sum(sizes[:part])
            _check_shape(source, name, x, (sizes[part],) + tuple(p.shape[1:]))
            seen = parts.setdefault(pname, {})
            if part in seen:
                raise CheckpointError(f"{source}: tensor {name!r} sets part {part} of {pname} a second time")
            seen[part] = x.is_meta
            if not x.is_meta:
                if pname not in buffers:
                    buffers[pname] = torch.empty(p.shape, dtype=dtype, device=device)
                buffers[pname][lo:lo + sizes[part]].copy_(x)
                if release is not None:
                    release(x)
            if len(seen) == len(sizes):
                if len(set(seen.values())) > 1:
                    raise CheckpointError(f"{source}: {mod} has quantized and float parts ({name!r})")
                if pname in buffers:
                    _set_param(model, pname, buffers.pop(pname))
                loaded.add(pname)
        if shard is not None and release is not None:
            release(t)  # only this rank's share was copied out; the file's pages can go
    bar.close()
    expected = set(params) - ({"lm_head.weight"} if tied else set())
    missing = sorted(expected - loaded)
    if missing:
        described = [d for pname in missing for d in _describe_missing(pname, parts.get(pname, {}), fused, names)]
        more = f" and {len(described) - 5} more" if len(described) > 5 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(described[:5])}{more}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.reset_parameters(device)  # buffers were created on meta
    model.tp = shard
    return model.eval()


def _check_shape(source: str, name: str, t: torch.Tensor, expected: tuple):
    if tuple(t.shape) != expected:
        raise CheckpointError(f"{source}: tensor {name!r} has shape {list(t.shape)}, the config "
                              f"expects {list(expected)}")


def _describe_missing(pname: str, seen: dict, fused: dict, names: NameTable) -> list[str]:
    """The checkpoint names of what a parameter still lacks (with the parameter where it differs)."""
    mod, _, leaf = pname.rpartition(".")
    if mod not in fused or (not seen and names.has_whole(mod)):
        wanted = [names.to_checkpoint(mod)]
    else:
        wanted = [names.to_checkpoint(mod, k) for k in range(len(fused[mod])) if k not in seen]
    out = []
    for ck in wanted:
        ck_name = f"{ck}.{leaf}" if ck else pname
        out.append(ck_name if ck_name == pname else f"{ck_name} (for {pname})")
    return out


def _set_param(model: torch.nn.Module, name: str, t: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(t))
