"""Run benchmarks on a model: requests -> engine -> per-sample scores -> lm-eval's result layout.

    from qwen2.eval.evaluate import evaluate
    res = evaluate(qwen2.load(path), ["mmlu", "gsm8k"], limit=20)
    res["results"]["mmlu"]["acc,none"], res["results"]["mmlu"]["acc_stderr,none"]

Every response is appended to a per-sample cache file (JSON lines, keyed by the model and the
request's full content) as soon as it exists, so an interrupted run resumes where it stopped.
Generated code is run by qwen2.eval.sandbox.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from qwen2.errors import Qwen2Error
from qwen2.eval import sandbox
from qwen2.eval.lm import EngineLM
from qwen2.eval.tasks import Request, Task, get_task

CHAT_MODES = ("auto", "on", "off")


def model_id(llm) -> str:
    """Identity of a checkpoint for the per-sample cache: its path, size and mtime."""
    src = str(llm.source or "")
    p = Path(src)
    if p.exists():
        files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) + sorted(p.glob("*.gguf"))
        src += "|" + "|".join(f"{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    return src + f"|{llm.model.dtype}"


def can_chat(llm) -> bool:
    return bool(getattr(llm.tokenizer, "chat_template", None))


def use_chat(llm, mode: str) -> bool:
    """--chat auto: chat for instruction-tuned checkpoints (a chat template and "instruct" or
    "chat" in the model's name), completion prompts otherwise."""
    if mode not in CHAT_MODES:
        raise Qwen2Error(f"--chat must be one of {', '.join(CHAT_MODES)}, not {mode!r}")
    if mode == "on":
        if not can_chat(llm):
            raise Qwen2Error(f"--chat on: {llm.source or 'the model'} has no chat template (a base model); use --chat off")
        return True
    if mode == "off":
        return False
    name = Path(str(llm.source or "")).name.lower()
    return can_chat(llm) and ("instruct" in name or "chat" in name)


class SampleCache:
    """Append-only JSON lines {key: response}; later lines win."""

    def __init__(self, path: Path | None):
        self.path, self.data = path, {}
        if path and path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        self.data.update(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut short by an interrupted run
        self._f = open(path, "a", encoding="utf-8") if path else None

    def put(self, key: str, value):
        self.data[key] = value
        if self._f:
            self._f.write(json.dumps({key: value}) + "\n")
            self._f.flush()

    def close(self):
        if self._f:
            self._f.close()


def _key(mid: str, task: str, req: Request, extra=()) -> str:
    blob = json.dumps([mid, task, req.context, req.continuation, req.messages, req.prefill, req.until,
                       req.max_gen_toks, *extra], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def metric_keys(metric: str) -> tuple[str, str]:
    """lm-eval's result keys: "acc" -> ("acc,none", "acc_stderr,none"); "exact_match,strict-match"
    -> ("exact_match,strict-match", "exact_match_stderr,strict-match")."""
    name, _, filt = metric.partition(",")
    filt = filt or "none"
    return f"{name},{filt}", f"{name}_stderr,{filt}"


def evaluate(llm, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
             batch_size: int = 16, chat: str = "auto", log_samples: bool = False,
             cache_path: str | Path | None = None, progress: bool = True, lm: EngineLM | None = None,
             exact: bool = True) -> dict:
    """`exact`: log-likelihoods with float32 activations (the dequantized model's numbers, as
    lm-eval's hf backend computes them; see qwen2.eval.lm); False: the GGUF kernels' faster int8
    activations on small steps. A given `lm` keeps its own setting."""
    if limit is not None and limit < 1:
        raise Qwen2Error(f"--limit must be at least 1 (got {limit})")
    if num_fewshot is not None and num_fewshot < 0:
        raise Qwen2Error(f"--num-fewshot must be 0 or more (got {num_fewshot})")
    task_objs = [get_task(t) for t in tasks]           # unknown names fail before any work
    chat_on = use_chat(llm, chat)
    lm = lm or EngineLM(llm, batch_size=batch_size, exact=exact)
    mid = model_id(llm)
    cache = SampleCache(Path(cache_path) if cache_path else None)
    out = {"results": {}, "n-shot": {}, "n-samples": {}, "versions": {}, "samples": {},
           "config": {"model": "qwen2", "model_args": f"pretrained={llm.source}", "num_fewshot": num_fewshot,
                      "limit": limit, "batch_size": batch_size, "chat": chat_on,
                      "exact_loglikelihood": lm.exact},
           "timing": {}}
    try:
        for task in task_objs:
            t0 = time.perf_counter()
            out["results"][task.name], samples, n_docs, shots, cached = _run_task(
                task, lm, mid, cache, num_fewshot, limit, chat_on and task.generation, progress)
            dt = time.perf_counter() - t0
            out["n-shot"][task.name] = shots
            out["n-samples"][task.name] = {"original": n_docs, "effective": len(samples)}
            out["versions"][task.name] = 1.0
            out["timing"][task.name] = {"seconds": round(dt, 2), "items_per_s": round(len(samples) / dt, 3) if dt else None,
                                        "cached_samples": cached}
            if log_samples:
                out["samples"][task.name] = samples
    finally:
        cache.close()
    out["timing"]["prefix_cache_hit_rate"] = round(lm.prefix_cache_hit_rate, 4)
    if not log_samples:
        del out["samples"]
    return out


def _run_task(task: Task, lm: EngineLM, mid: str, cache: SampleCache, num_fewshot, limit, chat, progress):
    docs = task.docs(limit)
    shots = task.default_shots if num_fewshot is None else num_fewshot
    per_doc = [task.requests(d, shots, chat) for d in docs]
    flat = [(di, ri, r) for di, rs in enumerate(per_doc) for ri, r in enumerate(rs)]
    # a GGUF model's float32-activation log-likelihoods are keyed apart from its int8 path's
    f32 = lm.exact and lm.has_blocks
    keys = [_key(mid, task.name, r, (chat, "f32") if r.loglikelihood and f32 else (chat,)) for _, _, r in flat]
    todo = [j for j, k in enumerate(keys) if k not in cache.data]
    cached = len(flat) - len(todo)
    bar = tqdm(total=len(flat), initial=cached, desc=task.name, unit="req", disable=not progress, dynamic_ncols=True)
    try:
        ll = [j for j in todo if flat[j][2].loglikelihood]
        gen = [j for j in todo if not flat[j][2].loglikelihood]
        if ll:
            pairs = [lm.encode_pair(flat[j][2].context, flat[j][2].continuation) for j in ll]
            lm.loglikelihood_ids(pairs, progress=bar.update,
                                 on_result=lambda i, r: cache.put(keys[ll[i]], list(r)))
        if gen:
            prompts, stops = [], []
            for j in gen:
                r = flat[j][2]
                prompts.append(lm.chat_ids(r.messages, r.prefill) if r.messages is not None
                               else lm.tokenizer.encode(r.context))
                stops.append(r.until)
            stop_ids = lm.llm.chat_stop_ids if chat else ()
            lm.generate_ids(prompts, stops, [flat[j][2].max_gen_toks for j in gen], stop_ids, progress=bar.update,
                            on_result=lambda i, text: cache.put(keys[gen[i]], text))
    finally:
        bar.close()
    responses = [[None] * len(rs) for rs in per_doc]
    for (di, ri, _), k in zip(flat, keys):
        responses[di][ri] = cache.data[k]

    if hasattr(task, "program"):   # code: run each program in the sandbox
        programs = [task.program(d, r[0], chat) for d, r in zip(docs, responses)]
        with tqdm(total=len(programs), desc=f"{task.name} tests", unit="prog", disable=not progress) as b:
            results = sandbox.run_many(programs, timeout=task.timeout, progress=b.update)
        scored = [task.score(d, [res]) for d, res in zip(docs, results)]
        extra = [{"program": p, "status": res.status} for p, res in zip(programs, results)]
    else:
        scored = [task.score(d, r) for d, r in zip(docs, responses)]
        extra = [{} for _ in docs]

    res = {"alias": task.name}
    for m in task.metrics:
        k, ks = metric_keys(m)
        xs = [s[m] for s in scored]
        res[k], res[ks] = sum(xs) / len(xs), _stderr(xs)
    samples = []
    for i, (d, rs, s, e) in enumerate(zip(docs, per_doc, scored, extra)):
        samples.append({"doc_id": i, "doc": {k: v for k, v in d.items() if not k.startswith("_")},
                        "arguments": [[r.context if r.messages is None else r.messages, r.continuation if r.loglikelihood
                                       else {"until": r.until, "max_gen_toks": r.max_gen_toks, "prefill": r.prefill}]
                                      for r in rs],
                        "resps": responses[i], **s, **e})
    return res, samples, len(docs), shots, cached


def markdown_table(results: dict) -> str:
    """lm-eval's summary table."""
    rows = ["|Tasks|Version|Filter|n-shot|Metric| |Value| |Stderr|", "|---|---:|---|---:|---|---|---:|---|---:|"]
    for task, res in results["results"].items():
        for k, v in res.items():
            if k == "alias" or "_stderr" in k:
                continue
            name, filt = k.split(",", 1)
            se = res.get(f"{name}_stderr,{filt}", float("nan"))
            se_s = "N/A" if se != se else f"{se:.4f}"
            rows.append(f"|{task}|{results['versions'].get(task, 1.0)}|{filt}|{results['n-shot'].get(task, 0)}|{name}|↑|"
                        f"{v:.4f}|±|{se_s}|")
    return "\n".join(rows)


def default_cache_path(llm, output: str | None) -> Path:
    """Next to --output when given, else in $QWEN2_CACHE/eval-runs."""
    if output:
        return Path(str(output) + ".samples-cache.jsonl")
    from qwen2.io.demo import cache_dir
    d = cache_dir() / "eval-runs"
    d.mkdir(parents=True, exist_ok=True)
    return d / (hashlib.sha256(model_id(llm).encode()).hexdigest()[:16] + ".jsonl")

