"""Qwen2 / Qwen2-MoE decoder math. Knows nothing about files, HTTP or sampling.

Module names mirror the Hugging Face checkpoint names (model.layers.N.self_attn.q_proj, ...), so
a checkpoint's state dict maps onto this module one to one; speed transforms happen after load.

Positions drive everything: each token carries its rotary position (-1 marks padding), and the
cache stores the position of every key it holds. A query at position p may attend to a key at
position q when 0 <= q <= p (and p - q < window for sliding-window layers). That one rule covers
causal prefill, cached decode, left-padded batches and caches gathered from blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.model.config import ModelConfig
from qwen2.model.rope import Rotary, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Static cache: per layer [B, n_kv, max_len, head_dim] for keys and values.

    All rows of a batch share the slot pointer; `positions` [B, max_len] holds the rotary position
    of each stored key (-1: empty or padding), from which the attention mask is built.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device=None):
        # One spare slot: a view of the first max_len slots is then never the whole tensor, so the
        # compiled decode step (qwen2.engine.compiled) always sees one stride pattern (a whole, contiguous
        # view is traced as a second graph, compiled in the middle of a generation).
        shape = (batch_size, config.num_key_value_heads, max_len + 1, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.positions = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next position per row
        self.length = 0
        self.max_len = max_len
        self._start = 0

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """Reserve slots for a step's tokens; returns the key positions [B, S] to attend over."""
        t = positions.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > {self.max_len}")
        self._start = self.length
        self.positions[:, self.length:self.length + t] = positions
        self.length += t
        self.next_pos = torch.maximum(self.next_pos, positions.max(dim=1).values + 1)
        return self.positions[:, :self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s, e = self._start, self._start + k.shape[2]
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


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
        # into the layer's generated code (the sdpa kernel costs ~50 us a call at this size).
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, kv, d
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=True)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        # Swappable attention kernel (long-context variants replace it per layer).
        self.attn_fn = sdpa_attention
        self.qkv_proj = None  # set by Qwen2.fuse(): one matmul instead of three

    def project_qkv(self, x):
        """Un-rotated q [B, H, T, D] and k, v [B, KV, T, D] (fused or separate projections)."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2),
                v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2))

    def forward(self, x, cos, sin, mask, cache: KVCache | None, is_causal: bool, q_pos, k_pos):
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if getattr(cache, "attends", False):
            # A cache that packs several sequences into one row (qwen2.engine.paged) knows which
            # keys each query may see: it runs this layer's kernel per sequence itself.
            o = cache.attend(self, q, k, v)
        else:
            o = self.attn_fn(q, k, v, mask, is_causal, q_pos, k_pos)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.gate_up_proj = None  # set by Qwen2.fuse()

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax over all experts, keep the top-k probabilities (renormalized if norm_topk_prob)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob

    def forward(self, x):
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), experts


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, weights, experts = self.gate(x)
        out = torch.zeros_like(x)
        # Only the experts some token picked run, each on its own tokens.
        for e in experts.unique().tolist():
            tok, slot = torch.where(experts == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoE(config) if config.is_moe_layer(layer_idx) else MLP(
            config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, is_causal, q_pos, k_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, is_causal, q_pos, k_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


IGNORE_INDEX = -100  # label of a position that is not scored (transformers' convention)


class CausalLMOutput(NamedTuple):
    """What `Qwen2.forward` returns when given labels (a tuple: `logits, loss = model(ids, labels=y)`)."""
    logits: torch.Tensor  # float32 [B, T, vocab]
    loss: torch.Tensor    # float32 scalar


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t is scored against labels[:, t + 1], in float32, averaged
    over the labels that are not IGNORE_INDEX (as transformers' causal LM loss). Every such label
    counts, including one that follows a padding position: mark those IGNORE_INDEX too."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


class Qwen2(nn.Module):
    """The causal LM. `model(input_ids)` -> float32 logits [B, T, vocab]; with `labels` it returns
    `CausalLMOutput(logits, loss)`. A plain nn.Module: parameters are trainable (run inference under
    torch.inference_mode(), as the engine does)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(config)
        self.decode_step = None  # set by qwen2.engine.compiled.compile_decode

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    def positions_for(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """Rotary positions [B, T] continuing the cache; -1 where attention_mask is 0."""
        b, t = input_ids.shape
        start = cache.next_pos[:, None] if cache is not None else 0
        if attention_mask is None:
            return start + torch.arange(t, device=input_ids.device)[None].expand(b, t)
        m = attention_mask.to(torch.long)
        return torch.where(m.bool(), start + m.cumsum(-1) - 1, -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int = 0, labels: torch.Tensor | None = None):
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding); position_ids [B, T]
        (-1 = padding) override the mask-derived positions; logits_to_keep > 0 computes logits for
        the last N positions only. labels [B, T] (IGNORE_INDEX = not scored): return
        CausalLMOutput(logits, loss) with the shifted next-token loss (causal_lm_loss)."""
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            logits = self(input_ids, attention_mask, position_ids, cache)
            return CausalLMOutput(logits, causal_lm_loss(logits, labels))
        if (self.decode_step is not None and cache is not None and input_ids.shape[1] == 1
                and attention_mask is None and position_ids is None and not torch.compiler.is_compiling()):
            # The compiled step is inference only (it writes the cache in place, and its kernels
            # have no backward): it is traced without autograd even for trainable weights.
            with torch.no_grad():
                return self.decode_step(input_ids, cache)
        if position_ids is None:
            position_ids = self.positions_for(input_ids, attention_mask, cache)
        k_pos = cache.begin(position_ids) if cache is not None else position_ids
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype, cache)

        # Plain causal prefill of unpadded rows needs no explicit mask (SDPA's fast path).
        t, s = position_ids.shape[1], k_pos.shape[1]
        # (A fixed-shape cache always spans empty slots, and its step is traced: no host sync.)
        simple = not getattr(cache, "fixed_shape", False) and (t == 1 or t == s) and \
            bool((k_pos >= 0).all()) and bool((position_ids >= 0).all())
        masks: dict[str, torch.Tensor | None] = {}
        for lt in set(self.config.layer_types):
            window = self.config.sliding_window if lt == "sliding_attention" else None
            if simple and (window is None or s <= window):
                masks[lt] = None
            else:
                masks[lt] = build_mask(position_ids, k_pos, window)
        is_causal = t > 1

        for layer in self.model.layers:
            lt = self.config.layer_types[layer.self_attn.layer_idx]
            x = layer(x, cos, sin, masks[lt], cache, is_causal, position_ids, k_pos)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x)).float()

    @torch.no_grad()
    def fuse(self) -> "Qwen2":
        """Speed transform after load: q/k/v and gate/up projections become one matmul each
        (fewer dispatches and one weight stream per step). Same math; the fused weights replace
        the HF-named ones, so save before fusing. Quantized linears fuse too when their packing
        allows it. Returns self."""
        for mod in self.modules():
            if isinstance(mod, Attention) and mod.qkv_proj is None:
                fused = _cat_linears([mod.q_proj, mod.k_proj, mod.v_proj])
                if fused is not None:
                    mod.qkv_proj = fused
                    del mod.q_proj, mod.k_proj, mod.v_proj
            elif isinstance(mod, MLP) and mod.gate_up_proj is None:
                fused = _cat_linears([mod.gate_proj, mod.up_proj])
                if fused is not None:
                    mod.gate_up_proj = fused
                    del mod.gate_proj, mod.up_proj
        self.fused = True
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _cat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One linear computing the concatenated outputs of `parts` (None if they cannot fuse)."""
    if all(type(p) is nn.Linear for p in parts):
        w = parts[0].weight
        out = sum(p.out_features for p in parts)
        has_bias = any(p.bias is not None for p in parts)
        lin = nn.Linear(parts[0].in_features, out, bias=has_bias, device="meta")
        lin.weight = nn.Parameter(torch.cat([p.weight for p in parts]))
        if has_bias:
            lin.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else w.new_zeros(p.out_features)
                                               for p in parts]))
        return lin
    # Other linear kinds (quantized ones) fuse if their class knows how to concatenate itself.
    kind = type(parts[0])
    if hasattr(kind, "cat") and all(type(p) is kind for p in parts):
        return kind.cat(parts)
    return None
