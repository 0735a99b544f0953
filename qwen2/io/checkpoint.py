"""Checkpoint I/O: find a checkpoint, read HF safetensors (single or sharded), build the model
tensor by tensor, and save back in the same layout. Never unpickles anything.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen2.model.config import ModelConfig
from qwen2.errors import CheckpointError, Qwen2Error
from qwen2.io.names import HF_NAMES, NameTable
from qwen2.model.decoder import Qwen2, fused_linears

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


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint path, or a hub id resolved through huggingface_hub (cache first)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if s.startswith((".", "/", "~")) or s.count("/") != 1 or s.endswith((".gguf", ".json")):
        raise Qwen2Error(f"{s}: no such file or directory")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt", "*.tiktoken", "*.py", "*.model"]
    try:
        return Path(snapshot_download(s, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(s, allow_patterns=patterns))
    except Exception as e:
        raise Qwen2Error(
            f"{s}: not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}). Download it on a connected machine (huggingface-cli download {s}) "
            "and pass the local directory, e.g. --model /path/to/Qwen2-0.5B-Instruct") from None


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


_MADV_PAGEOUT = 21  # Linux 5.4+


def release_pages(t: torch.Tensor):
    """Tell the kernel that a tensor read by iter_safetensors (a view of the memory-mapped file)
    will not be read again: the pages wholly inside it leave this process's resident memory
    (MADV_PAGEOUT: the file still holds them; pages shared with other tensors stay). The fused
    projections copy their parts out of the file, which would otherwise stay resident beside the
    copies. A no-op where the call is unavailable."""
    global _libc
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
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
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        _libc.madvise(start, end - start, _MADV_PAGEOUT)


_libc = None


def count_safetensors(files: list[Path]) -> int:
    n = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                n += len(list(st.keys()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return n


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device="cpu", source: str = "checkpoint", total: int | None = None,
                names: NameTable = HF_NAMES, release: Callable[[torch.Tensor], None] | None = None) -> Qwen2:
    """Create the model without allocating, then place each checkpoint tensor as it arrives (one at
    a time, converted to dtype on the fly), where `names` (the checkpoint format's name table) says:
    a whole parameter, or its rows of a fused projection. Peak memory stays near the size of the
    weights: a whole parameter of the right dtype is used as it is (a view of a memory-mapped file);
    `release(t)`, if given, is told when a checkpoint tensor has been copied into a fused
    projection and is no longer needed.

    A meta tensor is a placeholder: its parameter (all of its parts) stays unallocated, for a
    module the caller replaces (the GPTQ loader's quantized linears)."""
    with torch.device("meta"):
        model = Qwen2(config)
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


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def load_hf(ckpt: Path, dtype="auto", device="cpu") -> Qwen2:
    config = ModelConfig.from_file(ckpt / "config.json")
    dt = parse_dtype(dtype, config)
    files = safetensors_files(ckpt)
    if config.raw.get("quantization_config"):
        from qwen2.io.gptq import load_gptq
        return load_gptq(config, iter_safetensors(files), dt, device, source=str(ckpt), release=release_pages)
    return build_model(config, iter_safetensors(files), dt, device, source=str(ckpt),
                       total=count_safetensors(files), release=release_pages)


def load_model(path_or_id, dtype="auto", device="cpu") -> Qwen2:
    """Load a Qwen2 model: HF checkpoint dir, GGUF file/dir, or hub id."""
    from qwen2.kernels.memory import trim
    model = _load_model(path_or_id, dtype, device)
    trim()  # conversions on the way (GGUF dequantization, dtype casts) leave freed heap pages
    return model


def _load_model(path_or_id, dtype, device) -> Qwen2:
    path = resolve(path_or_id)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()
                                  and any(path.glob("*.gguf"))):
        from qwen2.io.gguf import load_gguf_model
        return load_gguf_model(path, dtype=dtype, device=device)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{path}: not a Qwen2 checkpoint (no config.json or .gguf file)")
        model_type = _peek_model_type(cfg)
        if model_type == "qwen":
            from qwen2.io.qwen1 import load_qwen1
            return load_qwen1(path, dtype=dtype, device=device)
        return load_hf(path, dtype, device)
    raise CheckpointError(f"{path}: not a Qwen2 checkpoint (expected a directory or a .gguf file)")


def _peek_model_type(cfg: Path):
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except Exception:
        return None  # ModelConfig.from_file gives the clear error


def save_model(model: Qwen2, out_dir, max_shard_bytes: int = 2 * 1024 ** 3, dtype: torch.dtype | None = None):
    """Write config.json + model.safetensors (or shards + index) in the official HF layout."""
    if model.quant:
        raise Qwen2Error("save_model writes float checkpoints; a quantized model is saved with "
                         "qwen2.io.gptq.save_quantized (the GPTQ layout)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(checkpoint_tensors(model))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    dt_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
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
    else:
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
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(dt_name), indent=2))
    return out


def checkpoint_tensors(model: Qwen2, names: NameTable = HF_NAMES,
                       skip: Callable[[str], bool] = lambda module: False) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state under the checkpoint format's names: fused projections split back into
    their parts (views), a tied lm_head left out (as Hugging Face saves it), modules for which
    `skip(model module name)` holds left out."""
    fused = fused_linears(model)
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if skip(mod) or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if mod in fused:
            lo = 0
            for k, n in enumerate(fused[mod]):
                yield f"{names.to_checkpoint(mod, k)}.{leaf}", t[lo:lo + n]
                lo += n
        else:
            yield f"{names.to_checkpoint(mod)}.{leaf}", t


def load_tokenizer(path_or_id) -> "Tokenizer":
    """Tokenizer of a checkpoint dir, a qwen.tiktoken file, a .gguf file (or a dir holding only
    one) or a hub id."""
    from qwen2.io.gguf import load_gguf_tokenizer
    from qwen2.text.tokenizer import Tokenizer, load_tokenizer_dir
    p = resolve(path_or_id)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs and not any((p / n).is_file() for n in ("tokenizer.json", "vocab.json", "qwen.tiktoken")):
            return load_gguf_tokenizer(ggufs[0])
        return load_tokenizer_dir(p)
    if p.suffix == ".gguf":
        return load_gguf_tokenizer(p)
    if p.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(p)
    if p.name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        return load_tokenizer_dir(p.parent)
    raise Qwen2Error(f"{p}: not a tokenizer (expected a checkpoint dir, qwen.tiktoken or .gguf)")
