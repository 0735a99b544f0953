"""`qwen2 export --to gguf --outtype TYPE MODEL OUT.gguf`: any checkpoint we load (HF directory,
GGUF, first-generation Qwen, GPTQ, AWQ, hub id) as a GGUF file for llama.cpp, Ollama and LM Studio."""
from __future__ import annotations

from qwen2.errors import Qwen2Error

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # qwen2.io.gguf_export.OUTTYPES


def register(subparsers):
    p = subparsers.add_parser(
        "export", help="write a checkpoint as GGUF (llama.cpp, Ollama, LM Studio)",
        description="Write a model in llama.cpp's GGUF layout (architecture qwen2 / qwen2moe, tokenizer and "
                    "chat template in the metadata). f32/f16/bf16/q8_0 as llama.cpp's convert_hf_to_gguf.py "
                    "writes them; q4_0 and q4_k_m as llama-quantize's mixes (head at Q6_K or Q8_0).")
    p.add_argument("model", help="checkpoint dir, .gguf file or hub id")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--to", default="gguf", help="output format (gguf)")
    p.add_argument("--outtype", default="f16", help=f"tensor type: {', '.join(OUTTYPES)} (default f16)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (qwen2 finetune, PEFT) to merge first")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.to != "gguf":
        raise Qwen2Error(f"unknown export format {args.to!r}; only gguf is supported")
    outtype = args.outtype.lower()
    if outtype not in OUTTYPES:
        raise Qwen2Error(f"unknown --outtype {args.outtype!r}; use one of {', '.join(OUTTYPES)}")
    from qwen2.io.gguf_export import export_gguf
    out = export_gguf(args.model, args.out, outtype, force=args.force, adapter=args.adapter)
    print(f"wrote {out} ({outtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0
