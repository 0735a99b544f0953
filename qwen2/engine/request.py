"""One request's decoding state and what generation hands back.

`Row` holds a request's ids, text, stop detection and held-back text. The engine keeps one per
request, so offline generation and the server produce the same text by construction. Text comes
from the tokenizer's streaming detokenizer; text that could be the start of a stop string is held
back until it is known not to be, so a stop string is cut exactly even when it spans token
boundaries and never leaks into a stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error


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
    # SamplingParams.prompt_logprobs: one entry per prompt token, the first None (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None

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


class Row:
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
        # filled by the engine from the prefill logits; complete when it is as long as the prompt
        self.prompt_logprobs: list[TokenLogprob | None] | None = \
            [None] if params.prompt_logprobs is not None else None
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
        return Completion(self.text, self.ids, self.finish, self.prompt, self.logprobs, self.stop_reason, timings,
                          self.prompt_logprobs)


def check_prompts(model, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
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
