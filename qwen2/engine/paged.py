"""Paged KV cache for the engine.

Keys and values live in one pool per layer, cut into fixed-size blocks; each sequence owns a
block table (list of block ids), so memory is taken block by block as a sequence grows and is
returned the moment it ends. A `PackedStep` is the per-step view the model sees through the
cache protocol of docs/ARCHITECTURE.md: all tokens of all scheduled sequences are packed into one
row ([1, N]); `update` writes this step's keys and values into their slots and hands the pool
itself on (no copy), and the attention wrapper gathers from it what each sequence needs.

Packing breaks the model's position-only masking (two sequences share the row), so the step
attends itself (`attends`, `attend`): each layer's own kernel runs per sequence (prefills) and
once for all decoding sequences. Layers with an attention of their own (dual chunk attention)
get single-sequence steps instead: the step hands them their sequence's keys in position order. For float32 with qwen2's kernels built,
decode attention reads each row's keys and values in place from their pool slots
(`torch.ops.qwen2.paged_attention`); otherwise their keys are gathered from the pool straight into
a padded [n, kv_heads, S, head_dim] batch, one gather per layer, and with the plain SDPA kernel
each group of query heads is folded onto its KV head instead of copying the keys once per query
head. Masks and slot indices are built once per step, not per layer.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen2.model.decoder import build_mask, sdpa_attention


class BlockAllocator:
    """Block ids with reference counts and automatic prefix caching.

    A full block of computed tokens is registered under a hash of its tokens chained with the
    hash of everything before it (`block_hashes`), so equal prefixes map to equal hash chains. A
    new request takes the longest chain of registered blocks matching its prompt (`match`) instead
    of computing those tokens again: the few-shot prefix shared by a benchmark's questions, a
    server's shared system prompt. A block is shared by reference count; when the last user
    releases it, it stays cached (least recently used first out) until its slot is needed:
    `allocate` takes never-cached blocks first, then evicts. Blocks in use are never evicted.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))            # holding nothing worth keeping
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}               # block -> hash of its prefix chain
        self._by_hash: dict[int, int] = {}               # hash -> block
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        self.hit_tokens = 0                              # prompt tokens served from the cache
        self.query_tokens = 0                            # prompt tokens of admitted requests

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"KV cache: {n} blocks requested, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]):
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def match(self, hashes: list[int]) -> list[int]:
        """Take a reference on the registered blocks of the longest matching prefix of `hashes`."""
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            if self._ref[b] == 0:
                del self._cached[b]
            self._ref[b] += 1
            out.append(b)
        return out

    def register(self, block: int, h: int):
        """Record that `block` holds the full block whose prefix chain hashes to `h`."""
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h], self._hash_of[block] = block, h


def block_hashes(tokens: list[int], block_size: int, start: list[int] | None = None) -> list[int]:
    """Chained hashes of the full blocks of `tokens` (extending `start`, the hashes so far)."""
    out = list(start or [])
    prev = out[-1] if out else None
    for i in range(len(out) * block_size, len(tokens) - block_size + 1, block_size):
        prev = hash((prev, tuple(tokens[i:i + block_size])))
        out.append(prev)
    return out


BLOCK_SIZE = 16  # tokens per KV block, the engine's default


class KVPool:
    """Per layer a key and a value tensor [num_blocks * block_size, n_kv, head_dim]: slot-major,
    so that one slot (all KV heads of one position) is one contiguous run of memory and gathering
    a batch of slots is one pass."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype, device=None):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.sliding_window = config.sliding_window
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype) -> int:
        return config.kv_bytes_per_token(dtype) * block_size

    @staticmethod
    def bytes_for(config, lengths, dtype, block_size: int = BLOCK_SIZE) -> int:
        """Bytes of a pool that holds sequences of these token counts, each in whole blocks."""
        return sum(-(-n // block_size) for n in lengths) * KVPool.bytes_per_block(config, block_size, dtype)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of positions start..end-1 of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def slot(self, block_table: list[int], pos: int) -> int:
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass
class SeqSlice:
    """One sequence's share of a step: new tokens at positions start..start+n-1."""
    token_ids: list[int]      # the n new tokens
    start: int                # position of the first new token (= tokens already cached)
    block_table: list[int]
    sample: bool              # logits of the last new token are wanted
    all_logits: bool = False  # and of every other new token (prompt logprobs)


