"""Quantization quality on real weights: perplexity, top-1 agreement and KL against bf16.

    python benchmarks/quality.py [--tokens 4096] [--window 512] [--groups 32,64,128] [--gptq 32] [--llama]
    python benchmarks/quality.py --tokens 2048 --groups 32 --gptq 32 --grids sym,full,asym [--corpus glob,queue]

Model: the demo Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) dequantized to bf16 is the reference;
our int8 (per channel) and int4 (groups 32/64/128) are round-to-nearest requantizations of it,
and with --gptq GROUPS also GPTQ int4 at those group sizes (default calibration: qwen2.quant.gptq's
standard-library text, which shares no module with the corpus below; --calib-samples/--calib-len).
--grids scores each int4 row on the listed grids instead of the method's default (qwen2/quant.py):
sym (absmax), full (llama.cpp Q4_0's full-range scale), asym (zero points).
With --llama, llama.cpp's own Q4_K_M on the same file is scored on the same tokens.
Corpus: Python standard-library source (fixed files, concatenated; it is a code model), scored
in non-overlapping windows, each starting fresh; --corpus scores other modules (held-out text for
comparing settings without tuning them on the test's own slice).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CORPUS_MODULES = ("textwrap", "heapq", "bisect", "fnmatch", "shlex", "colorsys", "string")


GRIDS = {"default": {}, "sym": dict(sym=True, full_range=False), "full": dict(sym=True, full_range=True),
         "asym": dict(sym=False)}


def corpus_ids(tokenizer, n_tokens: int, modules=CORPUS_MODULES) -> list[int]:
    import importlib
    text = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"corpus has only {len(ids)} tokens")
    return ids[:n_tokens]


@torch.inference_mode()
def window_logprobs(model, ids: list[int], window: int):
    """log-softmax over the vocabulary for every position but the last of each window:
    list of ([T-1, V] float32 log-probs, [T-1] next-token targets)."""
    out = []
    for s in range(0, len(ids), window):
        w = torch.tensor([ids[s:s + window]])
        logits = model(w)[0, :-1].float()
        out.append((F.log_softmax(logits, -1), w[0, 1:]))
    return out


def score(lp, ref=None) -> dict:
    nll, n, agree, kl = 0.0, 0, 0, 0.0
    for i, (l, tgt) in enumerate(lp):
        nll -= l.gather(-1, tgt[:, None]).sum().item()
        n += tgt.numel()
        if ref is not None:
            r = ref[i][0]
            agree += (l.argmax(-1) == r.argmax(-1)).sum().item()
            kl += (r.exp() * (r - l)).sum().item()  # KL(ref || this), summed over positions
    res = {"ppl": float(torch.tensor(nll / n).exp()), "tokens": n}
    if ref is not None:
        res.update(top1=agree / n, kl=kl / n)
    return res


def llama_logprobs(path, ids, window, threads=2):
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    out = []
    for s in range(0, len(ids), window):
        w = ids[s:s + window]
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:len(w) - 1], dtype=np.float32))
        out.append((F.log_softmax(logits, -1), torch.tensor(w[1:])))
    return out


def evaluate(tokens=4096, window=512, groups=(32, 64, 128), llama=False, log=print, gptq=(),
             calib_samples=None, calib_len=None, grids=("default",), corpus=CORPUS_MODULES):
    import qwen2
    from qwen2.io.demo import demo_model_path
    from qwen2.quant.gptq import CALIB_LEN, CALIB_MODULES, CALIB_SAMPLES, calibration_ids
    from qwen2.quant.linear import quantize_model
    assert not set(CALIB_MODULES) & set(corpus), "never calibrate on the evaluation text"
    path = demo_model_path()
    if path is None:
        raise SystemExit("the demo model is not installed")
    tok = qwen2.load_tokenizer(str(path))
    ids = corpus_ids(tok, tokens, corpus)
    base = qwen2.load_model(str(path), dtype="bfloat16")
    rows = {}
    t = time.perf_counter()
    ref = window_logprobs(base, ids, window)
    rows["bf16 (reference)"] = score(ref)
    log(f"bf16: {rows['bf16 (reference)']} ({time.perf_counter() - t:.0f} s)")
    def name(g, method, grid):
        return f"int4 group {g}" + (" GPTQ" if method == "gptq" else "") + ("" if grid == "default" else f" {grid}")
    variants = [("int8 per channel", 8, -1, "rtn", "default")]
    variants += [(name(g, "rtn", k), 4, g, "rtn", k) for g in groups for k in grids]
    variants += [(name(g, "gptq", k), 4, g, "gptq", k) for g in gptq for k in grids]
    calib = None
    if gptq:
        calib = calibration_ids(tok, calib_samples or CALIB_SAMPLES, calib_len or CALIB_LEN)
    for row, bits, g, method, grid in variants:
        t = time.perf_counter()
        m = quantize_model(copy.deepcopy(base), bits, g, method=method, calib_ids=calib, **GRIDS[grid])
        seconds = time.perf_counter() - t
        rows[row] = dict(score(window_logprobs(m, ids, window), ref), seconds=seconds)
        log(f"{row}: {rows[row]}")
        del m
    if llama:
        rows["llama.cpp Q4_K_M (same GGUF)"] = score(llama_logprobs(path, ids, window), ref)
        log(f"llama.cpp: {rows['llama.cpp Q4_K_M (same GGUF)']}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama", action="store_true", help="also score llama.cpp on the GGUF itself")
    ap.add_argument("--groups", default="32,64,128", help="int4 group sizes to score (round-to-nearest)")
    ap.add_argument("--gptq", default="", metavar="GROUPS", help="int4 group sizes to score with GPTQ, e.g. 32")
    ap.add_argument("--calib-samples", type=int, default=None, help="GPTQ calibration windows (qwen2.quant.gptq default)")
    ap.add_argument("--calib-len", type=int, default=None, help="GPTQ tokens per calibration window")
    ap.add_argument("--grids", default="default", help=f"int4 grids to score, from {', '.join(GRIDS)}")
    ap.add_argument("--corpus", default=",".join(CORPUS_MODULES), help="standard-library modules to score")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    groups = tuple(int(g) for g in args.groups.split(",") if g)
    gptq = tuple(int(g) for g in args.gptq.split(",") if g)
    rows = evaluate(args.tokens, args.window, groups, llama=args.llama, log=lambda s: print(s, file=sys.stderr),
                    gptq=gptq, calib_samples=args.calib_samples, calib_len=args.calib_len,
                    grids=tuple(args.grids.split(",")), corpus=tuple(args.corpus.split(",")))
    ref = rows["bf16 (reference)"]["ppl"]
    print(f"\nQwen2.5-Coder-0.5B-Instruct (demo GGUF), {rows['bf16 (reference)']['tokens']} tokens of Python "
          f"stdlib source ({args.corpus.replace(',', ', ')}), windows of {args.window}\n")
    print("| weights | perplexity | vs bf16 | top-1 agreement | KL vs bf16 (nats/token) | quantize time |\n"
          "|---|---|---|---|---|---|")
    for k, r in rows.items():
        extra = f"{100 * r['top1']:.1f}% | {r['kl']:.4f}" if "top1" in r else "- | -"
        secs = f"{r['seconds']:.0f} s" if "seconds" in r else "-"
        print(f"| {k} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref - 1):+.2f}% | {extra} | {secs} |")


if __name__ == "__main__":
    main()
