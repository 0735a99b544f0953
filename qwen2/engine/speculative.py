"""Speculative decoding: cheap proposals that the target checks in one forward, exactly.

Batch-1 decode reads every weight once per token; a verification step reads them once for a
whole run of tokens. A proposer guesses the next K tokens of a request, the engine feeds
[last token, d1..dK] as one slice of its packed step (`SeqSlice(all_logits=True)`: the target's
logits at every one of those positions), and `verify` keeps the guesses the target agrees with,
plus one token of the target's own. Keys of rejected guesses stay in the pool but are never seen
again: the request's `num_computed` is lowered past them and the next step overwrites them.

Proposers:
* prompt lookup (`ngram_propose`): the tokens that followed the most recent earlier occurrence
  of the longest suffix n-gram of prompt + output; free, strong where the output quotes its
  input (editing code, summarising);
* a draft model (`DraftModel`): a smaller model of the same vocabulary, with its own KV pool and
  per-request state; each step it catches up on the tokens the target accepted, then drafts K
  tokens in K small batched forwards, stopping early where its own confidence drops below p_min
  (llama.cpp's --draft-p-min).

The acceptance rule (`verify`), with p the target's distribution after the request's own
sampling pipeline (penalties, temperature, top-k/top-p/min-p; its history includes the accepted
drafts before each position):
* greedy: accept while the target's argmax equals the draft, then the argmax: the output is the
  plain greedy output, token for token;
* sampling: accept d_i with probability min(1, p(d_i) / q(d_i)), else draw from
  norm(max(0, p - q)) and stop; all accepted: one more token from p after the last draft. q is
  the draft model's distribution (the same pipeline on its logits) or, for prompt lookup, one-hot
  on d_i. Each emitted token is then distributed exactly as the target's own sample (Leviathan et
  al. 2023, Chen et al. 2023), though a seeded request draws different numbers than without
  speculation.

`Speculator` is what the engine holds: the proposer, K, and the policy that keeps speculation
from ever costing throughput: fewer draft tokens per request as the batch grows, none past
`max_batch` (the step is no longer bound by reading the weights); and, measured as it runs, the
tokens per second of decode steps with and without drafts at each batch size: speculation stays
on only while it is the faster of the two (the slower mode is re-measured for a few steps at
doubling intervals, so a change of workload is noticed and a losing mode costs little).
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from qwen2.engine import runner
from qwen2.engine.fast import F32Linear
from qwen2.engine.paged import BLOCK_SIZE, KVPool, PackedStep, SeqSlice, one_sequence_per_step
from qwen2.engine.sampling import SamplingParams, process_logits
from qwen2.errors import Qwen2Error
from qwen2.quant.blocks import BlockLinear

log = logging.getLogger("qwen2.engine")

METHODS = ("ngram", "draft")
P_MIN = 0.75          # llama.cpp's default --draft-p-min
VOCAB_SLACK = 128     # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
# The draft scores only the first DRAFT_VOCAB ids. Byte-level BPE numbers its tokens in merge
# order, so the low ids are the common ones (96% of the HumanEval solutions' tokens are below
# 32768 in Qwen's vocabulary), and the vocabulary projection is a third of a 0.5B draft's
# weight bytes: scoring a fifth of it makes each draft token about a quarter cheaper. A token
# past it is never drafted, which costs acceptance there, never exactness (FR-Spec, 2025).
DRAFT_VOCAB = 32768
# Tokens the draft model feeds itself at the start of a steady drafting step: the last draft (never
# fed, nothing follows it) and the target's own next token. More means it is catching up (a new
# prompt, or tokens decoded while speculation was off): Speculator.end_step does not time such a step.
STEADY_CATCH_UP = 2


@dataclass
class Proposal:
    """Draft tokens for one request and the distributions they were drawn from."""
    tokens: list[int]
    q: torch.Tensor | None = None   # [len(tokens), V] draft probabilities; None: deterministic (one-hot)


# --------------------------------------------------------------------------------- prompt lookup
def ngram_propose(tokens: Sequence[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """Up to k tokens continuing the most recent earlier occurrence of the longest suffix n-gram
    of `tokens` (n from n_max down to n_min); [] when no suffix n-gram occurred before."""
    if k <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        # windows arr[j:j+n] for j + n <= size - 1: every earlier occurrence that has a successor
        windows = np.lib.stride_tricks.sliding_window_view(arr[:size - 1], n)
        hits = np.flatnonzero((windows == arr[size - n:]).all(axis=1))
        if len(hits):
            j = int(hits[-1]) + n
            return arr[j:j + k].tolist()
    return []


# --------------------------------------------------------------------------------- verification
def verify(logits: torch.Tensor, draft: Sequence[int], q: torch.Tensor | None, greedy: bool,
           generator: torch.Generator | None = None) -> list[int]:
    """The tokens to emit after a verification step: the accepted drafts, then one of the target's.

    logits [k+1, V]: the target's processed logits at the positions of d_1..d_k and after d_k.
    q [k, V]: the draft's probabilities (None: the drafts were deterministic, q one-hot)."""
    k = len(draft)
    if greedy:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < k and best[n] == draft[n]:
            n += 1
        return list(draft[:n]) + [best[n]]
    p = torch.softmax(logits.float(), -1)
    for i, d in enumerate(draft):
        qd = 1.0 if q is None else float(q[i, d])
        if float(torch.rand((), generator=generator)) * qd < float(p[i, d]):
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i].to(p.dtype)).clamp_min_(0.0)
        if not float(residual.sum()) > 0:   # only by rounding: p equals q wherever p > 0
            residual = p[i]
        return list(draft[:i]) + [int(torch.multinomial(residual, 1, generator=generator))]
    return list(draft) + [int(torch.multinomial(p[k], 1, generator=generator))]


