"""`qwen2 info`: architecture, parameter count, dtype, memory and context length of a checkpoint,
read from its config (no weights are loaded)."""
from __future__ import annotations

import json
from pathlib import Path

from qwen2.cli import _common
from qwen2.errors import CheckpointError


def register(subparsers):
    p = subparsers.add_parser("info", help="architecture, parameters, dtype, memory, context length",
                              description=__doc__)
    _common.add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="plan a tensor-parallel run: each rank's weights and KV cache for N ranks, for "
                        "every released config and dtype (and --model, when given)")
    p.set_defaults(func=run)


def tp_plan(n: int, models: dict) -> list[dict]:
    """One row per (model, dtype): each of n ranks' weights and KV bytes per token, or why n
    ranks cannot split the model (qwen2.model.tp)."""
    from qwen2.model.tp import problems as tp_problems
    from qwen2.model.tp import rank_memory, valid_tp_sizes
    rows = []
    for name, config in models.items():
        for dtype in ("bfloat16", "int8", "int4"):
            row = {"model": name, "dtype": dtype, "tensor_parallel_size": n}
            group = 128 if dtype != "bfloat16" else None  # int4/int8 as the GPTQ releases: 128-input groups
            problems = tp_problems(config, n, group)
            if problems:
                sizes = ", ".join(map(str, valid_tp_sizes(config, group, limit=max(n, 16))))
                row["error"] = f"does not split: {'; '.join(problems)} (valid sizes: {sizes})"
            else:
                row.update(rank_memory(config, n, dtype))
            rows.append(row)
    return rows


def run_tp_plan(args) -> int:
    from qwen2.model.config import PRESETS, preset
    models = {}
    if args.model:
        from qwen2.io.hub import resolve
        models[args.model] = read_config(resolve(args.model))[0]
    models.update({name: preset(name) for name in PRESETS})
    rows = tp_plan(args.tensor_parallel_size, models)
    if args.json:
        print(json.dumps(rows))
        return 0
    w = max(len(r["model"]) for r in rows)
    print(f"{'model':<{w}}  {'dtype':<8}  per rank (of {args.tensor_parallel_size}): weights, KV cache per token")
    for r in rows:
        what = r["error"] if "error" in r else f"{gib(r['weights']):>10}   {r['kv_per_token'] / 1024:g} KiB"
        print(f"{r['model']:<{w}}  {r['dtype']:<8}  {what}")
    return 0


def read_config(path: Path):
    """(ModelConfig, checkpoint dtype name, format, files) without touching the weights (nor, for
    GGUF, the tokenizer arrays: qwen2.io.gguf_header)."""
    from qwen2.model.config import ModelConfig
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))):
        from qwen2.io.gguf import _config_dict, find_gguf
        from qwen2.io.gguf_header import read_header
        f = find_gguf(path)
        header = read_header(f)
        config = ModelConfig.from_hf_dict(_config_dict(header, f), source=str(f))
        ftype = _gguf_file_type(header.fields.get("general.file_type"))
        return config, ftype, f"GGUF {ftype}", [f]
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: not a Qwen2 checkpoint (no config.json or .gguf file)")
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if isinstance(d, dict) and d.get("model_type") == "qwen":
        from qwen2.io.qwen1 import qwen1_config
        config = qwen1_config(d, str(cfg))[0]
        fmt = "HF safetensors (first-generation Qwen)"
    else:
        config = ModelConfig.from_file(cfg)
        fmt = "HF safetensors"
    q = (d.get("quantization_config") or {}) if isinstance(d, dict) else {}
    if q.get("quant_method"):
        gs = q.get("group_size", q.get("q_group_size"))
        fmt = (f"{str(q['quant_method']).upper()} int{q.get('bits', q.get('w_bit'))}"
               + (f", group {gs}" if gs not in (None, -1) else ", per channel")
               + ("" if q.get("sym", True) is not False or q["quant_method"] == "awq" else ", asymmetric"))
    files = sorted(path.glob("*.safetensors"))
    return config, config.torch_dtype or "bfloat16", fmt, files


def _gguf_file_type(field) -> str:
    """general.file_type's name (Q4_K_M, F16, ...), as llama.cpp's LlamaFileType."""
    if field is None:
        return "unknown type"
    try:
        import gguf
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError, ImportError):
        return f"file type {field.contents()}"


