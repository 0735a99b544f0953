"""A model as an evaluator sees it: log-likelihoods and greedy generations, run on the engine.

Log-likelihood requests are prompt-scoring requests (max_new_tokens=0 with prompt logprobs):
prefills only, no token drawn, continuous batching across requests; their contexts come from the
engine's prefix cache wherever an earlier request computed them (the few-shot prefix of a
subject is computed once; the choices of one question share its whole context). Requests run in
token order so that shared prefixes are neighbours. Generations are greedy requests with stop
strings, batched the same way.

Numerics: a GGUF model's block kernels quantize the activations of small steps (up to 16 rows:
decode, and the few tokens a scoring request computes after a prefix-cache hit) to int8 by
default (llama.cpp's numerics). Log-likelihoods are scored with float32 activations instead
(`exact=True`, the default: qwen2.quant.blocks.set_exact while scoring, restored afterwards), so
they are the dequantized model's up to float32 summation order, as lm-eval's `hf` backend
computes them on transformers, and the choices of one question are scored with the same math
whatever the batch they land in. Generation keeps the model's own setting.

Tokenization follows lm-eval's `hf` model: a context's trailing spaces move to its continuation,
the continuation's ids are those of context + continuation past the context's ids, and an empty
context is replaced by the end-of-text token.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Sequence

from torch import nn

from qwen2.engine.core import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error
from qwen2.quant.blocks import BlockLinear, set_exact


@contextmanager
def exact_numerics(model: nn.Module, exact: bool = True):
    """Within the block: every GGUF block projection of `model` with float32 activations (exact)
    or its int8 small-batch path (not exact); each one's own setting is restored afterwards."""
    before = [(m, m.exact) for m in model.modules() if isinstance(m, BlockLinear)]
    set_exact(model, exact)
    try:
        yield model
    finally:
        for m, e in before:
            m.exact = e


class EngineLM:
    """`exact`: score log-likelihoods with float32 activations (the module doc); False keeps the
    model's own setting (a GGUF model's default: int8 activations for small steps, faster on
    decode-sized steps, llama.cpp's numerics)."""

    def __init__(self, llm, batch_size: int = 16, kv_cache_memory: int | None = None, max_batched_tokens: int = 1024,
                 exact: bool = True):
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.exact = bool(exact)
        # whether `exact` changes anything: the model has GGUF block projections
        self.has_blocks = any(isinstance(m, BlockLinear) for m in llm.model.modules())
        self.engine = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_batch=batch_size,
                             kv_cache_memory=kv_cache_memory, max_batched_tokens=max_batched_tokens)
        self.max_len = self.engine.max_model_len
        self.prefix_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else llm.eos_token_ids[0]

    # -- tokenization (lm-eval's HFLM._encode_pair) ----------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    def chat_ids(self, messages: list[dict], prefill: str = "") -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True) + \
            (self.tokenizer.encode(prefill) if prefill else [])

    # -- requests ---------------------------------------------------------------------------------
    def loglikelihood_ids(self, pairs: Sequence[tuple[list[int], list[int]]], progress=None,
                          on_result: Callable[[int, tuple[float, bool]], None] | None = None) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, whether it is the greedy continuation) per pair."""
        items = []
        for ctx, cont in pairs:
            if not cont:
                raise Qwen2Error("a log-likelihood request has an empty continuation")
            ids = ctx + cont
            if len(ids) > self.max_len - 1:   # as lm-eval: keep the end, the continuation whole
                ids = ids[-(self.max_len - 1):]
            items.append((ids, len(ids) - len(cont)))
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)

        def result(i, out):
            start = items[i][1]
            lps = out.prompt_logprobs[start:]
            ll = sum(lp.logprob for lp in lps)
            greedy = all(lp.top and lp.top[0][0] == lp.token_id for lp in lps)
            return ll, greedy
        reqs = [(ids, params, start) for ids, start in items]
        if not (self.exact and self.has_blocks):
            return self._run(reqs, result, progress, on_result)
        with exact_numerics(self.llm.model):
            return self._run(reqs, result, progress, on_result)

    def generate_ids(self, prompts: Sequence[list[int]], until: Sequence[list[str]], max_tokens: Sequence[int],
                     stop_token_ids: Sequence[int] = (), progress=None,
                     on_result: Callable[[int, str], None] | None = None) -> list[str]:
        """Greedy continuations, cut at the first stop string."""
        reqs = []
        for ids, stops, n in zip(prompts, until, max_tokens):
            n = max(1, min(n, self.max_len - len(ids)))
            if len(ids) >= self.max_len:
                ids = ids[-(self.max_len - n):]
            reqs.append((ids, SamplingParams(max_new_tokens=n, temperature=0, stop=list(stops),
                                             stop_token_ids=list(stop_token_ids)), None))
        return self._run(reqs, lambda i, out: out.text, progress, on_result)

    def _run(self, reqs, result, progress, on_result):
        """Run requests on the engine in this thread, `result(i, final_output)` per request.

        Requests go in token order. One that shares at least a KV block of prefix with the request
        before it waits until that one has its prompt in the cache (its first output), so that it
        starts from the cached blocks instead of computing the same prefix in the same step: a
        subject's questions, a question's choices, GSM8K's shared exemplars form such chains, and
        unrelated chains run side by side."""
        order = sorted(range(len(reqs)), key=lambda i: reqs[i][0])
        bs = self.engine.pool.block_size
        waits_for: dict[int, int] = {}    # predecessor -> the request waiting for it
        for prev, cur in zip(order, order[1:]):
            a, b = reqs[prev][0], reqs[cur][0]
            limit = (reqs[cur][2] or len(b)) - 1
            n = 0
            while n < min(len(a), len(b), limit) and a[n] == b[n]:
                n += 1
            if n >= bs:
                waits_for[prev] = cur
        blocked = set(waits_for.values())
        ready = deque(i for i in order if i not in blocked)
        out: list = [None] * len(reqs)
        texts: dict[int, list[str]] = {}
        started: set[int] = set()
        failed: list[str] = []
        window = 4 * self.engine.max_batch   # submitted ahead of the scheduler
        inflight = 0

        def sink(i, o):
            nonlocal inflight
            if i not in started:          # its prompt is in the cache: release the one waiting for it
                started.add(i)
                if i in waits_for:
                    ready.appendleft(waits_for[i])
            texts.setdefault(i, []).append(o.text)
            if not o.finished:
                return
            inflight -= 1
            if o.error:
                failed.append(o.error)
                return
            o.text = "".join(texts.pop(i))
            out[i] = result(i, o)
            if on_result is not None:
                on_result(i, out[i])
            if progress is not None:
                progress(1)

        def submit():
            nonlocal inflight
            while inflight < window and ready:
                i = ready.popleft()
                ids, params, score_from = reqs[i]
                self.engine.add_request(str(i), ids, params, lambda o, i=i: sink(i, o), score_from=score_from)
                inflight += 1

        submit()
        while self.engine.has_work() or ready:
            self.engine.step()
            if failed:
                raise Qwen2Error(f"engine: {failed[0]}")
            submit()
        return out

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.engine.prefix_cache_hit_rate

