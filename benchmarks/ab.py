"""Same-run A/B of `qwen2 bench` between this checkout and another (an older commit).

    git worktree add /tmp/qwen2-old <commit>        # or any clone at the commit to compare with
    python benchmarks/ab.py --base /tmp/qwen2-old --rounds 2

Each case runs `python -m qwen2.cli bench --json` once per tree per round, alternating trees, so
the load of a shared machine falls on both alike; the table gives each tree's best tok/s and the
ratio this/base. Cases: random Qwen2-0.5B decode in bf16, int8 and int4 (group 32), prefill of
512 tokens (bf16), and the demo model when it is installed. Each tree runs its own default speed
path; --base-args / --args add flags to one side (e.g. the old tree's `--mode compiled`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "bf16": ["--preset", "Qwen2-0.5B", "--dtype", "bfloat16", "--prefill", "512"],
    "int8": ["--preset", "Qwen2-0.5B", "--dtype", "bfloat16", "--bits", "8", "--prefill", "0"],
    "int4": ["--preset", "Qwen2-0.5B", "--dtype", "bfloat16", "--bits", "4", "--prefill", "0"],
    "demo": ["--dtype", "float32", "--prefill", "0"],
}


def bench(tree: Path, case: list[str], extra: list[str], tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "qwen2.cli", "bench", *case, "--tokens", str(tokens), "--json", *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkout to compare against")
    ap.add_argument("--cases", default="bf16,int8,int4,demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--args", default="", help="extra bench flags for this checkout")
    ap.add_argument("--base-args", default="", help="extra bench flags for the base checkout")
    ap.add_argument("--out", default=None, help="write all runs as JSON here")
    args = ap.parse_args()
    trees = {"this": (ROOT, args.args.split()), "base": (Path(args.base).resolve(), args.base_args.split())}
    runs: dict = {}
    for name in args.cases.split(","):
        case = list(CASES[name])
        if name == "demo":
            sys.path.insert(0, str(ROOT))
            from qwen2.io.demo import demo_model_path
            path = demo_model_path()
            if path is None:
                print("demo model not installed: skipped", file=sys.stderr)
                continue
            case = ["--model", str(path)] + case
        for r in range(args.rounds):
            for tree, (path, extra) in trees.items():
                out = bench(path, case, extra, args.tokens)
                runs.setdefault(name, {}).setdefault(tree, []).append(out)
                print(json.dumps({"case": name, "round": r, "tree": tree,
                                  **{k: out.get(k) for k in ("decode_tok_s", "prefill_tok_s", "path", "error")}}),
                      flush=True)
    print(f"\n{'case':<6} {'metric':<14} {'this':>8} {'base':>8} {'ratio':>6}")
    for name, by_tree in runs.items():
        for metric in ("decode_tok_s", "prefill_tok_s"):
            best = {t: max((o.get(metric) or 0 for o in outs), default=0) for t, outs in by_tree.items()}
            if best["this"] and best["base"]:
                print(f"{name:<6} {metric:<14} {best['this']:8.1f} {best['base']:8.1f} {best['this'] / best['base']:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