# --------------------------------------------------------------------------------- draft model
def check_vocabularies(target_tok, draft_tok, target_cfg, draft_cfg, draft_name: str = "the draft model"):
    """Raise Qwen2Error unless the two models share a vocabulary (the same bytes for every token id
    both tokenizers know; at most VOCAB_SLACK ids more in one), as llama.cpp's speculative checks."""
    if target_tok is None or draft_tok is None:
        if target_cfg.vocab_size != draft_cfg.vocab_size:
            raise Qwen2Error(f"{draft_name} has a vocabulary of {draft_cfg.vocab_size} ids, the target "
                             f"{target_cfg.vocab_size}: speculation needs one shared vocabulary")
        return
    nt, nd = len(target_tok), len(draft_tok)
    if abs(nt - nd) > VOCAB_SLACK:
        raise Qwen2Error(f"{draft_name} has a vocabulary of {nd} tokens, the target {nt}: speculation "
                         f"needs one shared vocabulary (the Qwen2/Qwen2.5 sizes share one)")
    for i in range(min(nt, nd)):
        a, b = _token_bytes(target_tok, i), _token_bytes(draft_tok, i)
        if a != b:
            raise Qwen2Error(f"{draft_name} has another vocabulary than the target: token {i} is {b!r} "
                             f"in the draft, {a!r} in the target")


def _token_bytes(tok, i: int) -> bytes | None:
    try:
        return tok.id_to_bytes(i)
    except (ValueError, TypeError):
        return None


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and p.repetition_penalty == 1 and not p.presence_penalty and not p.frequency_penalty


def num_parameters(model) -> int:
    """Parameters as the config counts them (quantized weights store fewer elements)."""
    c = model.config
    layer = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
             + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size