@dataclass
class _Prefill:
    q_index: torch.Tensor     # where this sequence's queries sit in the packed row
    key_slots: torch.Tensor   # [S] pool slots of its keys, positions 0..S-1
    q_pos: torch.Tensor       # [1, T]
    k_pos: torch.Tensor       # [1, S]
    fresh: bool               # whole sequence in this step: plain causal attention


@dataclass
class _Decode:
    q_index: torch.Tensor | None  # [n] packed index of each decoding token (None: the whole row, in order)
    key_slots: torch.Tensor   # [n * S_max] pool slots, row-major (padding -> slot 0, masked)
    n: int
    s_max: int
    q_pos: torch.Tensor       # [n, 1]
    k_pos: torch.Tensor       # [n, S_max] (-1 = padding)
    padded: bool              # some row is shorter than S_max
    lens: torch.Tensor        # [n] keys per row (q_pos + 1)


DECODE_ROWS = 16   # continuations of at most this many tokens attend as decode rows


class PackedStep:
    """The cache object for one engine step (see the module docstring).

    Packed order: the tokens of each sequence except its last sampled one (those of `all_logits`
    sequences last), then the last tokens of all sampling sequences, in `slices` order, so
    `logits_to_keep=num_logits` yields the `all_logits` rows (num_prompt_logits of them, in
    `slices` order) and then exactly one row per sampling sequence. A step of decodes only is just
    their tokens in order.
    """

    def __init__(self, pool: KVPool, slices: list[SeqSlice], device=None, single: bool = False):
        self.pool = pool
        bs = pool.block_size
        body_ids, body_pos, body_slots = [], [], []
        rank = {i: r for r, i in enumerate(i for i, s in enumerate(slices) if s.sample)}
        tail_ids, tail_pos, tail_slots = [0] * len(rank), [0] * len(rank), [0] * len(rank)
        dec, self.prefills = [], []
        rows_as_decodes = not single and _paged_kernel(pool.k[0], pool.k[0])
        nbody = sum(len(s.token_ids) - s.sample for s in slices)
        self.num_prompt_logits = sum(len(s.token_ids) - s.sample for s in slices if s.all_logits)
        for i in sorted(range(len(slices)), key=lambda i: slices[i].all_logits):
            s = slices[i]
            n = len(s.token_ids)
            end = s.start + n
            nb = n - s.sample
            b0 = len(body_ids)
            if nb:
                body_ids += s.token_ids[:nb]
                body_pos += range(s.start, s.start + nb)
                body_slots += [pool.slot(s.block_table, p) for p in range(s.start, s.start + nb)]
            tail = None
            if s.sample:
                r = rank[i]
                tail = nbody + r
                tail_ids[r], tail_pos[r], tail_slots[r] = s.token_ids[-1], end - 1, pool.slot(s.block_table, end - 1)
            if n == 1 and s.sample:
                dec.append((tail, end, s.block_table))
                continue
            if rows_as_decodes and s.start > 0 and n <= DECODE_ROWS:
                # A short continuation (draft tokens to verify, a draft model's catch-up): each
                # token a decode row of its own length, on the paged kernel, as plain decoding
                # computes it; SDPA's gathers and OpenMP regions cost more than these few rows.
                dec += [(b0 + j, s.start + j + 1, s.block_table) for j in range(nb)]
                if tail is not None:
                    dec.append((tail, end, s.block_table))
                continue
            idx = list(range(b0, b0 + nb)) + ([tail] if tail is not None else [])
            self.prefills.append(_Prefill(
                q_index=torch.tensor(idx, device=device), key_slots=pool.slots(s.block_table, 0, end).to(device),
                q_pos=torch.arange(s.start, end, device=device)[None],
                k_pos=torch.arange(end, device=device)[None], fresh=s.start == 0))

        self.num_tokens = nbody + len(tail_ids)
        self.num_logits = self.num_prompt_logits + len(tail_ids)
        self.input_ids = torch.tensor([body_ids + tail_ids], dtype=torch.long, device=device)
        self.position_ids = torch.tensor([body_pos + tail_pos], dtype=torch.long, device=device)
        self.new_slots = torch.tensor(body_slots + tail_slots, dtype=torch.long, device=device)
        self.next_pos = self.position_ids.max(dim=1).values + 1

        self.decode = None
        if dec:
            dec.sort(key=lambda d: d[0])
            n, lens = len(dec), [e for _, e, _ in dec]
            smax, nblk = max(lens), max(len(bt) for _, _, bt in dec)
            tables = torch.tensor([bt + [0] * (nblk - len(bt)) for _, _, bt in dec], dtype=torch.long)
            slots = (tables[:, :, None] * bs + torch.arange(bs)).reshape(n, nblk * bs)[:, :smax]
            ar = torch.arange(smax)
            lens_t = torch.tensor(lens)
            valid = ar[None] < lens_t[:, None]
            padded = min(lens) != smax
            if padded:
                slots = torch.where(valid, slots, 0)
            in_order = not self.prefills and [t for t, _, _ in dec] == list(range(n))
            self.decode = _Decode(
                q_index=None if in_order else torch.tensor([t for t, _, _ in dec], device=device),
                key_slots=slots.reshape(-1).to(device), n=n, s_max=smax,
                q_pos=(lens_t - 1)[:, None].to(device),
                k_pos=torch.where(valid, ar[None], -1).to(device), padded=padded, lens=lens_t.to(device))
        self._masks: dict = {}
        # Single-sequence mode, for layers with an attention of their own (dual chunk attention):
        # the step is then a plain cache to the model, handing each layer this sequence's keys
        # in position order, and the model's own masking applies.
        self.single = single
        if single:
            if len(slices) != 1:
                raise ValueError("a single-sequence step takes one sequence")
            end = slices[0].start + len(slices[0].token_ids)
            self.attends = False
            self._key_slots = pool.slots(slices[0].block_table, 0, end).to(device)
            self._key_pos = torch.arange(end, device=device)[None]

    # -- the cache protocol -------------------------------------------------------------------
    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """The model's own masks are not used in a packed step (`attend` builds its own);
        returning the query positions as key positions keeps the model on its no-mask path."""
        assert positions.shape == self.position_ids.shape, "PackedStep drives its own positions"
        return self._key_pos if self.single else self.position_ids

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys/values ([1, n_kv, N, head_dim]) into their slots; returns the
        layer's pools [slots, n_kv, head_dim] for `attend` to gather from."""
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pk.index_copy_(0, self.new_slots, k[0].transpose(0, 1))
        pv.index_copy_(0, self.new_slots, v[0].transpose(0, 1))
        if self.single:
            s = self._key_slots.shape[0]
            return _gather(pk, self._key_slots, 1, s), _gather(pv, self._key_slots, 1, s)
        return pk, pv

    attends = True  # the model hands each layer's attention to `attend` (one row, many sequences)

    def attend(self, attn, q, k, v):
        """A layer's attention over the packed row: each prefill against its own keys, all
        decoding rows at once. q [1, H, N, D]; k, v: the layer's pools from `update`."""
        inner = attn.attn_fn
        window = self.pool.sliding_window if attn.sliding else None
        d = self.decode
        if d is not None and d.q_index is None:
            # Decodes only, in packed order: q [1, H, n, D] -> [n, H, 1, D] is a view.
            od = self._decode(inner, window, q[0].transpose(0, 1)[:, :, None], k, v)       # [n, H, 1, D]
            return od[:, :, 0].transpose(0, 1)[None]
        out = torch.empty_like(q)
        for i, p in enumerate(self.prefills):
            qi = q.index_select(2, p.q_index)
            s = p.key_slots.shape[0]
            ki, vi = _gather(k, p.key_slots, 1, s), _gather(v, p.key_slots, 1, s)
            m, causal = self.prefill_mask(i, window)
            out.index_copy_(2, p.q_index, inner(qi, ki, vi, m, causal, p.q_pos, p.k_pos))
        if d is not None:
            qd = q[0].index_select(1, d.q_index).transpose(0, 1)[:, :, None]      # [n, H, 1, D]
            od = self._decode(inner, window, qd, k, v)
            out[0].index_copy_(1, d.q_index, od[:, :, 0].transpose(0, 1))
        return out

    def _decode(self, inner, window, qd, pk, pv):
        """One query per row against its own keys: [n, H, 1, D] -> [n, H, 1, D]."""
        d = self.decode
        if inner is sdpa_attention and _paged_kernel(qd, pk):
            # qwen2's kernel reads the keys and values in place from their pool slots.
            o = torch.ops.qwen2.paged_attention(qd[:, :, 0], pk, pv, d.key_slots.view(d.n, d.s_max), d.lens,
                                                qd.shape[-1] ** -0.5, window or 0)
            return o[:, :, None]
        kd, vd = _gather(pk, d.key_slots, d.n, d.s_max), _gather(pv, d.key_slots, d.n, d.s_max)
        mask = self.decode_mask(window)
        n, h, _, dim = qd.shape
        kv = kd.shape[1]
        if inner is sdpa_attention:
            # Fold each group of query heads onto its KV head (queries of one row become the
            # group's "sequence"): the gathered keys are read in place, never repeated per head.
            o = F.scaled_dot_product_attention(qd.reshape(n, kv, h // kv, dim), kd, vd, attn_mask=mask)
            return o.view(n, h, 1, dim)
        return inner(qd, kd, vd, mask, False, d.q_pos, d.k_pos)

    # -- masks, built once per step ---------------------------------------------------------------
    def decode_mask(self, window):
        """Padding (and window) mask [n, 1, 1, S_max] of the decode group; None when no row is
        padded and there is no window (the kernel's fast path)."""
        key = ("d", window)
        if key not in self._masks:
            d = self.decode
            self._masks[key] = None if not d.padded and window is None else \
                build_mask(d.q_pos, d.k_pos, window)
        return self._masks[key]

    def prefill_mask(self, i: int, window):
        """(mask, is_causal) of prefill i."""
        key = (i, window)
        if key not in self._masks:
            p = self.prefills[i]
            if p.fresh and (window is None or p.k_pos.shape[1] <= window):
                self._masks[key] = (None, p.q_pos.shape[1] > 1)
            else:
                self._masks[key] = (build_mask(p.q_pos, p.k_pos, window), True)
        return self._masks[key]


def _gather(pool: torch.Tensor, slots: torch.Tensor, rows: int, s: int) -> torch.Tensor:
    """Keys (or values) at `slots` as [rows, n_kv, s, head_dim] (a transposed view of one gather)."""
    return pool.index_select(0, slots).view(rows, s, pool.shape[1], pool.shape[2]).transpose(1, 2)


def _paged_kernel(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether decode attention can run on qwen2's paged kernel (float32 on the CPU, kernels built)."""
    if q.dtype != torch.float32 or pool.dtype != torch.float32 or q.device.type != "cpu":
        return False
    from qwen2 import kernels
    return kernels.available()


def one_sequence_per_step(model) -> bool:
    """Whether this model's steps must hold one sequence each: layers with an attention of their
    own (dual chunk attention reads positions across the whole row), or a rotary that depends on
    each sequence's prompt length (first-generation Qwen's dynamic NTK)."""
    from qwen2.model.attention import Attention
    from qwen2.model.rope import Rotary
    return (any(type(layer.self_attn).forward is not Attention.forward for layer in model.model.layers)
            or type(model.rotary).begin_prompt is not Rotary.begin_prompt)
