"""`qwen2 bench`: load time, prefill and decode speed, peak RSS and the bandwidth roofline.

With --preset it builds random weights of a released size (no download), so the numbers measure
the engine, not a checkpoint. Decode is batch 1, greedy, through the same engine and speed path
as `qwen2 chat` (--mode auto, the default): the loop a chat user waits on.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from qwen2.cli._common import print_rows
from qwen2.engine.generate import generate
from qwen2.engine.paged import KVPool
from qwen2.engine.runner import MODES
from qwen2.engine.runner import prepare as prepare_runner
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error


def register(sub):
    p = sub.add_parser("bench", help="measure load time, prefill/decode tok/s, peak RSS, roofline",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint dir, .gguf file or hub id (default: the demo model when installed, "
                        "else --preset Qwen2-0.5B)")
    p.add_argument("--preset", default=None, help="random weights of a released size, e.g. Qwen2-0.5B")
    p.add_argument("--dtype", default="auto",
                   help="auto (the checkpoint's; bfloat16 for --preset), bfloat16 or float32 (compute dtype)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="quantize weights at load (int8/int4)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128)")
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="speed passes: auto (the fastest path for the machine, as every command uses), "
                        "compiled (the torch.compile'd decode step) or eager (none)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--tokens", type=int, default=128, help="tokens to decode")
    p.add_argument("--prefill", type=int, default=512, help="tokens for the prefill measurement (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------ measurement
def peak_rss_reset():
    """Reset the kernel's peak-RSS counter (VmHWM), so a phase's peak can be read on its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size now, in bytes (Linux; 0 elsewhere)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss() -> int:
    """Peak resident set size in bytes since the last reset (Linux), else since process start."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Streaming read bandwidth in bytes/s: the best of a few sums over a buffer much larger than
    the caches (the same kind of pass a decode step makes over the weights)."""
    x = torch.ones(mbytes * 2 ** 20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding
    table's (one row is gathered), counting a tied lm_head once."""
    def tensors(m):
        return [t for t in list(m.parameters()) + list(m.buffers()) if t is not None]
    head = {id(t) for t in tensors(model.lm_head)}
    emb_only = {id(t) for t in tensors(model.model.embed_tokens)} - head
    seen, n = set(), 0
    for t in tensors(model):
        if id(t) in seen or id(t) in emb_only:
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
    return n


def model_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def random_model(preset_name: str, dtype: torch.dtype, seed: int = 0, **overrides):
    """A released size with random weights (std 0.02, norms near 1), built without a float32 copy."""
    from qwen2.model.config import preset
    from qwen2.model.decoder import Qwen2
    config = preset(preset_name, **overrides)
    with torch.device("meta"):
        model = Qwen2(config)
    model = model.to_empty(device="cpu").to(dtype)
    # Tiles of one random block: fast to build, and speed does not depend on the values.
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 20, generator=g) * 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                flat = p.view(-1)
                for i in range(0, flat.numel(), block.numel()):
                    flat[i:i + block.numel()] = block[:flat.numel() - i]
    model.rotary.reset_parameters("cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def prepare(model, mode: str = "auto", bits: int | None = None, group_size: int = 32) -> str:
    """Quantize (optional), then the runner's speed passes for `mode`; returns the path taken."""
    from qwen2.quant.linear import quantize_model
    if bits and getattr(model, "quant", None) is None:
        quantize_model(model, bits, group_size)
    return prepare_runner(model, mode)


def _run(model, ids: list[int], tokens: int) -> dict:
    p = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    return generate(model, [ids], p)[0].timings


@torch.inference_mode()
def time_generation(model, prompt: int = 32, tokens: int = 128, prefill: int = 512, seed: int = 0) -> dict:
    """Prefill `prefill` tokens (timed once, after a warm-up), then a `prompt`-token prompt and
    `tokens` greedy decode steps, batch 1, all through the engine. Returns seconds and tok/s."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    res = {}
    if prefill:
        ids = torch.randint(0, vocab, (prefill,), generator=g).tolist()
        _run(model, ids[:16], 1)  # warm-up
        peak_rss_reset()
        t = _run(model, ids, 1)
        res["peak_rss_prefill"] = peak_rss()
        res["prefill_s"] = t["prefill_s"]
        res["prefill_tok_s"] = prefill / res["prefill_s"]
    ids = torch.randint(0, vocab, (prompt,), generator=g).tolist()
    _run(model, ids, 8)  # warm-up decode (compiles, if compiled)
    peak_rss_reset()
    t = _run(model, ids, tokens)
    res["decode_s"] = t["decode_s"]
    res["decode_tok_s"] = t["decode_tokens_per_s"] or 0.0
    res["peak_rss_gen"] = peak_rss()
    res["kv_cache_bytes"] = KVPool.bytes_for(model.config, [prompt + tokens], model.dtype)
    return res


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from qwen2.io.build import parse_dtype
    from qwen2.io.demo import demo_model_path
    if args.model and args.preset:
        raise Qwen2Error("give --model or --preset, not both")
    if not args.model and not args.preset:
        demo = demo_model_path()  # what every other command uses with no --model
        if demo is not None:
            args.model = str(demo)
        else:
            args.preset = "Qwen2-0.5B"
    if args.tokens < 2 or args.prompt < 1 or args.prefill < 0:
        raise Qwen2Error("--tokens must be at least 2, --prompt at least 1 and --prefill at least 0")
    base_rss = current_rss()  # the interpreter + torch, before any weights
    t = time.perf_counter()
    if args.preset:
        model = random_model(args.preset, parse_dtype(args.dtype))
        source = f"preset {args.preset} (random weights)"
    else:
        from qwen2.io.load import load_model
        model = load_model(args.model, dtype=args.dtype)
        source = args.model
    dtype = model.dtype
    if args.bits:
        from qwen2.quant.blocks import BlockLinear
        if any(isinstance(m, BlockLinear) for m in model.modules()):
            raise Qwen2Error("--bits requantizes float weights, and a GGUF file runs at its own precision; add "
                             "--dtype float32 (or bfloat16) to requantize its dequantized weights")
    path = prepare(model, args.mode, args.bits, args.group_size)
    load_s = time.perf_counter() - t
    r = time_generation(model, args.prompt, args.tokens, args.prefill)
    bw = measure_bandwidth()
    per_tok = weight_bytes_per_token(model)
    weights = model_bytes(model)
    bits = getattr(model, "quant", None)
    out = {
        "model": source, "mode": args.mode, "path": path, "dtype": str(dtype).removeprefix("torch."),
        "quant": bits, "threads": torch.get_num_threads(), "load_s": load_s,
        **r, "weights_bytes": weights, "bytes_per_token": per_tok,
        "bandwidth_gb_s": bw / 1e9, "roofline_tok_s": bw / per_tok,
        "rss_over_weights_kv": r["peak_rss_gen"] / (weights + r["kv_cache_bytes"]),
        "process_base_rss": base_rss,
        "rss_above_base_over_weights_kv": (r["peak_rss_gen"] - base_rss) / (weights + r["kv_cache_bytes"]),
    }
    out["roofline_fraction"] = out["decode_tok_s"] / out["roofline_tok_s"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    q = f"int{bits['bits']} (group {bits['group_size']})" if bits else out["dtype"]
    rows = [
        ("model", source), ("weights", f"{q}, {weights / 2**20:.0f} MiB, mode {args.mode} ({path})"),
        ("threads", out["threads"]), ("load", f"{load_s:.2f} s"),
    ]
    if "prefill_tok_s" in r:
        rows.append((f"prefill {args.prefill}", f"{r['prefill_tok_s']:.1f} tok/s, peak RSS "
                                                f"{r['peak_rss_prefill'] / 2**20:.0f} MiB"))
    rows += [
        (f"decode {args.tokens} after {args.prompt}", f"{r['decode_tok_s']:.1f} tok/s"),
        ("bandwidth (measured)", f"{out['bandwidth_gb_s']:.1f} GB/s"),
        ("roofline", f"{out['roofline_tok_s']:.1f} tok/s ({per_tok / 2**20:.0f} MiB read per token); "
                     f"reached {100 * out['roofline_fraction']:.0f}%"),
        ("peak RSS (generation)", f"{r['peak_rss_gen'] / 2**20:.0f} MiB = "
                                  f"{out['rss_over_weights_kv']:.2f} x (weights + KV cache); "
                                  f"{out['rss_above_base_over_weights_kv']:.2f} x above the "
                                  f"{base_rss / 2**20:.0f} MiB of Python + torch"),
    ]
    print_rows(rows)
    return 0
