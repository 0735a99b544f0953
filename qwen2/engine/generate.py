"""Offline generation on the one engine: the prompts become requests, the engine runs in the
calling thread, and each step's outputs come back as deltas.

    for d in stream_generate(model, prompts, params, tokenizer, eos_ids):   # deltas as they come
        ...
    completions = generate(model, prompts, params, tokenizer, eos_ids)      # or all at once

Every row stops on its own (eos / stop token id, stop string, its max_new_tokens); the KV pool is
sized for exactly this batch, so nothing is ever preempted.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterator, Sequence

import torch

from qwen2.engine.core import Engine, RequestOutput
from qwen2.engine.paged import KVPool
from qwen2.engine.request import Completion, Delta, check_prompts
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error


@torch.inference_mode()
def stream_generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                    tokenizer=None, eos_ids: Sequence[int] = (), chunk_size: int | None = None,
                    speculator=None) -> Iterator[Delta]:
    """Generate for a batch of token-id prompts; yields a Delta per live row per step.
    chunk_size: prompt tokens per step (bounds prefill memory for long prompts; default: the
    longest prompt, at least 1024). speculator: qwen2.engine.speculative.Speculator (None: none)."""
    prompts = check_prompts(model, prompts)
    b = len(prompts)
    params = [params] * b if isinstance(params, SamplingParams) else list(params)
    if len(params) != b:
        raise Qwen2Error(f"{len(params)} sampling params for {b} prompts")
    ctx = model.config.max_position_embeddings
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if n >= ctx:
            raise Qwen2Error(f"prompt {i} has {n} tokens; the model's context is {ctx}")
    limits = [min(sp.max_new_tokens, ctx - n) for sp, n in zip(params, lens)]
    need = KVPool.bytes_for(model.config, [n + k for n, k in zip(lens, limits)], model.dtype)
    try:
        engine = Engine(model, tokenizer, eos_token_ids=eos_ids, max_batch=b, kv_cache_memory=need,
                        max_batched_tokens=chunk_size or max(1024, max(lens)), speculator=speculator)
    except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        raise Qwen2Error(f"out of memory for a KV cache of {sum(lens) + sum(limits)} tokens "
                         f"({need / 2**30:.1f} GiB); lower max_new_tokens or the batch size") from None
    outputs: deque[tuple[int, RequestOutput]] = deque()
    reqs = [engine.add_request(str(i), p, sp.replace(max_new_tokens=k), lambda o, i=i: outputs.append((i, o)))
            for i, (p, sp, k) in enumerate(zip(prompts, params, limits))]
    t0 = time.monotonic()
    while engine.has_work():
        engine.step()
        while outputs:
            i, out = outputs.popleft()
            if out.error:
                raise Qwen2Error(out.error)
            req = reqs[i]
            done = None
            if out.finished:
                done = req.row.completion(_timings(t0, req, b, sum(lens)))
            yield Delta(i, out.text, out.token_ids[-1] if out.token_ids else -1, out.finish_reason if out.finished else None,
                        done)


def _timings(t0: float, req, batch: int, batch_prompt_tokens: int) -> dict:
    """Wall times of one request: prefill (to its first token) and decode (the tokens after it)."""
    now = time.monotonic()
    first = req.first_token_time or now
    prefill, decode = first - t0, now - first
    n = len(req.row.ids)
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n, "batch_size": batch,
            "prefill_s": round(prefill, 6), "decode_s": round(decode, 6),
            "prefill_tokens_per_s": round(batch_prompt_tokens / max(prefill, 1e-9), 2),
            "decode_tokens_per_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None}


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             tokenizer=None, eos_ids: Sequence[int] = (), chunk_size: int | None = None,
             speculator=None) -> list[Completion]:
    """All completions, in prompt order."""
    out: list[Completion | None] = [None] * len(prompts)
    for d in stream_generate(model, prompts, params, tokenizer, eos_ids, chunk_size, speculator):
        if d.completion is not None:
            out[d.index] = d.completion
    return out
