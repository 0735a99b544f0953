"""Load a model or a tokenizer from whatever the user names: a Hugging Face checkpoint directory
(float or GPTQ), a first-generation Qwen directory, a GGUF file (or a directory holding one), or a
hub id."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qwen2.errors import CheckpointError, Qwen2Error
from qwen2.io.awq import load_awq
from qwen2.io.build import build_model, parse_dtype
from qwen2.io.gguf import load_gguf_model, load_gguf_tokenizer
from qwen2.io.gptq import load_gptq
from qwen2.io.hub import resolve
from qwen2.io.qwen1 import load_qwen1
from qwen2.io.safetensors import (
    count_safetensors,
    iter_safetensors,
    release_pages,
    safetensors_files,
)
from qwen2.model.config import ModelConfig
from qwen2.model.decoder import Qwen2
from qwen2.model.tp import TPShard

if TYPE_CHECKING:
    from qwen2.text.tokenizer import Tokenizer


def load_hf(ckpt: Path, dtype="auto", device="cpu", tp: tuple[int, int] | None = None,
            float_head: bool = False) -> Qwen2:
    """A Hugging Face safetensors checkpoint directory, float, GPTQ or AWQ (quantization_config).
    tp: (rank, world size): load only this tensor-parallel rank's share (qwen2.model.tp).
    float_head: a quantized checkpoint's float lm_head stays float (else int8 at run time)."""
    config = ModelConfig.from_file(ckpt / "config.json")
    dt = parse_dtype(dtype, config)
    files = safetensors_files(ckpt)
    if config.raw.get("quantization_config"):
        if tp is not None:
            raise Qwen2Error(f"{ckpt}: tensor parallelism runs float checkpoints only for now (this one "
                             "is quantized)")
        method = str(config.raw["quantization_config"].get("quant_method", "")).lower()
        loaders = {"gptq": load_gptq, "awq": load_awq}
        if method not in loaders:
            raise CheckpointError(f"{ckpt}: quantization method {method!r} is not supported (gptq or awq)")
        return loaders[method](config, iter_safetensors(files), dt, device, source=str(ckpt), release=release_pages,
                               float_head=float_head)
    shard = TPShard(config, *tp) if tp is not None else None
    return build_model(config, iter_safetensors(files), dt, device, source=str(ckpt),
                       total=count_safetensors(files), release=release_pages, shard=shard)


def load_model(path_or_id, dtype="auto", device="cpu", tp: tuple[int, int] | None = None) -> Qwen2:
    """Load a Qwen2 model: HF checkpoint dir, GGUF file/dir, or hub id. tp: (rank, world size) of
    a tensor-parallel group: this rank's share only (`model.tp` then says which)."""
    from qwen2.kernels.memory import trim
    model = _load_model(path_or_id, dtype, device, tp if tp is not None and tp[1] > 1 else None)
    trim()  # conversions on the way (GGUF dequantization, dtype casts) leave freed heap pages
    return model


def _load_model(path_or_id, dtype, device, tp) -> Qwen2:
    path = resolve(path_or_id)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()
                                  and any(path.glob("*.gguf"))):
        if tp is not None:
            raise Qwen2Error(f"{path}: tensor parallelism loads Hugging Face safetensors checkpoints only")
        return load_gguf_model(path, dtype=dtype, device=device)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{path}: not a Qwen2 checkpoint (no config.json or .gguf file)")
        model_type = _peek_model_type(cfg)
        if model_type == "qwen":
            if tp is not None:
                raise Qwen2Error(f"{path}: tensor parallelism loads Qwen2 checkpoints only, not first-generation Qwen")
            return load_qwen1(path, dtype=dtype, device=device)
        return load_hf(path, dtype, device, tp)
    raise CheckpointError(f"{path}: not a Qwen2 checkpoint (expected a directory or a .gguf file)")


def _peek_model_type(cfg: Path):
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except Exception:
        return None  # ModelConfig.from_file gives the clear error


def load_tokenizer(path_or_id) -> Tokenizer:
    """Tokenizer of a checkpoint dir, a qwen.tiktoken file, a .gguf file (or a dir holding only
    one) or a hub id."""
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