def _with_head_rows(model, n: int):
    """A shallow copy of `model` (the same weights) whose vocabulary projection has only its first
    n rows; None where the projection's layout cannot be cut so (or a compiled step holds it)."""
    head = model.lm_head
    if getattr(model, "decode_step", None) is not None:
        return None
    if isinstance(head, BlockLinear) and head.bias is None:
        cut = lambda t: None if t is None else t[:n]
        rows = BlockLinear.raw(head.kind, n, head.in_features, cut(head.qweight), cut(head.scales), cut(head.qh),
                               cut(head.offsets), head.zero, cut(head.sscales), cut(head.soffsets))
    elif isinstance(head, F32Linear) and head.bias is None and n % 16 == 0:
        rows = F32Linear(SimpleNamespace(in_features=head.in_features, out_features=n, bias=None),
                         packed=head.packed[:n // 16])
    elif type(head) is torch.nn.Linear and head.bias is None:
        rows = torch.nn.Linear(head.in_features, n, bias=False, device="meta")
        rows.weight = torch.nn.Parameter(head.weight[:n], requires_grad=False)
    else:
        return None
    cut_model = copy.copy(model)
    cut_model._modules = dict(model._modules)   # the copy's own module table: the model keeps its head
    cut_model.lm_head = rows
    return cut_model


class DraftItem(NamedTuple):
    key: object                  # the request (any hashable)
    tokens: list[int]            # prompt + output so far
    k: int                       # draft at most this many tokens
    params: SamplingParams
    generator: torch.Generator | None
    prompt_len: int = 0          # tokens[:prompt_len] is the prompt (penalties)
    cap: int = 0                 # prompt-lookup drafts the draft agrees with: at most this many (0: k)


@dataclass(eq=False)
class _DraftSeq:
    blocks: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)   # tokens whose keys/values are in the draft pool


class DraftModel:
    """A smaller model of the target's vocabulary drafting for it, with its own KV pool.

    State per request (keyed by any hashable): the draft's blocks and the tokens they hold. Each
    `propose` first recomputes whatever the draft does not hold yet (the prompt on first sight,
    then the tokens the target accepted: whatever differs from what the draft fed itself is simply
    not held), so rolling back after a rejection needs no call."""

    def __init__(self, model, tokenizer=None, p_min: float = P_MIN, vocab: int | None = DRAFT_VOCAB,
                 lookup: bool = True):
        """vocab: draft among the first `vocab` ids only (None: all). lookup: check prompt-lookup
        continuations first (greedy requests)."""
        if one_sequence_per_step(model):
            raise Qwen2Error("a model with a long-context attention variant cannot draft (it runs one sequence per step)")
        self.model, self.tokenizer, self.p_min, self.lookup = model, tokenizer, p_min, lookup
        self.n_valid = len(tokenizer) if tokenizer is not None else model.config.vocab_size
        if vocab is not None and vocab < self.n_valid:
            self.model = _with_head_rows(model, vocab) or model
            if self.model is not model:
                self.n_valid = vocab
        self.pool: KVPool | None = None
        self.seqs: dict = {}
        self.lookup_tokens = 0   # drafts taken from prompt lookup (the draft agreeing)
        self.last_catch_up = 0   # the most tokens one request fed the draft to catch up, last propose

    def bind(self, num_tokens: int, block_size: int = BLOCK_SIZE):
        """A fresh pool holding num_tokens tokens (a new engine; the old state is dropped)."""
        nblocks = max(1, -(-num_tokens // block_size))
        with torch.inference_mode():   # as the engine's pool: the compiled step guards on the tensor kind
            self.pool = KVPool(self.model.config, nblocks, block_size, self.model.dtype, self.model.device)
        self.seqs = {}

    def release(self, key):
        seq = self.seqs.pop(key, None)
        if seq is not None:
            self.pool.allocator.release(seq.blocks)

    def retain(self, keys):
        """Free the state of every request but these."""
        keep = set(keys)
        for key in [k for k in self.seqs if k not in keep]:
            self.release(key)

    @torch.inference_mode()
    def propose(self, items: list[DraftItem], vocab: int) -> list[Proposal]:
        """One DraftItem per request; the drafts are returned with their
        distributions q over `vocab` ids (the target's logits width) for sampled requests.

        Greedy requests first have their prompt-lookup continuation (`ngram_propose`) checked
        by the draft in the same forward as the catch-up: the draft keeps the lookup tokens its
        own argmax agrees with, which costs one forward of a few rows instead of one forward
        per token where the answer quotes its input, then drafts on from there as usual."""
        out = [Proposal([]) for _ in items]
        pool, alloc = self.pool, self.pool.allocator
        self.last_catch_up = 0
        rows, slices = [], []   # item index and slice of each request drafting this forward
        lookups = {}            # item index -> the lookup tokens its first slice feeds
        for i, (key, tokens, k, params, _, _, cap) in enumerate(items):
            cap = max(cap, k)
            seq = self.seqs.get(key)
            if seq is None:
                seq = self.seqs[key] = _DraftSeq()
            n = len(tokens)
            held = min(len(seq.fed), n - 1)
            if seq.fed[:held] != list(tokens[:held]):
                held = next(j for j, (a, b) in enumerate(zip(seq.fed, tokens)) if a != b)
            need = pool.blocks_for(n + cap) - len(seq.blocks)
            if need > alloc.num_free:
                self.release(key)   # no room in the draft pool: this request decodes plainly
                continue
            seq.blocks += alloc.allocate(max(need, 0))
            seq.fed = list(tokens[:held])
            feed = list(tokens[held:])
            self.last_catch_up = max(self.last_catch_up, len(feed))
            look = ngram_propose(tokens, cap) if self.lookup and _plain_greedy(params) else []
            if look:
                lookups[i] = look
            slices.append(SeqSlice(feed + look, held, seq.blocks, sample=True, all_logits=bool(look)))
            seq.fed += feed   # lookup tokens count as fed once the draft agrees with them
            rows.append(i)
        drafts = {i: [] for i in rows}
        qs = {i: [] for i in rows}
        while rows:
            logits = self._fit(runner.forward(self.model, PackedStep(pool, slices, self.model.device), pool).float(),
                               vocab)
            checked = {}
            if lookups:
                logits, checked = self._check_lookups(logits, rows, slices, lookups)
            picks, probs, conf = self._pick(logits, [items[i] for i in rows], [drafts[i] for i in rows], vocab)
            nxt_rows, nxt_slices = [], []
            for j, i in enumerate(rows):
                key, k = items[i].key, items[i].k
                seq = self.seqs[key]
                if i in checked:
                    look, (own, own_conf) = lookups[i], checked[i]
                    m = 0
                    while m < len(look) and own[m] == look[m]:
                        m += 1
                    drafts[i] += look[:m]
                    seq.fed += look[:m]
                    self.lookup_tokens += m
                    if m >= k or own_conf[m] < self.p_min:
                        continue
                    pick = own[m]
                else:
                    if conf[j] < self.p_min:
                        continue
                    pick = picks[j]
                    if probs is not None and not items[i].params.greedy:
                        qs[i].append(probs[j])
                drafts[i].append(pick)
                if len(drafts[i]) < k:
                    nxt_slices.append(SeqSlice([pick], len(seq.fed), seq.blocks, sample=True))
                    seq.fed.append(pick)
                    nxt_rows.append(i)
            rows, slices, lookups = nxt_rows, nxt_slices, {}
        for i, d in drafts.items():
            out[i] = Proposal(d, torch.stack(qs[i]) if qs[i] else None)
        return out

    @staticmethod
    def _check_lookups(logits, rows, slices, lookups):
        """Split a first forward's logits: the last row of every slice (what `_pick` takes), and
        for each slice that fed lookup tokens the draft's argmax and top probability after its
        last held token and after each lookup token."""
        body = sum(len(s.token_ids) - 1 for s in slices if s.all_logits)
        tails, checked, r = logits[body:], {}, 0
        for j, (i, s) in enumerate(zip(rows, slices)):
            if not s.all_logits:
                continue
            nb = len(s.token_ids) - 1
            first = nb - len(lookups[i])   # the row after the last token the target accepted
            top = torch.softmax(torch.cat([logits[r + first:r + nb], tails[j:j + 1]]), -1).max(-1)
            checked[i] = (top.indices.tolist(), top.values.tolist())
            r += nb
        return tails, checked

    def _fit(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """The draft's logits on the target's ids (at most `vocab` wide): ids past the draft's
        tokenizer (or its cut head) never drawn."""
        if logits.shape[-1] > self.n_valid:
            logits[:, self.n_valid:] = float("-inf")
        return logits[:, :vocab]

    def _pick(self, logits, items, drafts, vocab: int):
        """One draft token per row: greedy rows their argmax, sampled rows a draw from the draft's
        processed distribution (which is their q, over the target's `vocab` ids); and each row's
        confidence (top probability)."""
        params = [it.params for it in items]
        if all(p.greedy for p in params) and not any(p.repetition_penalty != 1 or p.presence_penalty
                                                       or p.frequency_penalty for p in params):
            top = torch.softmax(logits, -1).max(-1)
            return top.indices.tolist(), None, top.values.tolist()
        # q over the target's ids (and penalties index the history's ids, any of them)
        logits = torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
        hist = [list(it.tokens[it.prompt_len:]) + d for it, d in zip(items, drafts)]
        prompts = [list(it.tokens[:it.prompt_len]) for it in items]
        processed = process_logits(logits, params, hist, prompts)
        probs = torch.softmax(processed, -1)
        picks = []
        for j, (p, it) in enumerate(zip(params, items)):
            if p.greedy:
                picks.append(int(probs[j].argmax()))
            else:
                picks.append(int(torch.multinomial(probs[j], 1, generator=it.generator)))
        return picks, probs, probs.max(-1).values.tolist()


# --------------------------------------------------------------------------------- the engine's part
class Speculator:
    """The proposer, K and the load policy the engine uses (one per LLM / server; `bind` per engine).

    method "ngram": prompt lookup, K default 10 (proposals cost nothing, a miss costs a few rows of
    the verification step); "draft": `draft` is the drafting model (DraftModel or a loaded model),
    K default 5. Policy: with b requests decoding, each gets min(K, budget // b) draft tokens, none
    when b > max_batch (budget default 2K)."""

    def __init__(self, method: str, num_draft_tokens: int | None = None, draft: DraftModel | None = None,
                 n_max: int = 3, n_min: int = 1, max_batch: int = 4, budget: int | None = None,
                 adaptive: bool = True):
        if method not in METHODS:
            raise Qwen2Error(f"speculative method must be one of {', '.join(METHODS)}, not {method!r}")
        if method == "draft" and draft is None:
            raise Qwen2Error("draft-model speculation needs a draft model")
        if method == "ngram" and draft is not None:
            raise Qwen2Error("prompt lookup (ngram) takes no draft model")
        k = num_draft_tokens if num_draft_tokens is not None else (10 if method == "ngram" else 5)
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise Qwen2Error(f"--num-draft-tokens must be a positive integer, not {k!r}")
        if not 1 <= n_min <= n_max:
            raise Qwen2Error(f"prompt lookup n-gram sizes must satisfy 1 <= n_min <= n_max (got {n_min}, {n_max})")
        self.method, self.k, self.draft = method, k, draft
        self.n_max, self.n_min = n_max, n_min
        self.max_batch = max_batch
        self.budget = budget if budget is not None else 2 * k
        self.adaptive = adaptive
        self._rates: dict[int, _Rates] = {}   # batch size -> measured decode rates with and without drafts
        self._step: tuple | None = None       # (batch size, mode, start time) of the step being measured

    def __repr__(self):
        return f"Speculator({self.method}, k={self.k})"

    def bind(self, num_tokens: int, block_size: int = BLOCK_SIZE):
        if self.draft is not None:
            self.draft.bind(num_tokens, block_size)

    def tokens_per_request(self, num_decoding: int) -> int:
        """The load policy: draft tokens per request when num_decoding requests decode."""
        if num_decoding <= 0 or num_decoding > self.max_batch:
            return 0
        return min(self.k, self.budget // num_decoding)

    # -- measured policy: the engine brackets each step with begin_step / end_step
    def begin_step(self, num_decoding: int, decode_only: bool) -> int:
        """Draft tokens per request for this step (0: decode plainly). Steps that only decode are
        timed, per batch size, with drafts ("spec") and without ("plain")."""
        k = self.tokens_per_request(num_decoding)
        self._step = None
        if k == 0 or not decode_only or not self.adaptive:
            return k
        rates = self._rates.setdefault(num_decoding, _Rates())
        mode = rates.choose()
        self._step = (rates, mode, time.perf_counter())
        return k if mode == "spec" else 0

    def end_step(self, tokens: int):
        """The step begun last is over; it gave `tokens` tokens. A drafting step in which the draft
        model first caught up on more than the last step's tokens (a new prompt, or the tokens
        decoded while speculation was off) is not timed: that cost comes once per switch, and
        counted as a step's it made speculation lose its warm-up and every probe (it then stayed
        off where it was 1.4x faster). The mode is measured again on the next step instead; after
        MAX_SKIPPED such steps in a row (requests joining at every step) they count as they are."""
        if self._step is not None:
            rates, mode, t0 = self._step
            self._step = None
            if (mode == "spec" and self.draft is not None and self.draft.last_catch_up > STEADY_CATCH_UP
                    and rates.skipped < rates.MAX_SKIPPED):
                rates.skipped += 1
                if rates.probing or rates.probe_mode == "spec" and rates.since == 0:
                    rates.probing += 1   # this probe step did not count: one more
                return
            rates.skipped = 0
            rates.add(mode, time.perf_counter() - t0, tokens)

    def speculating(self, num_decoding: int) -> bool:
        """Whether speculation is on at this batch size (as far as measured)."""
        if self.tokens_per_request(num_decoding) == 0:
            return False
        r = self._rates.get(num_decoding)
        return r is None or r.best() == "spec"

    def retain(self, keys):
        if self.draft is not None:
            self.draft.retain(keys)

    @property
    def lookup_factor(self) -> int:
        """How many more drafts than k a request may take when they come from prompt lookup and
        the draft model agrees with them (they cost no draft forward of their own)."""
        return 2 if self.draft is not None and self.draft.lookup else 1

    def propose(self, requests: list[tuple], vocab: int) -> list[Proposal]:
        """requests: (key, prompt_ids, output_ids, k, params, generator, cap) per request: k draft
        tokens, at most cap from prompt lookup checked by the draft model."""
        if self.method == "ngram":
            return [Proposal(ngram_propose(list(p) + list(o), k, self.n_max, self.n_min))
                    for _, p, o, k, _, _, _ in requests]
        items = [DraftItem(key, list(p) + list(o), k, params, gen, len(p), cap)
                 for key, p, o, k, params, gen, cap in requests]
        return self.draft.propose(items, vocab)


def check_options(method: str | None, has_draft: bool, num_draft_tokens: int | None) -> bool:
    """Whether these options ask for speculation; mistakes in one line (before any model loads)."""
    if method is None and not has_draft:
        if num_draft_tokens is not None:
            raise Qwen2Error("--num-draft-tokens needs --draft-model or --speculative ngram")
        return False
    if method is not None and method not in METHODS:
        raise Qwen2Error(f"speculative method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "ngram" and has_draft:
        raise Qwen2Error("--speculative ngram takes no --draft-model (use one or the other)")
    k = num_draft_tokens
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise Qwen2Error(f"--num-draft-tokens must be a positive integer, not {k!r}")
    return True


class _Rates:
    """Decode rates (tokens/s over the last steps) with and without drafts at one batch size, and
    which mode the next step takes: each mode is first measured for WARMUP steps; then the faster
    one runs, and the slower one is measured again for PROBE steps after `interval` steps, the
    interval doubling (to MAX_INTERVAL) each time the probe confirms the choice."""
    WARMUP, PROBE, WINDOW, MAX_INTERVAL, MAX_SKIPPED = 4, 2, 16, 512, 4

    def __init__(self):
        self.obs = {"spec": deque(maxlen=self.WINDOW), "plain": deque(maxlen=self.WINDOW)}
        self.interval, self.since, self.probing = 16, 0, 0
        self.skipped = 0   # drafting steps in a row not timed (Speculator.end_step)
        self.probe_mode: str | None = None

    def rate(self, mode: str) -> float:
        o = self.obs[mode]
        return sum(t for _, t in o) / max(sum(s for s, _ in o), 1e-9)

    def best(self) -> str:
        return "spec" if self.rate("spec") >= self.rate("plain") else "plain"

    def choose(self) -> str:
        for mode in ("spec", "plain"):
            if len(self.obs[mode]) < self.WARMUP:
                return mode
        if self.probing:
            self.probing -= 1
            return self.probe_mode
        best = self.best()
        self.since += 1
        if self.since >= self.interval:
            if self.probe_mode is not None and best != self.probe_mode:
                self.interval = min(2 * self.interval, self.MAX_INTERVAL)   # the probe lost again
            self.since, self.probing = 0, self.PROBE - 1
            self.probe_mode = "plain" if best == "spec" else "spec"
            # a probe's old numbers are stale: it is judged on what it does now
            for _ in range(min(self.PROBE, len(self.obs[self.probe_mode]))):
                self.obs[self.probe_mode].popleft()
            return self.probe_mode
        return best

    def add(self, mode: str, seconds: float, tokens: int):
        self.obs[mode].append((seconds, tokens))


def speculator_for(method: str | None, draft_model=None, num_draft_tokens: int | None = None, *,
                   target=None, target_tokenizer=None, draft_tokenizer=None, p_min: float = P_MIN,
                   draft_name: str = "the draft model") -> Speculator | None:
    """The Speculator for the user's options (None: no speculation), their mistakes in one line."""
    if not check_options(method, draft_model is not None, num_draft_tokens):
        return None
    method = method or "draft"
    draft = None
    if draft_model is not None:
        if target is not None:
            check_vocabularies(target_tokenizer, draft_tokenizer, target.config, draft_model.config, draft_name)
            if num_parameters(draft_model) >= num_parameters(target):
                warnings.warn(f"{draft_name} ({num_parameters(draft_model) / 1e9:.1f}B parameters) is not smaller "
                              f"than the target ({num_parameters(target) / 1e9:.1f}B): it will slow decoding down",
                              stacklevel=2)
            if one_sequence_per_step(target):
                raise Qwen2Error("speculation needs a target that runs packed steps (not a long-context "
                                 "attention variant or first-generation Qwen's dynamic NTK)")
        draft = DraftModel(draft_model, draft_tokenizer, p_min)
    elif target is not None and one_sequence_per_step(target):
        raise Qwen2Error("speculation needs a target that runs packed steps (not a long-context "
                         "attention variant or first-generation Qwen's dynamic NTK)")
    return Speculator(method, num_draft_tokens, draft)


def combinable(params: SamplingParams) -> str | None:
    """Why these sampling parameters cannot speculate (None: they can)."""
    if params.prompt_logprobs is not None:
        return "prompt_logprobs"
    return None
