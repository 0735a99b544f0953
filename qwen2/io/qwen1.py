"""First-generation Qwen (e.g. Qwen-1.8B-Chat, `model_type` "qwen"): its config.json and its
`transformer.h.*` weight layout mapped onto the Qwen2 model, plus its inference-time long-context
tricks (dynamic NTK rotary, logn attention).

The architecture is Qwen2's with all heads as kv heads: q/k/v fused in `c_attn` (with bias), no bias
elsewhere, MLP `c_proj(w1(x) * silu(w2(x)))` so w2 is the gate and w1 the up projection.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from qwen2.model.config import ModelConfig, read_config_json
from qwen2.errors import CheckpointError

# Qwen (first generation) ends a document with <|endoftext|>; chat turns end with <|im_end|>.
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


def is_qwen1_config(d: dict) -> bool:
    return d.get("model_type") == "qwen"


def qwen1_config(d: dict, source: str = "config.json") -> tuple[ModelConfig, dict]:
    """(ModelConfig in Qwen2 terms, long-context settings {seq_length, use_dynamic_ntk,
    use_logn_attn}) from a first-generation config.json."""
    if not is_qwen1_config(d):
        raise CheckpointError(f"{source}: model_type {d.get('model_type')!r} is not first-generation Qwen ('qwen')")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if d.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    head_dim = d.get("kv_channels") or hidden // heads
    if d.get("rotary_pct", 1.0) != 1.0:
        raise CheckpointError(f"{source}: rotary_pct {d['rotary_pct']} (partial rotary) is not supported")
    if d.get("no_bias", True) is False:
        raise CheckpointError(f"{source}: no_bias false (biases on MLP/c_proj) is not supported")
    seq_length = int(d.get("seq_length") or d.get("max_position_embeddings") or 2048)
    dtype = d.get("torch_dtype")
    for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        if d.get(flag):
            dtype = name
    try:
        config = ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=hidden,
            intermediate_size=d["intermediate_size"] // 2,  # each of w1/w2 is half of intermediate_size
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
            head_dim=head_dim, max_position_embeddings=int(d.get("max_position_embeddings") or seq_length),
            rope_theta=float(d.get("rotary_emb_base", 10000)), rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), torch_dtype=dtype,
            bos_token_id=None, eos_token_id=ENDOFTEXT,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    long_ctx = dict(seq_length=seq_length, use_dynamic_ntk=bool(d.get("use_dynamic_ntk", False)),
                    use_logn_attn=bool(d.get("use_logn_attn", False)))
    return config, long_ctx


_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_SIMPLE = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def qwen1_to_qwen2_tensors(tensors: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                           source: str = "checkpoint") -> Iterator[tuple[str, torch.Tensor]]:
    """Rename first-generation tensors to Qwen2 names, splitting the fused c_attn (q, k, v in that
    order along the output dim). Unknown names pass through unchanged, so that build_model names
    them in its error."""
    width = config.num_attention_heads * config.head_dim
    for name, t in tensors:
        if name in _TOP:
            yield _TOP[name], t
            continue
        m = _LAYER.match(name)
        if not m:
            yield name, t
            continue
        i, rest = m.groups()
        prefix = f"model.layers.{i}."
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            if t.shape[0] != 3 * width:
                raise CheckpointError(f"{source}: tensor {name!r} has {t.shape[0]} rows, the config expects "
                                      f"3 x {width}")
            kind = rest.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split(width, dim=0)):
                yield f"{prefix}self_attn.{proj}.{kind}", part
        elif rest in _SIMPLE:
            yield prefix + _SIMPLE[rest], t
        else:
            yield name, t


def enable_qwen1_long_context(model, seq_length: int, use_dynamic_ntk: bool, use_logn_attn: bool):
    """Switch on first-generation Qwen's inference-time long-context tricks on a built model (both
    are no-ops within seq_length)."""
    from qwen2.model.longctx import LognAttention
    from qwen2.model.rope import DynamicNTKRotary
    if use_dynamic_ntk:
        rotary = DynamicNTKRotary(model.config, seq_length)
        model.rotary = rotary.to(model.device)
    if use_logn_attn:
        for layer in model.model.layers:
            layer.self_attn.attn_fn = LognAttention(seq_length, layer.self_attn.attn_fn)
    model.qwen1 = dict(seq_length=seq_length, use_dynamic_ntk=use_dynamic_ntk, use_logn_attn=use_logn_attn)
    return model


def load_qwen1(path, dtype="auto", device="cpu", long_context: bool = True):
    """Load a first-generation Qwen checkpoint directory (config.json with model_type "qwen",
    safetensors in the `transformer.h.*` layout) as a `qwen2.model.decoder.Qwen2`. With long_context the
    checkpoint's use_dynamic_ntk / use_logn_attn are honoured (off: plain Qwen2 math, identical
    within seq_length)."""
    from qwen2.io.checkpoint import build_model, count_safetensors, iter_safetensors, parse_dtype, safetensors_files
    path = Path(path)
    cfg_path = path / "config.json"
    d = read_config_json(cfg_path)
    config, long_ctx = qwen1_config(d, source=str(cfg_path))
    dt = parse_dtype(dtype, config)
    files = safetensors_files(path)
    total = count_safetensors(files) + 2 * config.num_hidden_layers * 2  # c_attn weight/bias become 3 each
    model = build_model(config, qwen1_to_qwen2_tensors(iter_safetensors(files), config, str(path)), dt, device,
                        source=str(path), total=total)
    if long_context:
        enable_qwen1_long_context(model, **long_ctx)
    return model
