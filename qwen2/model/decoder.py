"""Qwen2 / Qwen2-MoE decoder math. Knows nothing about files, HTTP or sampling.

The model is built in its final shape: q/k/v are one projection (`self_attn.qkv_proj`) and so are
each MLP's gate and up (`gate_up_proj`, experts and shared expert included), one matmul each; every
other module is named as in the Hugging Face checkpoints. Each module holding fused projections
declares their parts (`splits`), which the loaders' name tables (qwen2.io.names) map checkpoint
tensors onto. What the config decides beyond the weights (rotary, each layer's attention variant,
ATTENTION) is built from it; `Qwen2.configure()` rebuilds it after the config changes.

Positions drive everything: each token carries its rotary position (-1 marks padding), and the
cache stores the position of every key it holds. A query at position p may attend to a key at
position q when 0 <= q <= p (and p - q < window for sliding-window layers). That one rule covers
causal prefill, cached decode, left-padded batches and caches gathered from blocks.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.model.attention import Attention, build_mask, sdpa_attention
from qwen2.model.config import ModelConfig
from qwen2.model.longctx import DualChunkAttention, logn_attention
from qwen2.model.rope import make_rotary

__all__ = ["ATTENTION", "IGNORE_INDEX", "Attention", "CausalLMOutput", "KVCache", "MLP", "Qwen2", "QuantInfo",
           "RMSNorm", "SparseMoE", "build_mask", "causal_lm_loss", "fused_linears", "sdpa_attention"]

# A layer's attention by name (ModelConfig.attention): a constructor (config, layer_idx) -> module.
ATTENTION: dict[str, Callable[[ModelConfig, int], Attention]] = {
    "sdpa": Attention,                   # plain causal attention (the sdpa_attention kernel)
    "logn": logn_attention,              # first-generation Qwen: queries scaled past seq_length
    "dual_chunk": DualChunkAttention,    # DCA, from config.dual_chunk_attention_config
}


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


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one projection."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.splits = {"gate_up_proj": (inner, inner)}  # gate rows, then up rows (see Attention.splits)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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
        # Only the experts some token picked run, each on its own tokens (and, under tensor
        # parallelism, only those this rank holds: another rank's are nn.Identity placeholders).
        for e in experts.unique().tolist():
            if isinstance(self.experts[e], nn.Identity):
                continue
            tok, slot = torch.where(experts == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ATTENTION[config.attention](config, layer_idx)
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
        # An explicit table skips the random init: built on the meta device (every loader does),
        # nn.init.normal_ goes through torch._refs, whose import pulls in dynamo and sympy (~70 MB
        # resident for the whole run).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        if not self.embed_tokens.weight.is_meta:  # a model built for real: nn.Embedding's own init
            self.embed_tokens.reset_parameters()
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


class QuantInfo(TypedDict):
    """How a model's linears are quantized (qwen2.quant): int `bits`, `group_size` (-1: one group
    per output channel), symmetric grid or not, and the lm_head's bits (None: float)."""
    bits: int
    group_size: int
    sym: bool
    lm_head: int | None


def fused_linears(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every fused projection of `model` by module name, with the output rows of its parts."""
    return {f"{name}.{attr}" if name else attr: sizes
            for name, mod in model.named_modules() for attr, sizes in getattr(mod, "splits", {}).items()}


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
        self.rotary = make_rotary(config)
        # The compiled decode step the engine runs (qwen2.engine.compiled.compile_decode sets it);
        # forward itself never uses it.
        self.decode_step = None
        # Set by qwen2.quant (quantize_model, gptq_model) and the GPTQ loader; None: float weights.
        self.quant: QuantInfo | None = None
        # This rank's share under tensor parallelism (qwen2.model.tp.TPShard); None: the whole model.
        self.tp = None

    @property
    def qwen1(self) -> dict | None:
        """First-generation Qwen's long-context settings the model runs with (None: none)."""
        c = self.config
        if c.seq_length is None:
            return None
        return dict(seq_length=c.seq_length, use_dynamic_ntk=c.use_dynamic_ntk, use_logn_attn=c.use_logn_attn)

    def configure(self) -> "Qwen2":
        """Rebuild what the config decides beyond the weights after a config change (YaRN, DCA,
        logn attention: qwen2.model.longctx): the rotary and each layer's attention module
        (ATTENTION[config.attention]), which keeps its projections. Returns self."""
        self.rotary = make_rotary(self.config).to(self.device)
        for layer in self.model.layers:
            old = layer.self_attn
            with torch.device("meta"):  # its projections are replaced by the existing ones
                new = ATTENTION[self.config.attention](self.config, old.layer_idx)
            new.qkv_proj, new.o_proj = old.qkv_proj, old.o_proj
            layer.self_attn = new.train(old.training)
        return self

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

    def num_parameters(self) -> int:
        """Parameters of the architecture (ties counted once), whatever speed passes later turned
        into packed buffers: counted on a fresh meta-device copy of this config."""
        with torch.device("meta"):
            fresh = type(self)(self.config)
        return sum(p.numel() for p in {id(p): p for p in fresh.parameters()}.values())

