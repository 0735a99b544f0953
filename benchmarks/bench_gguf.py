"""qwen2 vs llama.cpp (llama-cpp-python) on the same GGUF file, in one run, batch 1.

    flock /tmp/qwen2-bench.lock python benchmarks/bench_gguf.py            # the demo model
    flock /tmp/qwen2-bench.lock python benchmarks/bench_gguf.py -m F.gguf --rounds 3 --json out.json

Each engine runs in a process of its own (so that each one's peak RSS is its own), loaded once;
the rounds alternate between them (qwen2, llama.cpp, qwen2, ...) so that load from other
processes on a shared machine hits both alike, and each keeps its best round. qwen2 runs as
`qwen2 generate` does by default (qwen2.load: the file's own block types on qwen2's kernels);
llama.cpp with its defaults (n_batch 512, all cores). Prefill: `--prefill` tokens in one call;
decode: `--tokens` greedy tokens one at a time after a `--prompt`-token prompt. Peak RSS while
generating (VmHWM after a reset) is compared with the file size plus the KV cache.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker_qwen2(path: str, threads: int):
    import torch

    import qwen2
    from qwen2.cli.bench import current_rss, peak_rss_reset, time_generation
    from qwen2.engine.paged import KVPool
    torch.set_num_threads(threads)
    t = time.perf_counter()
    llm = qwen2.load(path)
    load_s = time.perf_counter() - t
    model = llm.model
    yield {"load_s": load_s, "rss_after_load": current_rss(), "step_bytes": step_bytes(model)}
    while True:
        cmd = yield None
        prompt, tokens, prefill = cmd
        peak_rss_reset()
        r = time_generation(model, prompt, tokens, prefill)
        r["kv_cache_bytes"] = KVPool.bytes_for(model.config, [prompt + tokens], model.dtype)
        yield r


def step_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding table
    (gathered row by row), unless it is also the head."""
    from qwen2.quant.blocks import BlockEmbedding
    emb = model.model.embed_tokens
    table = emb.table if isinstance(emb, BlockEmbedding) else emb
    skip = set() if table is model.lm_head else {id(t) for t in list(table.parameters()) + list(table.buffers())}
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def file_step_bytes(path: str) -> int:
    """The same for llama.cpp: the file's tensors but token_embd (unless it is the head too)."""
    from qwen2.io.gguf import open_gguf
    reader, _ = open_gguf(path)
    names = {t.name: int(t.n_bytes) for t in reader.tensors}
    return sum(v for k, v in names.items() if k != "token_embd.weight" or "output.weight" not in names)


def stream_gbs() -> float:
    """The machine's streaming read bandwidth now (a sum over 512 MiB, best of 3): the roofline."""
    import torch
    a = torch.ones(128 * 2**20, dtype=torch.float32)  # (an int32 sum widens to int64: not a stream)
    best = 1e9
    for _ in range(4):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def worker_llama(path: str, threads: int):
    import numpy as np
    from llama_cpp import Llama

    from qwen2.cli.bench import current_rss, peak_rss, peak_rss_reset
    t = time.perf_counter()
    llm = Llama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    vocab = llm.n_vocab()
    yield {"load_s": load_s, "rss_after_load": current_rss()}
    rng = np.random.default_rng(0)
    while True:
        cmd = yield None
        prompt, tokens, prefill = cmd
        res = {}
        if prefill:
            ids = rng.integers(0, vocab, prefill).tolist()
            llm.reset(); llm.eval(ids[:16])  # warm-up
            llm.reset()
            t = time.perf_counter(); llm.eval(ids); res["prefill_s"] = time.perf_counter() - t
            res["prefill_tok_s"] = prefill / res["prefill_s"]
        ids = rng.integers(0, vocab, prompt).tolist()
        llm.reset(); llm.eval(ids)
        peak_rss_reset()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(tokens - 1):  # the first token comes from the prompt's logits, as in qwen2's count
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        res["decode_s"] = time.perf_counter() - t
        res["decode_tok_s"] = (tokens - 1) / res["decode_s"]
        res["peak_rss_gen"] = peak_rss()
        yield res


