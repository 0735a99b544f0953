"""llama-cpp-python in a process of its own, for the benchmarks that compare against it.

Run in the benchmark's process, llama.cpp shares torch's libgomp, and under the
OMP_WAIT_POLICY=PASSIVE that every `qwen2` command sets it decoded the 1.5B Q4_K_M at ~21 tok/s
against 32-41 tok/s in a process of its own (benchmarks/bench_gguf.py). So the benchmark starts
this file as a child process: no torch imported here, OMP_WAIT_POLICY removed from its
environment (llama.cpp as it comes), each Llama loaded once, then one JSON line per request on
stdin and one answer line on stdout, synchronously (the parent waits, idle, for the answer).

Requests:
    {"cmd": "load", "name": N, "path": P, "kw": {...Llama kwargs}, "lookup": K or null}
        -> {"ok": true, "load_s": s}; lookup K: a LlamaPromptLookupDecoding(num_pred_tokens=K) draft
    {"cmd": "generate", "name": N, "ids": [...], "max_new": n, "stops": [...]}
        -> {"ok": true, "tokens": [...], "times": [...perf_counter per token]}
        or {"ok": false, "error": "..."} when llama-cpp-python raised (the worker lives on)
    {"cmd": "info"} -> pid, OMP_WAIT_POLICY seen, whether torch is loaded, llama_cpp version
A worker that dies (a crash in C) closes stdout: the parent sees EOF and starts a new one.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


def generate(model, ids: list[int], max_new: int, stops: set[int]) -> dict:
    """Greedy, as the benchmark's own legs: token ids in, tokens and their arrival times out."""
    model.reset()
    times, toks = [], []
    for tok in model.generate(ids, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        toks.append(int(tok))
        if tok in stops or len(toks) >= max_new:
            break
    return {"tokens": toks, "times": times}


def main() -> None:
    out = os.fdopen(os.dup(1), "w")  # the answer channel; anything else written to fd 1 (C code
    os.dup2(2, 1)                     # included) goes to stderr
    sys.stdout = sys.stderr
    from llama_cpp import Llama, __version__
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    models = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "load":
                t = time.perf_counter()
                kw = dict(req.get("kw") or {})
                if req.get("lookup"):
                    kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=int(req["lookup"]))
                models[req["name"]] = Llama(req["path"], **kw)
                ans = {"ok": True, "load_s": time.perf_counter() - t}
            elif cmd == "generate":
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                ans = {"ok": True, **generate(models[req["name"]], req["ids"], int(req["max_new"]), set(req["stops"]))}
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                ans["cpu_s"] = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            elif cmd == "info":
                ans = {"ok": True, "pid": os.getpid(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                       "torch_loaded": "torch" in sys.modules, "llama_cpp": __version__}
            else:
                ans = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which records the leg as failed
            tb = traceback.format_exc().strip().splitlines()
            where = [x.strip() for x in tb[:-1] if x.strip() and set(x.strip()) - set("~^ ")]
            ans = {"ok": False, "error": f"{type(e).__name__}: {e}", "where": where[-2:]}
        out.write(json.dumps(ans) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
