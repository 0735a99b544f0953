"""First-generation Qwen (e.g. Qwen-1.8B-Chat, `model_type` "qwen"): its config.json and its
`transformer.h.*` weight layout mapped onto the Qwen2 model, plus its inference-time long-context
tricks (dynamic NTK rotary, logn attention).

The architecture is Qwen2's with all heads as kv heads: q/k/v fused in `c_attn` (with bias; exactly
the model's `qkv_proj`), no bias elsewhere, MLP `c_proj(w1(x) * silu(w2(x)))` so w2 is the gate and
w1 the up projection (QWEN1_NAMES).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from qwen2.errors import CheckpointError
from qwen2.io.build import build_model, parse_dtype
from qwen2.io.names import NameTable
from qwen2.io.safetensors import count_safetensors, iter_safetensors, release_pages, safetensors_files
from qwen2.model.config import ModelConfig, read_config_json

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


# first-generation module name -> model module (see qwen2.io.names)
QWEN1_NAMES = NameTable({
    "transformer.wte": "model.embed_tokens",
    "transformer.ln_f": "model.norm",
    "lm_head": "lm_head",
    "transformer.h.{i}.ln_1": "model.layers.{i}.input_layernorm",
    "transformer.h.{i}.attn.c_attn": "model.layers.{i}.self_attn.qkv_proj",  # q, k, v rows in that order
    "transformer.h.{i}.attn.c_proj": "model.layers.{i}.self_attn.o_proj",
    "transformer.h.{i}.ln_2": "model.layers.{i}.post_attention_layernorm",
    "transformer.h.{i}.mlp.w2": ("model.layers.{i}.mlp.gate_up_proj", 0),
    "transformer.h.{i}.mlp.w1": ("model.layers.{i}.mlp.gate_up_proj", 1),
    "transformer.h.{i}.mlp.c_proj": "model.layers.{i}.mlp.down_proj",
}, ignore=r"(^|\.)rotary_emb\.inv_freq$")


def enable_qwen1_long_context(model, seq_length: int, use_dynamic_ntk: bool, use_logn_attn: bool):
    """Switch first-generation Qwen's inference-time long-context tricks on a built model (both
    are no-ops within seq_length): config fields the model rebuilds its rotary and attention from."""
    c = model.config
    c.seq_length, c.use_dynamic_ntk, c.use_logn_attn = seq_length, use_dynamic_ntk, use_logn_attn
    return model.configure()


def load_qwen1(path, dtype="auto", device="cpu", long_context: bool = True):
    """Load a first-generation Qwen checkpoint directory (config.json with model_type "qwen",
    safetensors in the `transformer.h.*` layout) as a `qwen2.model.decoder.Qwen2`. With long_context the
    checkpoint's use_dynamic_ntk / use_logn_attn are honoured (off: plain Qwen2 math, identical
    within seq_length)."""
    path = Path(path)
    cfg_path = path / "config.json"
    d = read_config_json(cfg_path)
    config, long_ctx = qwen1_config(d, source=str(cfg_path))
    if long_context:
        config = dataclasses.replace(config, **long_ctx)
    dt = parse_dtype(dtype, config)
    files = safetensors_files(path)
    return build_model(config, iter_safetensors(files), dt, device, source=str(path), total=count_safetensors(files),
                       names=QWEN1_NAMES, release=release_pages)
