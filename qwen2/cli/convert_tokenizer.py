"""`qwen2 convert-tokenizer qwen.tiktoken OUT_DIR`: first-generation vocabulary -> the
Qwen1.5/Qwen2 files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)."""
from __future__ import annotations

from pathlib import Path

from qwen2.errors import Qwen2Error


def register(subparsers):
    p = subparsers.add_parser(
        "convert-tokenizer", help="convert qwen.tiktoken to vocab.json/merges.txt/tokenizer.json",
        description="Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json for a "
                    "qwen.tiktoken vocabulary; transformers loads them and gives the same ids.")
    p.add_argument("tiktoken", help="path to qwen.tiktoken (or a directory holding it)")
    p.add_argument("out_dir", help="output directory (created if missing)")
    p.add_argument("--eos-token", default="<|endoftext|>",
                   help="eos token for tokenizer_config.json (chat checkpoints use <|im_end|>)")
    p.add_argument("--all-specials", action="store_true",
                   help="keep all 208 first-generation specials (<|extra_0|>..); default: the three "
                        "Qwen2 has (<|endoftext|>, <|im_start|>, <|im_end|>)")
    p.set_defaults(func=run)


def run(args) -> int:
    src = Path(args.tiktoken)
    if src.is_dir():
        src = src / "qwen.tiktoken"
    if not src.is_file():
        raise Qwen2Error(f"{src}: no such file")
    files = convert(src, Path(args.out_dir), eos_token=args.eos_token, all_specials=args.all_specials)
    for f in files:
        print(f)
    return 0


def convert(src: Path, out: Path, eos_token: str = "<|endoftext|>", all_specials: bool = False) -> list[Path]:
    from qwen2.text.chat_template import DEFAULT_CHAT_TEMPLATE
    from qwen2.text.tokenizer import QWEN1_SPECIALS, load_tiktoken_ranks, tiktoken_merges, token_str, write_hf_tokenizer

    ranks = load_tiktoken_ranks(src)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise Qwen2Error(f"{src}: ranks are not 0..{len(ranks) - 1}")
    vocab = {token_str(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [f"{token_str(a)} {token_str(b)}" for a, b in tiktoken_merges(ranks)]
    specials = QWEN1_SPECIALS if all_specials else QWEN1_SPECIALS[:3]
    if eos_token not in specials:
        raise Qwen2Error(f"--eos-token {eos_token!r} is not one of the special tokens")
    added = [{"id": len(ranks) + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, s in enumerate(specials)]
    return write_hf_tokenizer(out, vocab, merges, added, {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": DEFAULT_CHAT_TEMPLATE, "eos_token": eos_token, "model_max_length": 32768,
        "pad_token": "<|endoftext|>"})
