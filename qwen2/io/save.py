"""Save a float model in the Hugging Face layout (config.json + safetensors), under the checkpoint
names of the HF name table: what transformers loads. Quantized models: qwen2.io.gptq.save_quantized."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from qwen2.errors import Qwen2Error
from qwen2.io.names import HF_NAMES, NameTable
from qwen2.io.safetensors import write_safetensors
from qwen2.model.decoder import Qwen2, fused_linears


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
    write_safetensors(state.items(), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(dt_name), indent=2))
    return out


def checkpoint_tensors(model: Qwen2, names: NameTable = HF_NAMES,
                       skip: Callable[[str], bool] = lambda module: False) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state under the checkpoint format's names: fused projections split back into
    their parts (views), a tied lm_head left out (as Hugging Face saves it), modules for which
    `skip(model module name)` holds left out."""
    fused = fused_linears(model)

    def checkpoint_name(mod: str, part: int | None, leaf: str) -> str:
        ck = names.to_checkpoint(mod, part)
        if ck is None:
            raise Qwen2Error(f"{mod}{'' if part is None else f' (part {part})'} has no name in this checkpoint format")
        return f"{ck}.{leaf}"

    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if skip(mod) or (model.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if mod in fused:
            lo = 0
            for k, n in enumerate(fused[mod]):
                yield checkpoint_name(mod, k, leaf), t[lo:lo + n]
                lo += n
        else:
            yield checkpoint_name(mod, None, leaf), t
