"""qwen2 vs llama.cpp vs transformers on the same random-weight Qwen2 checkpoint, in one run.

    python benchmarks/compare.py                    # prepare (once) + measure, prints the table
    python benchmarks/compare.py --json out.json    # also write the raw numbers

Prepare (cached in --workdir): random Qwen2-0.5B weights saved as a bf16 HF checkpoint (with the
Qwen2.5 tokenizer taken from the demo GGUF, which convert_hf_to_gguf.py needs), converted to GGUF
F16 with llama.cpp's own converter (from the llama-cpp-python sdist) and quantized to Q8_0 and
Q4_0 with llama_cpp.llama_model_quantize.

Measure: every engine is loaded in this process, then measured in interleaved rounds (qwen2,
llama.cpp, transformers, qwen2, ...) and each keeps its best round, so that load on a shared
machine hits all engines alike. Decode: a 32-token prompt, then greedy tokens one at a time
(batch 1). Prefill: 512 tokens in one call, logits for the last position only.

Our engines: exact (the reference path, eager), fast (eager: fused projections, oneDNN-packed
bf16, aten int8/int4 kernels) and compiled (fused projections + the torch.compile'd decode step,
qwen2.engine.compiled), each in bf16, int8 and int4. The ratio table takes our best of each precision.

    python benchmarks/compare.py --demo   # real weights: the demo GGUF (Qwen2.5-Coder-0.5B-Instruct
                                          # Q4_K_M) in llama.cpp vs our int4/int8 of the same file
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sh(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr)
    subprocess.run(list(map(str, cmd)), check=True, **kw)


# --------------------------------------------------------------------------------- prepare
def prepare(work: Path, preset: str) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{preset}-random"
    if not (ckpt / "model.safetensors").exists():
        from qwen2 import save_model
        from qwen2.cli.bench import random_model
        from qwen2.io.demo import demo_model_path
        from transformers import AutoTokenizer
        model = random_model(preset, torch.bfloat16)
        save_model(model, ckpt)
        demo = demo_model_path()
        tok = AutoTokenizer.from_pretrained(str(demo.parent), gguf_file=demo.name)
        tok.save_pretrained(ckpt)
        del model
    files = {"hf": ckpt}
    f16 = work / f"{preset}-F16.gguf"
    if not f16.exists():
        src = work / "llama_src"
        if not src.exists():
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "llama-cpp-python", "-d", work / "sdist"])
            tar = next((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
            src.mkdir()
            sh(["tar", "xzf", tar, "-C", src, "--strip-components=1"])
        env = dict(os.environ, PYTHONPATH=str(src / "vendor/llama.cpp/gguf-py"))
        sh([sys.executable, src / "vendor/llama.cpp/convert_hf_to_gguf.py", ckpt, "--outtype", "f16",
            "--outfile", f16], env=env)
    files["F16"] = f16
    import llama_cpp
    for name, ftype in (("Q8_0", 7), ("Q4_0", 2)):
        out = work / f"{preset}-{name}.gguf"
        if not out.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {name} failed ({rc})")
        files[name] = out
    return files


# --------------------------------------------------------------------------------- engines
class Qwen2Engine:
    def __init__(self, path, mode="fast", bits=None, group_size=32, dtype=torch.bfloat16):
        import qwen2
        from qwen2.cli.bench import prepare as speedup
        t = time.perf_counter()
        self.model = speedup(qwen2.load_model(path, dtype=dtype), mode, bits, group_size)
        self.load_s = time.perf_counter() - t
        if mode == "compiled":  # compile now (the load column then includes it)
            self.decode([1, 2, 3], 3)
            self.load_s = time.perf_counter() - t

    @torch.inference_mode()
    def prefill(self, ids):
        self.model(torch.tensor([ids]), cache=self.model.new_cache(1, len(ids)), logits_to_keep=1)

    @torch.inference_mode()
    def decode(self, ids, n):
        m = self.model
        cache = m.new_cache(1, len(ids) + n)
        nxt = m(torch.tensor([ids]), cache=cache, logits_to_keep=1).argmax(-1)
        t = time.perf_counter()
        for _ in range(n - 1):
            nxt = m(nxt, cache=cache, logits_to_keep=1).argmax(-1)
        return (n - 1) / (time.perf_counter() - t)


class LlamaCppEngine:
    def __init__(self, path, threads):
        import llama_cpp
        import numpy as np
        self.np = np
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.load_s = time.perf_counter() - t

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, ids, n):
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        nxt = int(self.np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([nxt])
            nxt = int(self.np.argmax(llm.scores[llm.n_tokens - 1]))
        return (n - 1) / (time.perf_counter() - t)


class TransformersEngine:
    def __init__(self, path, dtype):
        from transformers import AutoModelForCausalLM
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        self.load_s = time.perf_counter() - t

    @torch.inference_mode()
    def prefill(self, ids):
        self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode(self, ids, n):
        out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n - 1):
            out = self.model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (n - 1) / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/qwen2-bench"))
    ap.add_argument("--preset", default="Qwen2-0.5B")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per round")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32, help="our int4 group size")
    ap.add_argument("--only", default=None, help="comma-separated engine names to run")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--demo", action="store_true",
                    help="real weights: the demo GGUF in llama.cpp vs our int8/int4 (and bf16) of it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = args.group_size
    if args.demo:
        from qwen2.io.demo import demo_model_path
        demo = demo_model_path()
        if demo is None:
            sys.exit('the demo model is not installed: pip install -e ".[demo]"')
        specs = {
            "qwen2 bf16 (compiled)": lambda: Qwen2Engine(demo, "compiled"),
            "qwen2 int8 (compiled)": lambda: Qwen2Engine(demo, "compiled", 8),
            f"qwen2 int4 g{g} (compiled)": lambda: Qwen2Engine(demo, "compiled", 4, g),
            f"qwen2 int4 g{g} (fast)": lambda: Qwen2Engine(demo, "fast", 4, g),
            "llama.cpp Q4_K_M": lambda: LlamaCppEngine(demo, args.threads),
        }
    else:
        files = prepare(Path(args.workdir), args.preset)
        hf = files["hf"]
        specs = {
            "qwen2 bf16 (exact)": lambda: Qwen2Engine(hf, "exact"),
            "qwen2 bf16 (fast)": lambda: Qwen2Engine(hf, "fast"),
            "qwen2 bf16 (compiled)": lambda: Qwen2Engine(hf, "compiled"),
            "qwen2 int8 (fast)": lambda: Qwen2Engine(hf, "fast", 8),
            "qwen2 int8 (compiled)": lambda: Qwen2Engine(hf, "compiled", 8),
            f"qwen2 int4 g{g} (fast)": lambda: Qwen2Engine(hf, "fast", 4, g),
            f"qwen2 int4 g{g} (compiled)": lambda: Qwen2Engine(hf, "compiled", 4, g),
            "llama.cpp F16": lambda: LlamaCppEngine(files["F16"], args.threads),
            "llama.cpp Q8_0": lambda: LlamaCppEngine(files["Q8_0"], args.threads),
            "llama.cpp Q4_0": lambda: LlamaCppEngine(files["Q4_0"], args.threads),
            "transformers bf16": lambda: TransformersEngine(hf, torch.bfloat16),
            "transformers fp32": lambda: TransformersEngine(hf, torch.float32),
        }
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        specs = {k: v for k, v in specs.items() if any(s in k for s in keep)}
    engines = {}
    for name, make in specs.items():
        print(f"loading {name} ...", file=sys.stderr)
        engines[name] = make()
    gc.collect()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 150000, (32,), generator=g).tolist()
    long = torch.randint(0, 150000, (args.prefill,), generator=g).tolist()
    res = {k: {"load_s": e.load_s, "decode": [], "prefill": []} for k, e in engines.items()}
    for e in engines.values():  # warm-up (first-call allocations, oneDNN primitive creation)
        e.prefill(long[:64])
        e.decode(prompt, 4)
    for r in range(args.rounds):
        for k, e in engines.items():
            res[k]["decode"].append(e.decode(prompt, args.tokens))
            if args.prefill:
                t = time.perf_counter()
                e.prefill(long)
                res[k]["prefill"].append(args.prefill / (time.perf_counter() - t))
            print(f"round {r} {k}: decode {res[k]['decode'][-1]:.1f} tok/s"
                  + (f", prefill {res[k]['prefill'][-1]:.0f} tok/s" if args.prefill else ""), file=sys.stderr)
    for v in res.values():
        v["decode_best"] = max(v["decode"])
        v["prefill_best"] = max(v["prefill"]) if v["prefill"] else None
    print_table(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": res}, indent=2))


RATIOS = [  # (our engines' prefix: the best of them, peer, goal)
    ("qwen2 bf16", "llama.cpp F16", 1.1), ("qwen2 bf16", "transformers bf16", 2.0),
    ("qwen2 int8", "llama.cpp Q8_0", 1.15), ("qwen2 int4", "llama.cpp Q4_0", 1.2),
    ("qwen2 int4", "llama.cpp Q4_K_M", 1.0),
]


def print_table(res, args):
    from qwen2.cli.bench import measure_bandwidth
    what = ("the demo model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, real weights)" if args.demo
            else f"{args.preset}, random weights")
    print(f"\n{what}, {args.threads} threads, best of {args.rounds} interleaved rounds; "
          f"decode: {args.tokens} tokens after a 32-token prompt; prefill: {args.prefill} tokens")
    print(f"streaming read bandwidth now: {measure_bandwidth() / 1e9:.1f} GB/s\n")
    print("| engine | load s | decode tok/s | prefill tok/s |\n|---|---|---|---|")
    for k, v in res.items():
        pf = f"{v['prefill_best']:.0f}" if v["prefill_best"] else "-"
        print(f"| {k} | {v['load_s']:.1f} | {v['decode_best']:.1f} | {pf} |")
    print("\n| ratio (decode) | measured | goal |\n|---|---|---|")
    for ours, peer, goal in RATIOS:
        o = max((k for k in res if k.startswith(ours)), key=lambda k: res[k]["decode_best"], default=None)
        if o and peer in res:
            r = res[o]["decode_best"] / res[peer]["decode_best"]
            print(f"| {o} / {peer} | {r:.2f}x | >= {goal}x {'ok' if r >= goal else 'MISSED'} |")
    fast = max((k for k in res if k.startswith("qwen2") and res[k]["prefill_best"]),
               key=lambda k: res[k]["prefill_best"], default=None)
    if fast and "llama.cpp F16" in res and res["llama.cpp F16"]["prefill_best"]:
        r = res[fast]["prefill_best"] / res["llama.cpp F16"]["prefill_best"]
        print(f"| prefill {args.prefill}: {fast} / llama.cpp F16 | {r:.2f}x | >= 1.2x {'ok' if r >= 1.2 else 'MISSED'} |")


if __name__ == "__main__":
    main()
