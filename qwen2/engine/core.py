"""Continuous-batching engine: scheduler + paged KV cache + one model forward per step.

Requests join and leave the running batch between steps. Each step packs, for every running
request, either its next decode token or a chunk of its prompt (prefill of newcomers rides along
with the decode of the others), runs the model once over the packed row, samples one token for
every request whose prompt is fully in the cache, and hands each request its new text.

KV memory is a fixed pool of blocks (paged.py). A request is admitted only when the pool can hold
its whole prompt, preempted requests first, then round-robin over groups (one HTTP request's
prompts and choices form a group, so a 1,000-prompt request cannot starve a small one behind it); decode grows a request block by block; when the pool runs dry the most
recently admitted request is preempted (blocks freed, recomputed later from its tokens), so the
oldest requests always make progress and nothing deadlocks.

Prompt logprobs (scoring): a request whose SamplingParams.prompt_logprobs is set gets, with its
first output, `prompt_logprobs`: one entry per prompt token (None for the first, which nothing
precedes), each the token's log-probability under the model's raw distribution (the tokenizer's
vocabulary only) and the N most likely tokens at that position. They come from the logits of
every prompt position as the prompt is prefilled (chunk by chunk; such a request's chunks are
capped at PROMPT_LOGITS_CHUNK tokens to bound the logits' memory); positions scored before a
preemption are not scored again. With max_new_tokens=0 the request finishes ("length") right
after its prompt, with no token drawn: its only output is the prompt's logprobs.

    engine.add_request("r1", prompt_ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0), sink)
    # sink gets RequestOutput(finished=True, prompt_logprobs=[None, TokenLogprob(id, logprob, top), ...])

Thread model: the engine runs in one background thread (the model forward releases the GIL);
`add_request` / `abort` may be called from any thread; outputs are delivered through each
request's `sink` callback, from the engine thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from qwen2.errors import Qwen2Error
from qwen2.engine.request import Row, TokenLogprob
from qwen2.engine.sampling import Logprobs, SamplingParams, make_generator, process_logits, prompt_logprobs, sample
from qwen2.engine.speculative import Proposal, Speculator, verify
from qwen2.engine.lockstep import LockstepError
from qwen2.engine.stats import Histogram
from qwen2.engine import runner
from qwen2.engine.paged import BLOCK_SIZE, KVPool, PackedStep, SeqSlice, block_hashes, one_sequence_per_step
from qwen2.kernels.memory import release_heap

log = logging.getLogger("qwen2.engine")

# Every this many tokens run (one prefill, or so many decode steps) the engine hands freed heap
# pages back to the OS (malloc_trim, ~0.1 ms). Without it a 512-token prefill's activations stayed
# resident through decoding (~140 MB on the 1.5B), and 128 decode steps left ~26 MB of
# fragments (glibc raises its mmap threshold after the first freed logits buffer, so later ones
# come from the heap, whose top is rarely free).
RELEASE_AFTER_TOKENS = 32
PROMPT_LOGITS_CHUNK = 512  # prompt tokens per step of a request that wants prompt logprobs


def _plain_greedy(p: SamplingParams) -> bool:
    return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and not p.logprobs and not p.top_logprobs)


def _fast_argmax(logits: torch.Tensor) -> bool:
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2 or logits.stride(-1) != 1:
        return False
    from qwen2 import kernels
    return kernels.available()


class EngineOverloaded(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; `finished` on the last one)."""
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None    # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None   # with the request's first output


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[RequestOutput], None]
    arrival: float = field(default_factory=time.monotonic)
    num_computed: int = 0               # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finished: bool = False
    # Detokenization, stop ids/strings, held-back text and the length limit: the offline
    # generation loop's per-row state, so that server and offline text agree by construction.
    row: Row | None = None
    generator: torch.Generator | None = None
    # Automatic prefix caching (paged.BlockAllocator): at most cache_limit prompt tokens may come
    # from cached blocks; hashes: the chained hashes of this request's full, computed blocks.
    cache_limit: int = 0
    hashes: list[int] = field(default_factory=list)
    group: str = ""                     # admission is round-robin over groups
    resumed: bool = False               # preempted once: readmitted before anyone else
    score_from: int | None = None       # add_request's, kept for tensor-parallel ranks
    proposal: Proposal | None = None    # draft tokens this step verifies (speculative decoding)

    @property
    def output_ids(self) -> list[int]:
        return self.row.ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    @property
    def scoring(self) -> bool:
        """Prompt logprobs asked for and not all computed yet."""
        lps = self.row.prompt_logprobs
        return lps is not None and len(lps) < len(self.prompt_ids)