def param_count(c) -> int:
    """Qwen2(c).num_parameters(), from the config alone (building even a meta model costs
    seconds: nn.init's first call imports torch._dynamo)."""
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h
    dense = 3 * h * c.intermediate_size
    moe = (c.num_experts * h + c.num_experts * 3 * h * c.moe_intermediate_size
           + 3 * h * c.shared_expert_intermediate_size + h) if c.is_moe else 0
    layers = sum(attn + 2 * h + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_hidden_layers))
    return layers + h + c.vocab_size * h * (1 if c.tie_word_embeddings else 2)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def describe(path: Path, dtype_arg="auto", device="cpu") -> dict:
    import torch

    from qwen2.io.build import parse_dtype
    config, stored, fmt, files = read_config(path)
    if fmt.startswith("GGUF") and dtype_arg in (None, "auto"):
        from qwen2.io.gguf import auto_dtype
        dt = auto_dtype(config, device)
    else:
        dt = parse_dtype(dtype_arg, config)
    n_params = param_count(config)
    embed = config.vocab_size * config.hidden_size
    size = torch.finfo(dt).bits // 8
    kv_per_token = config.kv_bytes_per_token(dt)
    ctx = config.max_position_embeddings
    arch = "Qwen2MoeForCausalLM" if config.is_moe else "Qwen2ForCausalLM"
    info = {
        "model": str(path), "architecture": arch, "model_type": config.model_type, "format": fmt,
        "parameters": n_params, "parameters_without_embeddings": n_params - embed * (1 if config.tie_word_embeddings else 2),
        "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size, "tied_embeddings": config.tie_word_embeddings,
        "context_length": ctx, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "sliding_window": config.sliding_window,
        "checkpoint_dtype": stored, "compute_dtype": str(dt).removeprefix("torch."),
        "weights_bytes": n_params * size, "file_bytes": sum(f.stat().st_size for f in files),
        "kv_cache_bytes_per_token": kv_per_token, "kv_cache_bytes_full_context": kv_per_token * ctx,
    }
    if config.is_moe:
        info.update(experts=config.num_experts, experts_per_token=config.num_experts_per_tok,
                    moe_intermediate_size=config.moe_intermediate_size,
                    shared_expert_intermediate_size=config.shared_expert_intermediate_size)
    return info


def run(args) -> int:
    if args.tensor_parallel_size is not None:
        if args.tensor_parallel_size < 1:
            raise CheckpointError("--tensor-parallel-size must be >= 1")
        return run_tp_plan(args)
    from qwen2.io.hub import resolve
    info = describe(resolve(_common.model_path(args)), args.dtype, args.device)
    if args.json:
        print(json.dumps(info))
        return 0
    heads = f"{info['attention_heads']} heads, {info['kv_heads']} kv heads, head_dim {info['head_dim']}"
    rows = [
        ("model", info["model"]),
        ("architecture", info["architecture"]),
        ("format", info["format"]),
        ("parameters", f"{info['parameters'] / 1e9:.3f} B ({info['parameters']:,}; "
                       f"{info['parameters_without_embeddings']:,} without embeddings)"),
        ("layers", f"{info['layers']} x hidden {info['hidden_size']}, {heads}"),
        ("mlp", f"{info['intermediate_size']}" if "experts" not in info else
         f"{info['experts']} experts (top-{info['experts_per_token']}) x {info['moe_intermediate_size']} "
         f"+ shared {info['shared_expert_intermediate_size']}"),
        ("vocabulary", f"{info['vocab_size']:,} rows{' (tied lm_head)' if info['tied_embeddings'] else ''}"),
        ("context length", f"{info['context_length']:,} tokens" +
         (f" (rope scaling {info['rope_scaling']})" if info["rope_scaling"] else "") +
         (f", sliding window {info['sliding_window']}" if info["sliding_window"] else "")),
        ("dtype", f"{info['checkpoint_dtype']} on disk, runs in {info['compute_dtype']}"),
        ("memory", f"weights {gib(info['weights_bytes'])} in {info['compute_dtype']}"
                   f" (files {gib(info['file_bytes'])}); KV cache {info['kv_cache_bytes_per_token'] // 1024} KiB/token, "
                   f"{gib(info['kv_cache_bytes_full_context'])} at full context"),
    ]
    _common.print_rows(rows)
    return 0
