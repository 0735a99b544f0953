"""Static-KV-cache generation: one prefill of the left-padded batch, then one token per step.

    for d in stream_generate(model, prompts, params, tokenizer, eos_ids):   # deltas as they come
        ...
    completions = generate(model, prompts, params, tokenizer, eos_ids)      # or all at once

Every row stops on its own (eos / stop token id, stop string, its max_new_tokens); finished rows
keep riding in the batch with a pad token (the cache is static) but are no longer sampled.
Text comes from the tokenizer's streaming detokenizer; text that could be the start of a stop
string is held back until it is known not to be, so a stop string is cut exactly even when it
spans token boundaries and never leaks into a stream.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from qwen2.errors import Qwen2Error
from qwen2.engine.sampling import SamplingParams, make_generator, process_logits, sample


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class Completion:
    text: str
    token_ids: list[int]            # generated ids (a final stop token id included)
    finish_reason: str              # "stop" (eos, stop id or stop string) or "length"
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    timings: dict = field(default_factory=dict)

    def __str__(self):
        return self.text


@dataclass
class Delta:
    """One row's progress in one step: new text (possibly empty while held back), the token."""
    index: int
    text: str
    token_id: int
    finish_reason: str | None = None
    completion: Completion | None = None  # set on the row's last delta


class _Row:
    """Per-request decoding state: ids, text, stop detection, held-back text."""

    def __init__(self, prompt: list[int], params: SamplingParams, limit: int, tokenizer, eos_ids):
        self.prompt, self.params, self.limit = prompt, params, limit
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        # Output text leaves special tokens out (as transformers' skip_special_tokens and vLLM do).
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        if params.stop and self.decoder is None:
            raise Qwen2Error("stop strings need a tokenizer")
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if (params.logprobs or params.top_logprobs) else None
        self.text = ""
        self.sent = 0  # text[:sent] has been handed out
        self.finish: str | None = None
        self.stop_reason = None

    def add(self, tok: int, lp: TokenLogprob | None) -> str:
        """Append a sampled token; returns the text that is now safe to hand out."""
        self.ids.append(tok)
        if self.logprobs is not None:
            self.logprobs.append(lp)
        flush = self.decoder.flush if self.decoder else str
        if tok in self.stop_ids:
            self._append(flush())  # bytes of an unfinished character, if any
            if not self.finish:
                self.finish, self.stop_reason = "stop", tok
        else:
            self._append(self.decoder.feed(tok) if self.decoder else "")
            if not self.finish and len(self.ids) >= self.limit:
                self._append(flush())
                self.finish = self.finish or "length"
        end = len(self.text) if self.finish else len(self.text) - self._held()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _append(self, s: str):
        if not s or self.finish:
            return
        start = max(0, len(self.text) - max((len(x) for x in self.params.stop), default=1) + 1)
        self.text += s
        hits = [(i, x) for x in self.params.stop if (i := self.text.find(x, start)) >= 0]
        if hits:
            i, x = min(hits)
            self.text = self.text[:i]
            self.finish, self.stop_reason = "stop", x

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        held = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def completion(self, timings: dict) -> Completion:
        return Completion(self.text, self.ids, self.finish, self.prompt, self.logprobs, self.stop_reason, timings)


def _check_prompts(model, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    vocab = model.config.vocab_size
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise Qwen2Error(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise Qwen2Error(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        out.append(p)
    return out


@torch.inference_mode()
def stream_generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                    tokenizer=None, eos_ids: Sequence[int] = (), pad_id: int = 0) -> Iterator[Delta]:
    """Generate for a batch of token-id prompts; yields a Delta per live row per step."""
    prompts = _check_prompts(model, prompts)
    b = len(prompts)
    params = [params] * b if isinstance(params, SamplingParams) else list(params)
    if len(params) != b:
        raise Qwen2Error(f"{len(params)} sampling params for {b} prompts")
    ctx = model.config.max_position_embeddings
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if n >= ctx:
            raise Qwen2Error(f"prompt {i} has {n} tokens; the model's context is {ctx}")
    # Each row may generate up to its own max_new_tokens, capped by the context window.
    rows = [_Row(p, sp, min(sp.max_new_tokens, ctx - n), tokenizer, eos_ids)
            for p, sp, n in zip(prompts, params, lens)]
    t = max(lens)
    dev = model.device
    cache = _new_cache(model, b, t + max(r.limit for r in rows))
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token is at column t-1
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    padded = bool((mask == 0).any())
    gens = [make_generator(sp.seed, dev) for sp in params]
    # Embedding rows past the tokenizer's vocabulary are padding: never sample them.
    n_valid = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None

    t0 = time.perf_counter()
    logits = model(ids.to(dev), attention_mask=mask.to(dev) if padded else None, cache=cache, logits_to_keep=1)[:, -1]
    t_first = None
    active = list(range(b))
    steps = 0
    while active:
        sub = [params[i] for i in active]
        if n_valid is not None and n_valid < logits.shape[-1]:
            logits[:, n_valid:] = float("-inf")
        lg = process_logits(logits[active], sub, [rows[i].ids for i in active], [prompts[i] for i in active])
        toks, lp = sample(lg, sub, [gens[i] for i in active])
        toks_l = toks.tolist()
        if lp is not None:
            lp_tok, lp_ids, lp_vals = lp.token.tolist(), lp.top_ids.tolist(), lp.top_values.tolist()
        if t_first is None:
            t_first = time.perf_counter()
        steps += 1
        now = time.perf_counter()
        for j, i in enumerate(active):
            row = rows[i]
            tlp = None
            if row.logprobs is not None:
                n = params[i].top_logprobs
                top = [(a, v) for a, v in zip(lp_ids[j][:n], lp_vals[j][:n]) if v != float("-inf")]
                tlp = TokenLogprob(toks_l[j], lp_tok[j], top)
            text = row.add(toks_l[j], tlp)
            done = None
            if row.finish:
                done = row.completion(_timings(t0, t_first, now, steps, b, len(row.ids), lens[i], sum(lens)))
            yield Delta(i, text, toks_l[j], row.finish, done)
        active = [i for i in active if not rows[i].finish]
        if not active:
            break
        nxt = torch.full((b, 1), pad_id, dtype=torch.long)
        nxt[active, 0] = torch.tensor([rows[i].ids[-1] for i in active])
        logits = model(nxt.to(dev), cache=cache, logits_to_keep=1)[:, -1]


def _new_cache(model, batch: int, length: int):
    try:
        return model.new_cache(batch, length)
    except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        c = model.config
        need = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * batch * length * model.dtype.itemsize
        raise Qwen2Error(f"out of memory for a KV cache of {batch} x {length} tokens ({need / 2**30:.1f} GiB); "
                         "lower max_new_tokens or the batch size") from None


def _timings(t0, t_first, now, steps, batch, completion_tokens, prompt_tokens, batch_prompt_tokens) -> dict:
    """Wall times of this batch: prefill (to the first token) and decode (the steps after it)."""
    prefill, decode = t_first - t0, now - t_first
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "batch_size": batch,
            "prefill_s": round(prefill, 6), "decode_s": round(decode, 6),
            "prefill_tokens_per_s": round(batch_prompt_tokens / max(prefill, 1e-9), 2),
            "decode_tokens_per_s": round((steps - 1) / decode, 2) if steps > 1 and decode > 0 else None}


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             tokenizer=None, eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[Completion]:
    """All completions, in prompt order."""
    out: list[Completion | None] = [None] * len(prompts)
    for d in stream_generate(model, prompts, params, tokenizer, eos_ids, pad_id):
        if d.completion is not None:
            out[d.index] = d.completion
    return out
