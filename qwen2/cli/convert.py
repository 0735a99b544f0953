"""`qwen2 convert SRC OUT`: a first-generation Qwen checkpoint (`transformer.h.*`, fused c_attn)
-> the Qwen2 layout (config.json + safetensors that Qwen2 loaders, transformers included, read)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen2.errors import Qwen2Error

# Files that are not weights or code: they travel with the converted checkpoint.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".py", ".pth")


def register(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a first-generation Qwen checkpoint to the Qwen2 layout",
        description="Read a first-generation Qwen checkpoint (model_type 'qwen', e.g. Qwen-1.8B-Chat) and "
                    "write it in the Qwen2 layout. Its inference-time dynamic NTK / logn attention have no "
                    "Qwen2 config equivalent: the converted model is identical within seq_length.")
    p.add_argument("src", help="first-generation checkpoint directory (or hub id)")
    p.add_argument("out", help="output directory (created if missing)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype), bfloat16 or float32")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    p.set_defaults(func=run)


def convert(src, out, dtype="auto", max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
    from qwen2.io.hub import resolve
    from qwen2.io.save import save_model
    from qwen2.io.qwen1 import load_qwen1
    src, out = resolve(src), Path(out)
    cfg = src / "config.json"
    if not cfg.exists():
        raise Qwen2Error(f"{src}: no config.json")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen2Error(f"{cfg}: not valid JSON ({e})") from None
    if model_type != "qwen":
        raise Qwen2Error(f"{cfg}: model_type {model_type!r}; `qwen2 convert` reads first-generation Qwen "
                         "(model_type 'qwen') checkpoints")
    if out.resolve() == src.resolve():
        raise Qwen2Error(f"{out}: the output directory must differ from the source")
    model = load_qwen1(src, dtype=dtype, long_context=False)
    save_model(model, out, max_shard_bytes=max_shard_bytes)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_SKIP_SUFFIXES) \
                and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    return out


def run(args) -> int:
    out = convert(args.src, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_size * 1024 ** 3))
    print(f"wrote {out} (Qwen2 layout)")
    return 0