def serve(engine: str, path: str, threads: int):
    """The worker side: one JSON line per command on stdin, one per answer on stdout."""
    gen = (worker_qwen2 if engine == "qwen2" else worker_llama)(path, threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the answer channel
    print(json.dumps(next(gen)), file=out, flush=True)
    next(gen)
    for line in sys.stdin:
        r = gen.send(json.loads(line))
        print(json.dumps(r), file=out, flush=True)
        next(gen)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "-m", default=None, help="GGUF file (default: the demo model)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engines", default="qwen2,llama.cpp")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from qwen2.io.demo import demo_model_path
        args.model = str(demo_model_path())
    if args.serve:
        return serve(args.serve, args.model, args.threads)
    engines = args.engines.split(",")
    procs = {}
    for e in engines:  # loaded one after the other: the load times do not overlap
        # qwen2 as its commands run it (qwen2/__init__: passive OpenMP waits); llama.cpp as it comes
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")) if e == "qwen2" else None
        p = subprocess.Popen([sys.executable, __file__, "--serve", e, "-m", args.model, "--threads", str(args.threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        procs[e] = (p, json.loads(p.stdout.readline()))
        print(f"{e}: loaded in {procs[e][1]['load_s']:.1f} s", file=sys.stderr)
    rounds = {e: [] for e in engines}
    streams = []
    for r in range(args.rounds):
        streams.append(stream_gbs())
        for e in engines:
            p = procs[e][0]
            p.stdin.write(json.dumps([args.prompt, args.tokens, args.prefill]) + "\n")
            p.stdin.flush()
            res = json.loads(p.stdout.readline())
            rounds[e].append(res)
            print(f"round {r + 1} {e}: prefill {res.get('prefill_tok_s', 0):.1f} tok/s, "
                  f"decode {res['decode_tok_s']:.1f} tok/s, peak RSS {res['peak_rss_gen'] / 2**20:.0f} MiB",
                  file=sys.stderr)
    for p, _ in procs.values():
        p.stdin.close()
        p.wait()
    size = os.path.getsize(args.model)
    best = {e: {"decode_tok_s": max(x["decode_tok_s"] for x in rs),
                "prefill_tok_s": max(x.get("prefill_tok_s", 0) for x in rs),
                "peak_rss_gen": max(x["peak_rss_gen"] for x in rs),
                "load_s": procs[e][1]["load_s"], "rounds": rs} for e, rs in rounds.items()}
    print(f"\n{os.path.basename(args.model)} ({size / 2**20:.0f} MiB), {args.threads} threads, best of {args.rounds} rounds")
    print(f"{'engine':<10} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MiB':>13}")
    for e, b in best.items():
        print(f"{e:<10} {b['load_s']:>7.1f} {b['prefill_tok_s']:>14.1f} {b['decode_tok_s']:>13.1f} "
              f"{b['peak_rss_gen'] / 2**20:>13.0f}")
    gbs = max(streams)
    print(f"stream bandwidth {gbs:.1f} GB/s (best of rounds: {', '.join(f'{x:.1f}' for x in streams)}); "
          "decode roofline = bandwidth / bytes read per step:")
    for e, b in best.items():
        nb = procs[e][1].get("step_bytes") or file_step_bytes(args.model)
        b["step_bytes"], b["roofline_tok_s"] = nb, gbs * 1e9 / nb
        print(f"  {e:<10} {nb / 2**20:7.0f} MiB/step  roofline {b['roofline_tok_s']:6.1f} tok/s  "
              f"reached {b['decode_tok_s'] / b['roofline_tok_s']:.0%}")
    if "qwen2" in best and "llama.cpp" in best:
        q, l = best["qwen2"], best["llama.cpp"]
        kv = q["rounds"][0].get("kv_cache_bytes", 0)
        print(f"qwen2 / llama.cpp: decode {q['decode_tok_s'] / l['decode_tok_s']:.2f}x, "
              f"prefill {q['prefill_tok_s'] / max(l['prefill_tok_s'], 1e-9):.2f}x; "
              f"qwen2 peak RSS = {q['peak_rss_gen'] / (size + kv):.2f} x (file + KV cache)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "file_bytes": size, "threads": args.threads, "stream_gbs": streams, **best},
                      f, indent=2)


if __name__ == "__main__":
    main()