class Engine:
    def __init__(self, model, tokenizer=None, *, eos_token_ids=(), max_batch: int = 32,
                 max_model_len: int | None = None, kv_cache_memory: int | None = None,
                 block_size: int = BLOCK_SIZE, max_batched_tokens: int = 1024, max_waiting: int = 1024,
                 lockstep=None, speculator: Speculator | None = None):
        """lockstep (qwen2.engine.lockstep.Lockstep): under tensor parallelism, keeps this rank's
        engine taking the same steps as rank 0's. speculator (qwen2.engine.speculative): draft
        tokens verified in the packed step."""
        self.model = model
        self.lockstep = lockstep
        self.tokenizer = tokenizer
        self.n_valid = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        self.eos_token_ids = set(int(t) for t in eos_token_ids)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.max_batched_tokens = max_batched_tokens
        cfg = model.config
        limit = int(cfg.max_position_embeddings)
        per_block = KVPool.bytes_per_block(cfg, block_size, model.dtype)
        if kv_cache_memory is None:
            # Default: 2 GiB, never more than a full batch of full-length requests needs, never
            # less than one full-length request.
            want = -(-min(max_model_len or limit, limit) // block_size) * per_block
            kv_cache_memory = max(min(2 << 30, want * max_batch), want)
        num_blocks = int(kv_cache_memory) // per_block
        if num_blocks < 1:
            raise Qwen2Error(f"--kv-cache-memory {kv_cache_memory} bytes is less than one KV block "
                             f"({per_block} bytes)")
        self.max_model_len = min(max_model_len or limit, limit)
        if num_blocks * block_size < self.max_model_len:
            if max_model_len:
                raise Qwen2Error(
                    f"--kv-cache-memory {kv_cache_memory} bytes holds {num_blocks * block_size} tokens, "
                    f"fewer than --max-model-len {max_model_len}; raise the first or lower the second")
            self.max_model_len = num_blocks * block_size
        # Inference tensors whoever builds the engine (generate runs under inference_mode, the server
        # does not): the compiled decode step guards on the tensor kind, and a pool of the other kind
        # recompiled it on the server's first decode steps, stalling every stream (#20).
        with torch.inference_mode():
            self.pool = KVPool(cfg, num_blocks, block_size, model.dtype, model.device)
        # Long-context variants that need their sequence alone (paged.one_sequence_per_step) run
        # one request at a time; the rotary is told its prompt length each step.
        self._single = one_sequence_per_step(model)
        if self._single:
            self.max_batch = 1

        self.waiting: deque[Request] = deque()
        self._turns: dict[str, int] = {}   # group -> admission count when it was last served (or arrived)
        self._admissions = 0
        self.running: list[Request] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)   # (time, tokens) per step
        # busy_seconds: time inside step() with work; decode_*: the steps that only decoded
        # (one token per running request), the steady state of a loaded server.
        # spec_*: speculative decoding (qwen2.engine.speculative): verification slices, draft
        # tokens proposed and accepted, tokens emitted by verification slices.
        self._unreleased = 0  # tokens run since the last release_heap
        self.stats = SimpleNamespace(prompt_tokens=0, generation_tokens=0, steps=0, preemptions=0,
                                     finished={}, ttft=Histogram(), busy_seconds=0.0,
                                     decode_steps=0, decode_seconds=0.0,
                                     spec_steps=0, spec_proposed=0, spec_accepted=0, spec_emitted=0)
        self.spec = speculator
        if speculator is not None:
            if self._single or lockstep is not None:
                raise Qwen2Error("speculative decoding needs a model that runs packed steps on one process "
                                 "(not tensor parallelism, a long-context attention variant or "
                                 "first-generation Qwen's dynamic NTK)")
            speculator.bind(min(num_blocks, self.pool.blocks_for(self.max_model_len) * speculator.max_batch)
                            * block_size, block_size)

    # ------------------------------------------------------------------ public, any thread
    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + self._inbox.qsize()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.allocator.num_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of admitted prompt tokens served from the prefix cache."""
        return self.pool.allocator.hit_rate

    def recent_tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        return sum(n for t, n in list(self._recent) if now - t <= window) / window

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    sink: Callable[[RequestOutput], None], score_from: int | None = None,
                    group: str | None = None, check_waiting: bool = True) -> Request:
        """score_from (with params.prompt_logprobs): only the prompt tokens from this index on are
        scored (their entries before it stay None), so the prefix cache may supply the tokens
        before it; without it a scoring request computes its whole prompt.
        group: requests of one group (default: each its own) share one turn of the round-robin
        admission. check_waiting=False: exempt from max_waiting (a caller that keeps a bounded
        number of its own requests queued, refilling as they finish)."""
        if self._stopping:
            raise EngineStopped("server is shutting down")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the maximum context length is "
                             f"{self.max_model_len} (including at least one generated token)")
        if check_waiting and self.num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"{self.num_waiting} requests are already waiting")
        req = self.new_request(request_id, prompt_ids, params, sink, group=group, score_from=score_from)
        self._inbox.put(req)
        self._wake.set()
        return req

    def new_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    sink: Callable[[RequestOutput], None], *, group: str | None = None,
                    score_from: int | None = None) -> Request:
        """The request add_request queues, checked but not queued (tensor-parallel ranks other
        than 0 make rank 0's requests with it)."""
        limit = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        req = Request(request_id, list(prompt_ids), params, sink,
                      row=Row(list(prompt_ids), params, limit, self.tokenizer, self.eos_token_ids),
                      generator=make_generator(params.seed, self.model.device), group=group or request_id,
                      score_from=score_from)
        if req.row.prompt_logprobs is None:
            req.cache_limit = len(req.prompt_ids) - 1   # the last prompt token's logits are needed
        elif score_from:
            score_from = min(int(score_from), len(req.prompt_ids) - 1)
            req.row.prompt_logprobs = [None] * max(score_from, 1)
            req.cache_limit = max(score_from - 1, 0)
        if self._single:
            req.cache_limit = 0   # dynamic-NTK keys depend on the prompt's length
        return req

    def abort(self, request_id: str):
        """Stop a request (client gone); its blocks are freed at the next step."""
        self._aborts.put(request_id)
        self._wake.set()

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="qwen2-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0):
        """Stop taking requests, fail whatever is still pending, stop the thread. The thread ends
        after its current step and fails what is pending itself; only if it is gone already
        (or was never started) is that done here, so the two never race over the queues. A step
        that outlives `timeout` (a compile, a huge prefill) is left to finish on its own."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._fail_all("server is shutting down")
        if self.lockstep is not None:
            self.lockstep.stop()

    # ------------------------------------------------------------------ engine thread
    def _loop(self):
        try:
            self._steps()
        finally:
            self._fail_all("server is shutting down")

    def _steps(self):
        while not self._stopping:
            self._wake.clear()
            try:
                worked = self.step()
            except LockstepError as e:  # a tensor-parallel rank is gone: nothing can run any more
                self._stopping = True
                self._fail_all(str(e))
                self.lockstep.fatal(str(e))
                return
            except Exception as e:  # never let one bad step kill the server
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")
                worked = False
            if not worked:
                self._wake.wait(0.5)

    def _drain(self):
        new = self._take_inbox()
        aborted = set()
        while True:
            try:
                aborted.add(self._aborts.get_nowait())
            except queue.Empty:
                break
        if self.lockstep is not None:
            new, aborted = self.lockstep.exchange(self, new, aborted)
        self._enqueue(new)
        if aborted:
            for req in [r for r in list(self.waiting) + self.running if r.id in aborted]:
                self._finish(req, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or not self._inbox.empty())

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling step + one forward. Returns False when there was nothing to do.

        What goes wrong for one request fails that request alone (an error output), and the batch
        goes on: scoring, sampling and detokenizing are guarded per request, a batch whose logits
        processing raises is sampled again row by row, and a forward that raises is run again one
        request at a time, so that only the request(s) it belongs to fail."""
        self._drain()
        t0 = time.perf_counter()
        plan = self._schedule()
        if not plan:
            return False
        if self.spec is not None:
            self._speculate(plan)
            generated = self.stats.generation_tokens
        try:
            runs = [(plan, *self._forward(plan))]
        except Exception as e:
            runs = self._forward_alone(plan, e)
        for sub, packed, logits in runs:
            self._consume(sub, packed, logits)
        if self.spec is not None:
            self.spec.end_step(self.stats.generation_tokens - generated)
        self._unreleased += sum(len(s.token_ids) for _, s in plan)
        if self._unreleased >= RELEASE_AFTER_TOKENS:
            release_heap()
            self._unreleased = 0
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.busy_seconds += dt
        if not any(packed.prefills for _, packed, _ in runs) and len(runs) == 1:
            self.stats.decode_steps += 1
            self.stats.decode_seconds += dt
        return True

    def _forward(self, plan: list[tuple[Request, SeqSlice]]) -> tuple[PackedStep, torch.Tensor]:
        packed = PackedStep(self.pool, [s for _, s in plan], self.model.device, single=self._single)
        return packed, runner.forward(self.model, packed, self.pool,
                                      len(plan[0][0].prompt_ids) if self._single else None)

    def _forward_alone(self, plan, err: Exception) -> list:
        """After a failed forward: each request of the step alone (its keys and values are written
        again at the same slots), failing only those whose own forward fails."""
        if len(plan) == 1:
            self._fail(plan[0][0], err, "running the model")
            return []
        log.warning("engine step of %d requests failed (%s: %s); running them one at a time",
                    len(plan), type(err).__name__, err)
        runs = []
        for item in plan:
            try:
                runs.append(([item], *self._forward([item])))
            except Exception as e:
                self._fail(item[0], e, "running the model")
        return runs

    def _consume(self, plan, packed: PackedStep, logits: torch.Tensor):
        """One forward's logits: prompt scores, then one token for each request that samples."""
        sampling, tails, row, tail = [], [], 0, packed.num_prompt_logits
        verifying = []
        for req, s in plan:
            if s.all_logits:
                nb = len(s.token_ids) - s.sample
                if req.proposal is not None:
                    verifying.append((req, row, tail))
                else:
                    self._guard(req, "scoring the prompt", self._score_prompt, req, s.start, logits[row:row + nb])
                row += nb
            if req.finished:
                tail += s.sample
                continue
            if req.proposal is not None:
                req.num_computed += 1   # the drafts' keys count once they are accepted (_accept)
                self._register_blocks(req)
                tail += 1
                continue
            req.num_computed += len(s.token_ids)
            self._register_blocks(req)
            if s.sample:
                if req.row.limit > 0:
                    sampling.append(req)
                    tails.append(tail)
                else:   # scoring only: the prompt's logprobs are the whole answer
                    self._finish_scored(req)
                tail += 1
        if sampling:
            contiguous = tails == list(range(tails[0], tails[0] + len(tails)))
            self._sample(sampling, logits[tails[0]:tails[-1] + 1] if contiguous else logits[torch.tensor(tails)])
            self._recent.append((time.monotonic(), len(sampling)))
        for req, row, tail in verifying:
            if not req.finished:
                k = len(req.proposal.tokens)
                self._guard(req, "verifying draft tokens", self._accept, req,
                            torch.cat([logits[row:row + k], logits[tail:tail + 1]]))
            req.proposal = None

    # ------------------------------------------------------------------ speculative decoding
    def _speculate(self, plan: list[tuple[Request, SeqSlice]]):
        """Turn this step's decode slices into verification slices ([last token, d1..dk], the
        logits of each) where the proposer has drafts; k per request from the speculator's load
        policy. Drafts never preempt anyone: a request without room decodes plainly."""
        spec = self.spec
        spec.retain(self.running)
        decoding = [j for j, (req, s) in enumerate(plan)
                    if s.sample and not s.all_logits and len(s.token_ids) == 1]
        k = spec.begin_step(len(decoding), decode_only=len(decoding) == len(plan))
        budget = self.max_batched_tokens - sum(len(s.token_ids) for _, s in plan)
        asks = []
        for j in decoding:
            req = plan[j][0]
            room = min(req.row.limit - len(req.output_ids) - 1, budget)   # drafts this request may take
            n = min(k, room)
            if n > 0:
                asks.append((j, n, min(spec.lookup_factor * n, room)))
                budget -= asks[-1][2]
        if not asks:
            return
        try:
            proposals = spec.propose([(plan[j][0], plan[j][0].prompt_ids, plan[j][0].output_ids, n,
                                       plan[j][0].params, plan[j][0].generator, cap) for j, n, cap in asks],
                                     self.model.config.vocab_size)
        except Exception:   # a failing proposer costs the speedup, never the requests
            log.exception("speculative proposer failed; decoding without drafts this step")
            return
        alloc = self.pool.allocator
        for (j, _, _), prop in zip(asks, proposals):
            req, s = plan[j]
            if not prop.tokens:
                continue
            need = self.pool.blocks_for(s.start + 1 + len(prop.tokens)) - len(req.blocks)
            if need > alloc.num_free:
                continue
            req.blocks += alloc.allocate(max(need, 0))
            req.proposal = prop
            plan[j] = (req, SeqSlice(s.token_ids + prop.tokens, s.start, req.blocks, sample=True, all_logits=True))

    def _accept(self, req: Request, logits: torch.Tensor):
        """A verification slice's logits [k+1, V]: the accepted drafts and the target's own token
        are emitted one by one (stop ids, stop strings and the length limit cut them as in plain
        decoding); the keys past the last accepted draft are dropped."""
        prop, params = req.proposal, req.params
        drafts, k = prop.tokens, len(prop.tokens)
        n_valid = self.n_valid if self.n_valid is not None and self.n_valid < logits.shape[-1] else logits.shape[-1]
        lp = None
        if _plain_greedy(params) and _fast_argmax(logits):
            best = torch.ops.qwen2.argmax_rows(logits, n_valid).tolist()
            n = 0
            while n < k and best[n] == drafts[n]:
                n += 1
            tokens = drafts[:n] + [best[n]]
        else:
            if n_valid < logits.shape[-1]:
                logits[:, n_valid:] = float("-inf")
            hist = [req.output_ids + drafts[:i] for i in range(k + 1)]
            logits = process_logits(logits, [params] * (k + 1), hist, [req.prompt_ids] * (k + 1))
            tokens = verify(logits, drafts, prop.q, params.greedy, req.generator)
            if req.row.logprobs is not None:
                logp = torch.log_softmax(logits[:len(tokens)], dim=-1)
                ids = torch.tensor(tokens)[:, None]
                top_values, top_ids = logp.topk(params.top_logprobs, dim=-1) if params.top_logprobs \
                    else (logp[:, :0], ids[:, :0])
                lp = Logprobs(logp.gather(1, ids)[:, 0], top_ids, top_values)
        st = self.stats
        st.spec_steps += 1
        st.spec_proposed += k
        st.spec_accepted += len(tokens) - 1
        start = req.num_computed   # the slice's last token is in (_consume)
        now = time.monotonic()
        for i, tok in enumerate(tokens):
            st.spec_emitted += 1   # before the token is delivered: a client may read /metrics right after
            self._emit(req, i, tok, lp, now)
            if req.finished:
                break
        self._recent.append((now, i + 1))
        if not req.finished:
            req.num_computed = start + len(tokens) - 1
            self._register_blocks(req)
            keep = self.pool.blocks_for(req.num_tokens)
            self.pool.allocator.release(req.blocks[keep:])
            del req.blocks[keep:]

    def _fail(self, req: Request, err: Exception, what: str):
        log.error("request %s: %s failed", req.id, what, exc_info=err)
        self._finish(req, "error", error=f"internal error while {what}: {type(err).__name__}: {err}")

    def _guard(self, req: Request, what: str, fn, *args):
        """fn(*args); if it raises, the request fails and the others go on."""
        try:
            fn(*args)
        except Exception as e:
            self._fail(req, e, what)

    def _schedule(self) -> list[tuple[Request, SeqSlice]]:
        budget = self.max_batched_tokens
        plan = []
        alloc = self.pool.allocator
        for req in list(self.running):
            if req not in self.running or budget <= 0:
                continue
            n = self._chunk(req, budget)
            need = self.pool.blocks_for(req.num_computed + n) - len(req.blocks)
            while need > alloc.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req not in self.running:
                continue
            req.blocks += alloc.allocate(max(need, 0))
            plan.append((req, self._slice(req, n)))
            budget -= n
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            req = self._next_waiting()
            # Admit only if the whole prompt (+ its first token) fits: no thrashing on arrival.
            hit = self._match_prefix(req)
            if self.pool.blocks_for(req.num_tokens + 1) - len(hit) > alloc.num_free:
                self._unmatch(req)
                break
            self.waiting.remove(req)
            self._admissions += 1
            self._turns[req.group] = self._admissions
            self.running.append(req)
            n = self._chunk(req, budget)
            req.blocks += alloc.allocate(self.pool.blocks_for(req.num_computed + n) - len(req.blocks))
            plan.append((req, self._slice(req, n)))
            budget -= n
        return plan

    def _next_waiting(self) -> Request:
        """Who is admitted next: a preempted request, else round-robin over groups (the group
        served, or arrived, longest ago), each group's requests in arrival order."""
        if self.waiting[0].resumed:
            return self.waiting[0]
        if len(self._turns) > 2 * len(self.waiting) + 64:   # forget groups with nothing waiting
            self._turns = {r.group: self._turns[r.group] for r in self.waiting}
        return min(self.waiting, key=lambda r: self._turns.get(r.group, -1))

    @staticmethod
    def _chunk(req: Request, budget: int) -> int:
        n = min(req.num_tokens - req.num_computed, budget)
        if not req.scoring:
            return n
        # Positions before the first one that scores a wanted token need no logits (the vocabulary
        # projection costs a third of a small model's forward): they are a chunk of their own.
        first = len(req.row.prompt_logprobs) - 1
        if req.num_computed < first:
            return min(n, first - req.num_computed)
        return min(n, PROMPT_LOGITS_CHUNK)

    @staticmethod
    def _slice(req: Request, n: int) -> SeqSlice:
        start = req.num_computed
        ids = [req.token(i) for i in range(start, start + n)]
        sample = start + n == req.num_tokens
        # logits of every position that scores a prompt token not scored yet (position p scores
        # token p + 1; positions scored before a preemption are not wanted again)
        last = start + n - 1 - sample
        scores = (req.scoring and n - sample > 0 and last >= len(req.row.prompt_logprobs) - 1
                  and start < len(req.prompt_ids) - 1)
        return SeqSlice(ids, start, req.blocks, sample=sample, all_logits=scores)

    def _score_prompt(self, req: Request, start: int, logits: torch.Tensor):
        """Prompt logprobs from the logits of positions start.. (row j scores token start + j + 1)."""
        lps, prompt = req.row.prompt_logprobs, req.prompt_ids
        first, end = len(lps) - 1 - start, min(logits.shape[0], len(prompt) - 1 - start)
        if end <= first:
            return
        rows = logits[first:end]
        if self.n_valid is not None and self.n_valid < rows.shape[-1]:
            rows = rows[:, :self.n_valid]   # padding rows of the embedding are no tokens
        targets = torch.tensor(prompt[start + first + 1:start + end + 1], device=rows.device)
        k = req.params.prompt_logprobs
        tok, ids, vals = prompt_logprobs(rows, targets, min(k, rows.shape[-1]))
        for t, v, top_ids, top_vals in zip(targets.tolist(), tok.tolist(), ids.tolist(), vals.tolist()):
            lps.append(TokenLogprob(t, v, [(a, b) for a, b in zip(top_ids, top_vals) if b != float("-inf")]))

    def _finish_scored(self, req: Request):
        """A max_new_tokens=0 request whose prompt is in: done, its prompt logprobs its output."""
        self.stats.prompt_tokens += len(req.prompt_ids)
        req.row.finish = "length"
        self._finish(req, "length", RequestOutput(req.id, prompt_logprobs=req.row.prompt_logprobs))

    def _match_prefix(self, req: Request) -> list[int]:
        """Start a request on the cached blocks of its longest cached prefix."""
        alloc, bs = self.pool.allocator, self.pool.block_size
        hashes = block_hashes(req.prompt_ids[:req.cache_limit], bs)
        hit = alloc.match(hashes)
        req.blocks, req.hashes, req.num_computed = hit, hashes[:len(hit)], len(hit) * bs
        alloc.query_tokens += len(req.prompt_ids)
        alloc.hit_tokens += req.num_computed
        return hit

    def _unmatch(self, req: Request):
        alloc = self.pool.allocator
        alloc.query_tokens -= len(req.prompt_ids)
        alloc.hit_tokens -= req.num_computed
        alloc.release(req.blocks)
        req.blocks, req.hashes, req.num_computed = [], [], 0

    def _register_blocks(self, req: Request):
        """Offer the request's newly completed full blocks to the prefix cache."""
        bs = self.pool.block_size
        full = min(req.num_computed // bs, len(req.blocks))
        if self._single or full <= len(req.hashes):
            return
        old = len(req.hashes)
        req.hashes = block_hashes([req.token(i) for i in range(full * bs)], bs, req.hashes)
        for b, h in zip(req.blocks[old:full], req.hashes[old:full]):
            self.pool.allocator.register(b, h)

    def _preempt(self, req: Request):
        """Free a running request's blocks; it recomputes from its tokens when readmitted."""
        self.running.remove(req)
        self.pool.allocator.release(req.blocks)
        req.blocks, req.hashes, req.num_computed = [], [], 0
        req.resumed = True
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _sample(self, reqs: list[Request], logits: torch.Tensor):
        try:
            tokens, lp = self._pick(reqs, logits)
        except Exception as e:
            if len(reqs) == 1:
                self._fail(reqs[0], e, "sampling")
                return
            # one request's parameters broke the batch's logits processing: each row alone
            for i, req in enumerate(reqs):
                self._sample([req], logits[i:i + 1])
            return
        now = time.monotonic()
        for i, (req, tok) in enumerate(zip(reqs, tokens.tolist())):
            self._guard(req, "detokenizing", self._emit, req, i, tok, lp, now)

    def _pick(self, reqs: list[Request], logits: torch.Tensor):
        params = [r.params for r in reqs]
        n_valid = self.n_valid if self.n_valid is not None and self.n_valid < logits.shape[-1] else logits.shape[-1]
        if all(_plain_greedy(p) for p in params) and _fast_argmax(logits):
            # Greedy without penalties or logprobs: the argmax over the valid vocabulary, which
            # is all process_logits + sample would compute (torch's argmax is single-threaded
            # and slow on [16, 151936]).
            tokens, lp = torch.ops.qwen2.argmax_rows(logits, n_valid), None
        else:
            # Embedding rows past the tokenizer's vocabulary are padding: never sample them (as the
            # offline loop does).
            if n_valid < logits.shape[-1]:
                logits[:, n_valid:] = float("-inf")
            logits = process_logits(logits, params, [r.output_ids for r in reqs], [r.prompt_ids for r in reqs])
            tokens, lp = sample(logits, params, [r.generator for r in reqs])
        return tokens, lp

    def _emit(self, req: Request, i: int, tok: int, lp, now: float):
        """Hand one request its sampled token (text, logprobs; the prompt's with the first)."""
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.ttft.observe(now - req.arrival)
        self.stats.generation_tokens += 1
        tlp = None
        if req.row.logprobs is not None:
            k = req.params.top_logprobs
            top = [(a, v) for a, v in zip(lp.top_ids[i, :k].tolist(), lp.top_values[i, :k].tolist())
                   if v != float("-inf")]
            tlp = TokenLogprob(tok, float(lp.token[i]), top)
        text = req.row.add(tok, tlp)
        out = RequestOutput(req.id, text=text, token_ids=[tok], logprobs=[tlp] if tlp else [])
        if len(req.output_ids) == 1:
            out.prompt_logprobs = req.row.prompt_logprobs
        if req.row.finish:
            self._finish(req, req.row.finish, out)
        else:
            out.prompt_tokens, out.completion_tokens = len(req.prompt_ids), len(req.output_ids)
            self._deliver(req, out)

    def _finish(self, req: Request, reason: str, out: RequestOutput | None = None, error: str | None = None):
        if req.finished:
            return
        req.finished = True
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.allocator.release(req.blocks)
        req.blocks = []
        out = out or RequestOutput(req.id)
        out.finished, out.finish_reason, out.error = True, reason, error
        out.prompt_tokens, out.completion_tokens = len(req.prompt_ids), len(req.output_ids)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._deliver(req, out)

    def _deliver(self, req: Request, out: RequestOutput):
        try:
            req.sink(out)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("request %s: output sink failed", req.id)

    def _fail_all(self, message: str):
        self._drain_inbox_only()
        for req in list(self.waiting) + list(self.running):
            self._finish(req, "error", error=message)

    def _drain_inbox_only(self):
        self._enqueue(self._take_inbox())

    def _take_inbox(self) -> list[Request]:
        new = []
        while True:
            try:
                new.append(self._inbox.get_nowait())
            except queue.Empty:
                return new

    def _enqueue(self, new: list[Request]):
        for req in new:
            self.waiting.append(req)
            self._turns.setdefault(req.group, self._admissions)   # a new group queues behind those waiting

    # ------------------------------------------------------------------ offline helper
    def run_until_done(self):
        """Drive the engine in the calling thread until every request has finished (tests,
        benchmarks without a server). Not to be mixed with start()."""
        while self.has_work():
            self.step()
