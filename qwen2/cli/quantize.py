"""`qwen2 quantize`: weight-only int8 (per channel) or int4 (grouped) quantization, round-to-nearest
(--method rtn, the default) or GPTQ (--method gptq: error-compensated on calibration text, see
qwen2/gptq.py), saved in the GPTQ layout (see qwen2/quant.py and docs/performance.md). The result
loads like any checkpoint: `qwen2.load_model(OUT_DIR)`, `--model OUT_DIR`, with the input's
tokenizer (a GGUF input's is written out as tokenizer.json / tokenizer_config.json with its chat
template)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from qwen2.errors import Qwen2Error

# Files besides the weights that make a checkpoint directory usable (tokenizer, generation).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "generation_config.json", "qwen.tiktoken", "chat_template.jinja")


def register(sub):
    p = sub.add_parser("quantize", help="int8/int4 weight-only quantization (GPTQ layout)", description=__doc__)
    p.add_argument("input", help="checkpoint directory, .gguf file or hub id")
    p.add_argument("output", help="output directory")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True)
    p.add_argument("--group-size", type=int, default=32,
                   help="int4 group size: 32 (default, best quality), 64, 128 or 256 (int8 is per channel)")
    p.add_argument("--no-lm-head", action="store_true",
                   help="keep the output projection in the float dtype (always so for --bits 4; loading makes it int8)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--asym", action="store_true",
                      help="int4: asymmetric groups with zero points (GPTQ sym=false); the default with --method gptq")
    grid.add_argument("--sym", action="store_true",
                      help="int4: symmetric groups; the default with --method rtn (asymmetric lowers the KL to the "
                           "float model there, but raised perplexity on the demo model)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: round-to-nearest (default, seconds); gptq: GPTQ error compensation on calibration "
                        "text (minutes; better perplexity at int4)")
    p.add_argument("--calib", metavar="FILE",
                   help="gptq: calibration text file (default: Python standard-library source, see qwen2/gptq.py)")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help="gptq: number of calibration windows (default 16)")
    p.add_argument("--calib-len", type=int, default=None, metavar="L",
                   help="gptq: tokens per calibration window (default 512)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the unquantized tensors (embedding, norms)")
    p.set_defaults(func=run)


def run(args) -> int:
    from qwen2.io.hub import resolve
    from qwen2.io.load import load_model
    from qwen2.quant.linear import INT4_GROUPS
    from qwen2.io.gptq import save_quantized
    if args.bits == 4 and args.group_size not in INT4_GROUPS:
        raise Qwen2Error(f"--group-size must be one of {', '.join(map(str, INT4_GROUPS))} for int4")
    gptq = args.method == "gptq"
    sym = args.sym or (not args.asym and not gptq)  # per method, what measured best (docs/performance.md)
    if not gptq and (args.calib is not None or args.calib_samples is not None or args.calib_len is not None):
        raise Qwen2Error("--calib, --calib-samples and --calib-len need --method gptq")
    src = resolve(args.input)
    out = Path(args.output)
    if out.resolve() == src.resolve():
        raise Qwen2Error("output directory must differ from the input")
    t = time.perf_counter()
    calib = None
    if gptq:
        calib = _calibration(args, src)
    model = load_model(src, dtype=args.dtype)
    if getattr(model, "quant", None):
        raise Qwen2Error(f"{args.input} is already quantized")
    lm_head = False if args.no_lm_head else None
    if gptq:
        from qwen2.quant.gptq import gptq_model
        print(f"GPTQ on {calib.shape[0]} x {calib.shape[1]} calibration tokens", file=sys.stderr)
        head = args.bits == 8 and not args.no_lm_head  # int8 files carry an int8 head, int4 ones a float head
        gptq_model(model, args.bits, args.group_size, calib, lm_head=head, sym=sym, progress=True)
    save_quantized(model, out, args.bits, args.group_size, lm_head=lm_head, sym=sym)
    copied = []
    if src.suffix == ".gguf" or (src.is_dir() and not (src / "config.json").exists() and any(src.glob("*.gguf"))):
        from qwen2.io.gguf import find_gguf, save_gguf_tokenizer
        copied = [f.name for f in save_gguf_tokenizer(find_gguf(src), out)]  # the file's tokenizer and chat template
    elif src.is_dir():
        for name in _SIDE_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
                copied.append(name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    kind = "int8 per channel" if args.bits == 8 else \
        f"int4 group {args.group_size} {'symmetric' if sym else 'asymmetric'}"
    kind += ", GPTQ" if gptq else ", round-to-nearest"
    print(f"wrote {out} ({kind}, {size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not copied:
        print("note: no tokenizer files were copied (input has none); pass the tokenizer separately", file=sys.stderr)
    return 0


def _calibration(args, src):
    """Token ids [n, L] for GPTQ: the --calib file or the default text, with the model's tokenizer."""
    from qwen2.quant.gptq import CALIB_LEN, CALIB_SAMPLES, calibration_ids
    from qwen2.io.load import load_tokenizer
    n = CALIB_SAMPLES if args.calib_samples is None else args.calib_samples
    length = CALIB_LEN if args.calib_len is None else args.calib_len
    text = None
    if args.calib:
        try:
            text = Path(args.calib).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Qwen2Error(f"--calib {args.calib}: cannot read it as UTF-8 text ({e})") from None
    try:
        tok = load_tokenizer(src)
    except Qwen2Error as e:
        raise Qwen2Error(f"GPTQ calibration needs the model's tokenizer, which {args.input} lacks ({e})") from None
    ids = calibration_ids(tok, n, length, text)
    if ids.shape[0] < n:
        print(f"note: the calibration text holds only {ids.shape[0]} windows of {length} tokens (asked {n})",
              file=sys.stderr)
    return ids
