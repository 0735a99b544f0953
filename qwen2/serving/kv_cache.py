"""Paged KV cache for the serving engine.

Keys and values live in one pool per layer, cut into fixed-size blocks; each sequence owns a
block table (list of block ids), so memory is taken block by block as a sequence grows and is
returned the moment it ends. A `PackedStep` is the per-step view the model sees through the
cache protocol of docs/ARCHITECTURE.md: all tokens of all scheduled sequences are packed into one
row ([1, N]), `begin` returns the positions of every key of every scheduled sequence, `update`
writes this step's keys into their slots and gathers the keys back in that order.

Packing breaks the model's position-only masking (two sequences share the row), so the engine
swaps each layer's attention kernel for `PackedAttention`, which runs the original kernel per
sequence (prefills) and once for all decoding sequences (padded batch). The kernel itself is
unchanged, so long-context kernels keep working and numerics match an unbatched run.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..model import build_mask


class BlockAllocator:
    """Free list of block ids; FIFO reuse keeps allocation O(1)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache: {n} blocks requested, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]):
        self._free.extend(blocks)


class KVPool:
    """Per layer a key and a value tensor [n_kv, num_blocks * block_size, head_dim]: slot-major
    in the middle so that gathering slots gives [n_kv, S, head_dim] ready for attention."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype, device=None):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (config.num_key_value_heads, num_blocks * block_size, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype) -> int:
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of positions start..end-1 of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass
class SeqSlice:
    """One sequence's share of a step: new tokens at positions start..start+n-1."""
    token_ids: list[int]      # the n new tokens
    start: int                # position of the first new token (= tokens already cached)
    block_table: list[int]
    sample: bool              # logits of the last new token are wanted


@dataclass
class _Prefill:
    q_index: torch.Tensor     # where this sequence's queries sit in the packed row
    ka: int                   # its keys are k_all[..., ka:kb]
    kb: int
    q_pos: torch.Tensor       # [1, T]
    k_pos: torch.Tensor       # [1, S]
    fresh: bool               # whole sequence in this step: plain causal attention


@dataclass
class _Decode:
    q_index: torch.Tensor     # [n] packed index of each decoding sequence's token
    key_index: torch.Tensor   # [n, S_max] index into k_all (padding -> 0)
    q_pos: torch.Tensor       # [n, 1]
    k_pos: torch.Tensor       # [n, S_max] (-1 = padding)


