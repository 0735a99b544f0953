"""`qwen2 needle`: the needle-in-a-haystack long-context test (length x depth table + heat map)."""
from __future__ import annotations

import json
from pathlib import Path

from qwen2.cli._common import add_model_args, model_path


def register(subparsers):
    p = subparsers.add_parser(
        "needle", help="needle-in-a-haystack long-context test",
        description="Insert a fact at several depths of a long filler text, ask for it, and score exact "
                    "recall; prints a length x depth table and writes a heat-map PNG.")
    add_model_args(p)
    p.add_argument("--lengths", default="4k,8k,16k,32k", help="prompt lengths in tokens (k = 1024)")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths, percent of the filler before it")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="prefill chunk in tokens, bounds attention memory (default: 4096 at 32K, 1024 at 128K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random 7-digit answers")
    p.add_argument("--raw", action="store_true", help="no chat template (base models)")
    p.add_argument("--yarn", type=float, metavar="FACTOR",
                   help="enable static YaRN with this factor over the config's max_position_embeddings")
    p.add_argument("--dca", metavar="CHUNK[,LOCAL]",
                   help="enable dual chunk attention (chunk size, local window; default local 1/8 of chunk)")
    p.add_argument("--out", default="needle.png", help="heat-map PNG path")
    p.add_argument("--json", help="also write every case (prompt length, depth, answer, reply, score) here")
    p.set_defaults(func=run)


def run(args) -> int:
    from qwen2.eval import needle
    from qwen2.io.load import load_model
    from qwen2.errors import Qwen2Error
    from qwen2.model.longctx import apply_config, enable_dual_chunk_attention, enable_yarn, kv_cache_bytes
    from qwen2.io.load import load_tokenizer

    lengths, depths = needle.parse_lengths(args.lengths), needle.parse_depths(args.depths)
    path = model_path(args)
    model = apply_config(load_model(path, dtype=args.dtype, device=args.device))
    tokenizer = load_tokenizer(path)
    if args.yarn:
        enable_yarn(model, args.yarn)
    if args.dca:
        parts = [int(x) for x in args.dca.split(",")]
        if len(parts) > 2:
            raise Qwen2Error("--dca takes CHUNK or CHUNK,LOCAL")
        enable_dual_chunk_attention(model, parts[0], parts[1] if len(parts) > 1 else parts[0] // 8)
    longest = max(lengths) + args.max_new_tokens
    c = model.config
    if longest > c.max_position_embeddings and c.rope_scaling is None and not c.dual_chunk_attention_config \
            and not getattr(model, "qwen1", None):
        needle.log_stderr(f"note: {longest} tokens exceed max_position_embeddings {c.max_position_embeddings} "
                          "and no YaRN / DCA is enabled (--yarn, --dca)")
    needle.log_stderr(f"KV cache for {longest} tokens: "
                      f"{kv_cache_bytes(c, longest, model.dtype) / 2 ** 20:.0f} MiB ({str(model.dtype)[6:]})")
    cases = needle.run(model, tokenizer, lengths, depths, max_new_tokens=args.max_new_tokens,
                       chunk_size=args.chunk_size or None, chat=not args.raw, seed=args.seed, log=needle.log_stderr)
    print(needle.table(cases))
    png = needle.heatmap(cases, args.out, title=f"Needle in a haystack: {Path(str(path)).name}")
    print(f"heat map: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(needle.to_json(cases), ensure_ascii=False, indent=2))
    return 0
