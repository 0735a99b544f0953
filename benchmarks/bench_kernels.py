"""Quantized matrix-vector kernels (qwen2.kernels) vs the alternatives, in GB/s of weights streamed.

    python benchmarks/bench_kernels.py                  # Qwen2-0.5B shapes, 2 threads
    python benchmarks/bench_kernels.py --json out.json --rounds 7 --threads 2
    python benchmarks/bench_kernels.py --kinds bf16 int4 --no-compiled

One activation row (decode) against each weight shape of a Qwen2-0.5B layer and its lm_head. Each
method cycles through several different weight matrices of the shape (320 MB in all: hundreds of
the small ones, 3 lm_heads), so that weights come from memory and not from the 32 MB L3. Methods
are measured in interleaved rounds (one pass over the matrices each per round), so that
load on a shared machine hits all alike; every call is timed alone and the table gives the
fastest (cold weights all the same: each pass visits every matrix once). GB/s = packed weight bytes (int8: N*K, int4: N*K/2;
scales and zeros excluded, listed separately) / seconds per call.

  int8:  ours qwen2::int8_gemv | aten._weight_int8pack_mm (the eager path today) |
         torch.compile'd (x.float() * w.float()).sum(-1) * s (the compiled path today)
  int4:  ours qwen2::int4_gemv (group 32 sym, and group 128 asym) |
         aten._weight_int4pack_mm_for_cpu on pre-packed tiles (eager today) |
         torch.compile'd QuantLinear._gemv formula (compiled today)
  bf16:  ours qwen2::bf16_gemv (bf16 x, bf16 weight [N, K] as nn.Linear holds it) |
         F.linear in bf16 (the eager path) | torch.compile'd (x.float() * w.float()).sum(-1)
         (qwen2/compiled.py GemvLinear, the compiled path today); GB/s = N*K*2 bytes
  stream: .sum() of 64 MB float32 tensors (5 of them), timed the same way in the same rounds: the
         machine's read bandwidth under the same load, which the percentages refer to.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen2 import kernels  # noqa: E402
from qwen2.quant.linear import pack_int4_halves  # noqa: E402

OURS = None  # the op namespace measured (torch.ops.qwen2 for the native build)

SHAPES = {  # Qwen2-0.5B: N x K
    "qkv 1152x896": (1152, 896),
    "o 896x896": (896, 896),
    "gate_up 9728x896": (9728, 896),
    "down 896x4864": (896, 4864),
    "lm_head 151936x896": (151936, 896),
}


def n_copies(nbytes: int) -> int:
    """At least 320 MB in all (10x the L3): hundreds of the small matrices, 3 lm_heads."""
    return max(3, min(2000, math.ceil(320e6 / nbytes)))


def one_pass(fn, args_list, times):
    """One call on each matrix, each timed alone: on a shared machine a call that lost its core
    (or its second thread) to another process is an outlier, so the table reports the fastest
    call (always on a matrix not touched since the previous pass: cold weights) and the median."""
    for a in args_list:
        t = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t)


def compiled_int8():
    @torch.compile(dynamic=False, fullgraph=True)
    def f(x, w, s):
        return (x.float() * w.float()).sum(-1) * s.float()
    return f


def compiled_int4(group: int, asym: bool):
    @torch.compile(dynamic=False, fullgraph=True)
    def f(x, qw, s, z):  # QuantLinear._gemv
        n = qw.shape[0]
        xf = x.float().reshape(1, -1)
        g = xf.shape[1] // group
        w = qw.view(n, g, group // 2).to(torch.int32)
        xs = xf.view(1, g, 2, group // 2)
        zz = 8.0 if z is None else z.float()[..., None]
        d = (((w & 15).float() - zz) * xs[:, :, 0] + ((w >> 4).float() - zz) * xs[:, :, 1]) * s.float()[..., None]
        return d.sum((-1, -2))
    return f


def compiled_bf16():
    @torch.compile(dynamic=False, fullgraph=True)
    def f(x, w):  # qwen2/compiled.py GemvLinear
        return (x.float() * w.float()).sum(-1)
    return f


def bench_shape(name, N, K, rounds, with_compiled, results, kinds=("int8", "int4", "bf16")):
    x = torch.randn(1, K).to(torch.bfloat16)
    rows = {}
    methods, bytes_of = {}, {}
    # ---------------- bf16
    if "bf16" in kinds:
        cb = n_copies(N * K * 2)
        wb = [(torch.randn(N, K) * 0.02).to(torch.bfloat16) for _ in range(cb)]
        mb = {"ours bf16": (OURS.bf16_gemv, [(x, w) for w in wb]),
              "F.linear bf16": (torch.nn.functional.linear, [(x, w) for w in wb])}
        if with_compiled:
            mb["compiled multiply-sum bf16"] = (compiled_bf16(), [(x, w) for w in wb])
        methods |= mb
        bytes_of |= {k: N * K * 2 for k in mb}
    if "int8" in kinds:
        bench_int8(N, K, x, with_compiled, methods, bytes_of)
    if "int4" in kinds:
        bench_int4(N, K, x, with_compiled, methods, bytes_of)
    big = [torch.ones(16 * 1024 * 1024, dtype=torch.float32) for _ in range(5)]
    methods["stream .sum()"] = (torch.sum, [(t,) for t in big])
    bytes_of["stream .sum()"] = big[0].numel() * 4
    times = {k: [] for k in methods}
    for fn, args in methods.values():  # warm up (compiles)
        fn(*args[0])
    for _ in range(rounds):
        for k, (fn, args) in methods.items():
            one_pass(fn, args, times[k])
    for k in methods:
        t, med = min(times[k]), statistics.median(times[k])
        rows[k] = {"us": t * 1e6, "GBps": bytes_of[k] / t / 1e9, "median_us": med * 1e6,
                   "median_GBps": bytes_of[k] / med / 1e9, "copies": len(methods[k][1])}
    results[name] = rows
    return rows


def bench_int8(N, K, x, with_compiled, methods, bytes_of):
    c8 = n_copies(N * K)
    w8 = [torch.randint(-128, 128, (N, K), dtype=torch.int8) for _ in range(c8)]
    s8 = [(torch.rand(N) * 0.01).to(torch.bfloat16) for _ in range(c8)]
    m8 = {"ours int8": (OURS.int8_gemv, [(x, w, s) for w, s in zip(w8, s8)]),
          "aten _weight_int8pack_mm": (torch.ops.aten._weight_int8pack_mm, [(x, w, s) for w, s in zip(w8, s8)])}
    if with_compiled:
        m8["compiled multiply-sum int8"] = (compiled_int8(), [(x, w, s) for w, s in zip(w8, s8)])
    methods |= m8
    bytes_of |= {k: N * K for k in m8}


def bench_int4(N, K, x, with_compiled, methods, bytes_of):
    c4 = n_copies(N * K // 2)
    q4 = [torch.randint(0, 16, (N, K), dtype=torch.uint8) for _ in range(c4)]
    p32 = [pack_int4_halves(q, 32) for q in q4]
    s32 = [(torch.rand(N, K // 32) * 0.01).to(torch.bfloat16) for _ in range(c4)]
    p128 = [pack_int4_halves(q, 128) for q in q4]
    s128 = [(torch.rand(N, K // 128) * 0.01).to(torch.bfloat16) for _ in range(c4)] if K % 128 == 0 else None
    z128 = [torch.randint(1, 16, (N, K // 128), dtype=torch.uint8) for _ in range(c4)] if s128 else None
    m4 = {"ours int4 g32 sym": (OURS.int4_gemv, [(x, p, s, None, 32) for p, s in zip(p32, s32)])}
    if s128:
        m4["ours int4 g128 asym"] = (OURS.int4_gemv, [(x, p, s, z, 128) for p, s, z in zip(p128, s128, z128)])
    if N % 16 == 0:
        tiles = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1) for q in q4]
        pairs = [torch.stack([s.float().T, torch.zeros_like(s.float().T)], -1).to(torch.bfloat16).contiguous()
                 for s in s32]
        m4["aten _weight_int4pack_mm g32"] = (torch.ops.aten._weight_int4pack_mm_for_cpu,
                                              [(x, t, 32, p) for t, p in zip(tiles, pairs)])
    if with_compiled:
        m4["compiled QuantLinear._gemv int4 g32"] = (compiled_int4(32, False), [(x, p, s, None) for p, s in zip(p32, s32)])
    methods |= m4
    bytes_of |= {k: N * K // 2 for k in m4}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"subset of {list(SHAPES)}")
    ap.add_argument("--kinds", nargs="*", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile'd baselines")
    ap.add_argument("--variant", default="native", choices=list(kernels.VARIANTS),
                    help="which build of ours: native, or the AVX2 / scalar paths on this CPU")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not kernels.load(a.variant):
        sys.exit(f"qwen2 kernels unavailable: {kernels._state[a.variant]}")
    global OURS
    OURS = kernels.ops(a.variant)
    torch._dynamo.config.cache_size_limit = 64
    print(f"kernels: {OURS.isa()}, threads: {torch.get_num_threads()}, torch {torch.__version__}", flush=True)
    results = {}
    for name in a.shapes:
        N, K = SHAPES[name]
        rows = bench_shape(name, N, K, a.rounds, not a.no_compiled, results, a.kinds)
        print(f"\n{name}")
        for k, r in rows.items():
            print(f"  {k:40s} best {r['us']:9.1f} us {r['GBps']:6.1f} GB/s | median {r['median_us']:9.1f} us "
                  f"{r['median_GBps']:6.1f} GB/s  ({r['copies']} matrices)", flush=True)
    methods = list(dict.fromkeys(k for rows in results.values() for k in rows))
    print("\nGB/s of packed weights (fastest call), % of the stream .sum() measured in the same rounds")
    print("\n| method | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for m in methods:
        cells = [f"{results[s][m]['GBps']:.1f} ({100 * results[s][m]['GBps'] / results[s]['stream .sum()']['GBps']:.0f}%)"
                 if m in results[s] else "-" for s in results]
        print(f"| {m} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "isa": OURS.isa(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