class PackedStep:
    """The cache object for one engine step (see the module docstring).

    Packed order: the tokens of each sequence except its last sampled one, then the last tokens
    of all sampling sequences, in `slices` order, so `logits_to_keep=num_logits` yields exactly
    one logits row per sampling sequence.
    """

    def __init__(self, pool: KVPool, slices: list[SeqSlice], device=None):
        self.pool = pool
        body_ids, body_pos, body_slots, tail_ids, tail_pos, tail_slots = [], [], [], [], [], []
        key_slots, key_pos = [], []
        seq_body, seq_tail, seq_keys = [], [], []
        nbody = sum(len(s.token_ids) - s.sample for s in slices)
        ntail = nkeys = 0
        for s in slices:
            n = len(s.token_ids)
            end = s.start + n
            slots_all = pool.slots(s.block_table, 0, end)
            pos = list(range(s.start, end))
            nb = n - s.sample
            seq_body.append((len(body_ids), len(body_ids) + nb))
            body_ids += s.token_ids[:nb]
            body_pos += pos[:nb]
            body_slots.append(slots_all[s.start:s.start + nb])
            if s.sample:
                seq_tail.append(nbody + ntail)
                ntail += 1
                tail_ids.append(s.token_ids[-1])
                tail_pos.append(pos[-1])
                tail_slots.append(slots_all[end - 1:end])
            else:
                seq_tail.append(None)
            key_slots.append(slots_all)
            key_pos.append(torch.arange(end))
            seq_keys.append((nkeys, nkeys + end))
            nkeys += end

        self.num_tokens = nbody + ntail
        self.num_logits = ntail
        self.input_ids = torch.tensor([body_ids + tail_ids], dtype=torch.long, device=device)
        self.position_ids = torch.tensor([body_pos + tail_pos], dtype=torch.long, device=device)
        self.new_slots = torch.cat(body_slots + tail_slots).to(device)
        self.key_slots = torch.cat(key_slots).to(device)
        self.key_pos = torch.cat(key_pos)[None].to(device)
        self.next_pos = self.position_ids.max(dim=1).values + 1

        # Attention plan: sequences with one new token share one padded call, others go alone.
        self.prefills: list[_Prefill] = []
        dec = []
        for s, (b0, b1), tail, (ka, kb) in zip(slices, seq_body, seq_tail, seq_keys):
            n = len(s.token_ids)
            if n == 1 and s.sample:
                dec.append((tail, ka, kb))
                continue
            idx = list(range(b0, b1)) + ([tail] if tail is not None else [])
            self.prefills.append(_Prefill(
                q_index=torch.tensor(idx, device=device), ka=ka, kb=kb,
                q_pos=torch.arange(s.start, s.start + n, device=device)[None],
                k_pos=torch.arange(kb - ka, device=device)[None], fresh=s.start == 0))
        self.decode = None
        if dec:
            smax = max(kb - ka for _, ka, kb in dec)
            ar = torch.arange(smax)
            lens = torch.tensor([kb - ka for _, ka, kb in dec])
            starts = torch.tensor([ka for _, ka, _ in dec])
            valid = ar[None] < lens[:, None]
            self.decode = _Decode(
                q_index=torch.tensor([t for t, _, _ in dec], device=device),
                key_index=torch.where(valid, starts[:, None] + ar[None], 0).to(device),
                q_pos=(lens - 1)[:, None].to(device),
                k_pos=torch.where(valid, ar[None], -1).to(device))
        self._masks: dict = {}

    # -- the cache protocol -------------------------------------------------------------------
    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        assert positions.shape == self.position_ids.shape, "PackedStep drives its own positions"
        return self.key_pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pk.index_copy_(1, self.new_slots, k[0])
        pv.index_copy_(1, self.new_slots, v[0])
        return pk.index_select(1, self.key_slots)[None], pv.index_select(1, self.key_slots)[None]

    # -- used by PackedAttention ----------------------------------------------------------------
    def decode_mask(self, window):
        """Padding mask of the decode group (None when no row is padded: the kernel's fast path)."""
        if window not in self._masks:
            d = self.decode
            self._masks[window] = None if bool((d.k_pos >= 0).all()) and window is None else \
                build_mask(d.q_pos, d.k_pos, window)
        return self._masks[window]


class PackedAttention:
    """Wraps a layer's attention kernel: outside a packed step it is the kernel itself; inside,
    it splits the packed row back into sequences (see the module docstring)."""

    def __init__(self, inner, window, holder):
        self.inner, self.window, self.holder = inner, window, holder

    def __call__(self, q, k, v, mask, is_causal, q_pos=None, k_pos=None):
        step = getattr(self.holder, "step", None)
        if not isinstance(step, PackedStep):
            return self.inner(q, k, v, mask, is_causal, q_pos, k_pos)
        out = torch.empty_like(q)
        for p in step.prefills:
            qi = q.index_select(2, p.q_index)
            ki, vi = k[:, :, p.ka:p.kb], v[:, :, p.ka:p.kb]
            t, s = qi.shape[2], p.kb - p.ka
            if p.fresh and (self.window is None or s <= self.window):
                m, causal = None, t > 1
            else:
                m, causal = build_mask(p.q_pos, p.k_pos, self.window), True
            out.index_copy_(2, p.q_index, self.inner(qi, ki, vi, m, causal, p.q_pos, p.k_pos))
        d = step.decode
        if d is not None:
            qd = q[0].index_select(1, d.q_index).transpose(0, 1)[:, :, None]      # [n, H, 1, D]
            kd = k[0][:, d.key_index].transpose(0, 1)                               # [n, KV, S, D]
            vd = v[0][:, d.key_index].transpose(0, 1)
            od = self.inner(qd, kd, vd, step.decode_mask(self.window), False, d.q_pos, d.k_pos)
            out[0].index_copy_(1, d.q_index, od[:, :, 0].transpose(0, 1))
        return out


def install_packed_attention(model, holder):
    """Wrap every layer's attention kernel once; `holder.step` selects packed mode. A model serves
    one engine at a time: installing again re-points the wrappers at the new holder."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if isinstance(attn.attn_fn, PackedAttention):
            attn.attn_fn.holder = holder
        else:
            window = model.config.sliding_window if attn.sliding else None
            attn.attn_fn = PackedAttention(attn.attn_fn, window, holder)
