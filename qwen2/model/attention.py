"""Attention: the mask rule, the default kernel and the attention module of a decoder layer.

A layer's attention is one fused projection (`qkv_proj`: q, k and v rows in that order, as
first-generation Qwen's `c_attn` and vLLM's QKVParallelLinear) and `o_proj`; the kernel that turns
rotated q, k, v into the attention output is a constructor argument (`attn_fn`), one of the variants
in qwen2.model.decoder.ATTENTION. Long-context variants live in qwen2.model.longctx.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.model.config import ModelConfig
from qwen2.model.rope import apply_rope


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Boolean attention mask [B, 1, T, S] (True = attend) from query and key positions."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask &= (qp - kp) < window
    # A padding query sees no key: let it see everything so softmax stays finite (output unused).
    mask |= ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]


def sdpa_attention(q, k, v, mask, is_causal: bool, q_pos=None, k_pos=None):
    """q [B, H, T, D], k/v [B, KV, S, D] (grouped-query), mask [B, 1, T, S] bool or None.
    q_pos [B, T] / k_pos [B, S] are the rotary positions (unused here; variants such as logn
    attention need them)."""
    b, h, t, d = q.shape
    if t == 1 and torch.compiler.is_compiling():
        # Traced decode step: spelled out, so Inductor fuses scores, softmax and the weighted sum
        # into the layer's generated code (an sdpa call per layer costs more than the math here).
        kv, n = k.shape[1], k.shape[2]
        # q held in memory: otherwise its rotary is recomputed for every key in the product below
        from torch._inductor import inductor_prims  # noqa: F401  (registers the op)
        qf = torch.ops.prims.inductor_force_stride_order(
            q.reshape(b, kv, h // kv, 1, d).float() * d ** -0.5, (h * d, (h // kv) * d, d, d, 1))
        s = (qf * k[:, :, None].float()).sum(-1)  # [B, KV, G, S]
        if mask is not None:
            s = s.masked_fill(~mask.reshape(b, 1, 1, n), float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = (p[..., None] * v[:, :, None].float()).sum(-2)  # [B, KV, G, D]
        return o.to(q.dtype).reshape(b, h, 1, d)
    if k.shape[1] != h and t == 1:
        # One query per row: fold each group's query heads onto its KV head, so the cache is read
        # in place instead of copied once per query head.
        o = F.scaled_dot_product_attention(q.view(b, k.shape[1], h // k.shape[1], d), k, v, attn_mask=mask)
        return o.view(b, h, 1, d)
    if k.shape[1] != h:
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


def rotate_qk(q, k, cos, sin):
    """The rotary embedding of q and k: Attention.rotate's default (a speed pass may put a kernel
    that rotates in place there, qwen2.engine.fast)."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class Attention(nn.Module):
    """Grouped-query attention over rotated q, k and v, with a swappable kernel:
    kernel(q, k, v, mask, is_causal, q_pos, k_pos) -> o [B, H, T, D] (default sdpa_attention)."""

    rotate = staticmethod(rotate_qk)

    def __init__(self, config: ModelConfig, layer_idx: int, kernel=sdpa_attention):
        super().__init__()
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, kv, d
        self.layer_idx = layer_idx
        self.qkv_proj = nn.Linear(config.hidden_size, (h + 2 * kv) * d, bias=True)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        # Output rows of each fused projection, part by part in checkpoint order (q, k, v): what
        # loading, saving and quantizing split the fused weight by.
        self.splits = {"qkv_proj": (h * d, kv * d, kv * d)}
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.attn_fn = kernel

    def project_qkv(self, x):
        """Un-rotated q [B, H, T, D] and k, v [B, KV, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.splits["qkv_proj"], dim=-1)
        return (q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2),
                v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2))

    def forward(self, x, cos, sin, mask, cache, is_causal: bool, q_pos, k_pos):
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = self.rotate(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if getattr(cache, "attends", False):
            # A cache that packs several sequences into one row (qwen2.engine.paged) knows which
            # keys each query may see: it runs this layer's kernel per sequence itself.
            o = cache.attend(self, q, k, v)
        else:
            o = self.attn_fn(q, k, v, mask, is_causal, q_pos, k_pos)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
