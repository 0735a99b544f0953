"""Long context: logn attention (first-generation Qwen), Dual Chunk Attention (DCA), chunked
prefill and KV-cache sizing. YaRN and dynamic NTK live in rope.py (they only change the rotary).

The variants are named in qwen2.model.decoder.ATTENTION and chosen by the config
(`ModelConfig.attention`): logn attention is plain attention with the `LognAttention` kernel; DCA
needs the un-rotated queries and keys, so it is its own module (`DualChunkAttention`). The
`enable_*` functions change the config of a built model and let it rebuild (`Qwen2.configure`).
"""
from __future__ import annotations

import math

import torch

from qwen2.errors import Qwen2Error
from qwen2.model.attention import Attention, sdpa_attention
from qwen2.model.rope import apply_rope, default_inv_freq, rope_cos_sin

# Attention over long prompts is computed in query blocks so that no step holds more than about
# this many bytes of scores (never a T x T matrix per head).
SCORE_BUDGET_BYTES = 256 * 2 ** 20


# ---------------------------------------------------------------------------------- logn attention
# The original implementation tabulates log_{seq_length}(p) for 1-based positions p = 1 .. 32767;
# later positions reuse the last entry.
LOGN_MAX_POSITION = 32767


def logn_factor(q_pos: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Query scale [B, T] (float64) for 0-based rotary positions: log(p) / log(seq_length) for the
    1-based position p > seq_length, else 1."""
    p = (q_pos + 1).clamp(min=1, max=LOGN_MAX_POSITION).double()
    return torch.where(p > seq_length, torch.log(p) / math.log(seq_length), torch.ones_like(p))


class LognAttention:
    """attn_fn hook: scale each query by logn_factor, then run the wrapped attention."""

    def __init__(self, seq_length: int, inner=sdpa_attention):
        self.seq_length, self.inner = seq_length, inner

    def __call__(self, q, k, v, mask, is_causal, q_pos=None, k_pos=None):
        if q_pos is not None and bool((q_pos + 1 > self.seq_length).any()):
            q = q * logn_factor(q_pos, self.seq_length).to(q.dtype)[:, None, :, None]
        return self.inner(q, k, v, mask, is_causal, q_pos, k_pos)


def logn_attention(config, layer_idx: int) -> Attention:
    """ATTENTION["logn"]: plain attention whose kernel scales queries past config.seq_length."""
    return Attention(config, layer_idx, kernel=LognAttention(config.seq_length))


def enable_logn_attention(model, seq_length: int):
    model.config.seq_length, model.config.use_logn_attn = seq_length, True
    return model.configure()


# ----------------------------------------------------------------------------- dual chunk attention
def dca_positions(q_pos: torch.Tensor, chunk_size: int, local_size: int):
    """Re-mapped rotary positions of Dual Chunk Attention (as vLLM's DualChunkRotaryEmbedding),
    chunk_len = chunk_size - local_size:
      key                  k % chunk_len
      intra-chunk query    p % chunk_len                       (exact relative distance)
      successive query     min(p % chunk_len + chunk_len, chunk_size)
      inter-chunk query    min(2 * chunk_len - 1, chunk_size)  (one constant position)
    Returns (intra, successive, inter) query positions, each like q_pos."""
    cl = chunk_size - local_size
    p = q_pos.clamp(min=0) % cl
    return p, (p + cl).clamp(max=chunk_size), torch.full_like(p, min(2 * cl - 1, chunk_size))


def dual_chunk_attention(q_intra, q_succ, q_inter, k, v, q_pos, k_pos, chunk_len: int,
                         budget_bytes: int = SCORE_BUDGET_BYTES):
    """Attention where a query at position p in chunk c = p // chunk_len scores keys of its own
    chunk with q_intra, keys of chunk c - 1 with q_succ and keys of earlier chunks with q_inter;
    causal (key position <= p) over one softmax. q_* [B, H, T, D], k/v [B, KV, S, D] (GQA), q_pos
    [B, T], k_pos [B, S] (-1: none). Computed in query blocks within budget_bytes of scores."""
    b, h, t, d = q_intra.shape
    kv, s = k.shape[1], k.shape[2]
    rep = h // kv
    kt = k.float().transpose(-1, -2)[:, :, None]  # [B, KV, 1, D, S]
    vf = v.float()[:, :, None]
    scale = 1.0 / math.sqrt(d)
    kc = torch.div(k_pos, chunk_len, rounding_mode="floor")[:, None, None, None, :]
    kp = k_pos[:, None, None, None, :]
    block = max(1, budget_bytes // (4 * 4 * b * h * max(s, 1)))  # ~4 float32 [B, H, block, S] live
    out = torch.empty(b, kv, rep, t, d, dtype=torch.float32, device=q_intra.device)
    for i in range(0, t, block):
        j = min(t, i + block)
        qp = q_pos[:, None, None, i:j, None]
        qc = torch.div(qp, chunk_len, rounding_mode="floor")
        allowed = (kp >= 0) & (kp <= qp)
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # padding queries: keep softmax finite

        def scores(q):
            return q[:, :, i:j].float().reshape(b, kv, rep, j - i, d) @ kt

        sc = torch.where(kc == qc, scores(q_intra), torch.where(kc == qc - 1, scores(q_succ), scores(q_inter)))
        sc = (sc * scale).masked_fill(~allowed, float("-inf"))
        out[:, :, :, i:j] = torch.softmax(sc, dim=-1) @ vf
    return out.reshape(b, h, t, d).to(v.dtype)


def dca_settings(dca: dict | None, chunk_size: int | None = None, local_size: int | None = None,
                 original_max_position_embeddings: int | None = None) -> dict:
    """DCA's settings: the arguments, else `dca` (a dual_chunk_attention_config), else vLLM's
    defaults (chunk_size 8192, local_size 1024, no length scaling)."""
    dca = dca or {}
    return dict(chunk_size=int(chunk_size or dca.get("chunk_size", 8192)),
                local_size=int(local_size if local_size is not None else dca.get("local_size", 1024)),
                original_max_position_embeddings=int(original_max_position_embeddings
                                                     if original_max_position_embeddings is not None
                                                     else dca.get("original_max_position_embeddings", 0)))


class DualChunkAttention(Attention):
    """Attention with DCA (chunk_size, local_size as vLLM's `dual_chunk_attention_config`). Keys are
    rotated at k % chunk_len before caching; each query is rotated three ways. With
    original_max_position_embeddings > 0, queries and keys are scaled by
    max(1, 0.1 ln(L / original_max_position_embeddings) + 1), L the sequence length so far (as vLLM).
    DCA uses the plain rotary frequencies of rope_theta (any rope_scaling is not applied, as vLLM)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        dca = dca_settings(config.dual_chunk_attention_config)
        chunk_size, local_size = dca["chunk_size"], dca["local_size"]
        if not 0 <= local_size < chunk_size:
            raise Qwen2Error(f"dual chunk attention: need 0 <= local_size ({local_size}) < chunk_size ({chunk_size})")
        if self.sliding:
            raise Qwen2Error("dual chunk attention does not support sliding-window layers")
        self.chunk_size, self.local_size = chunk_size, local_size
        self.chunk_len = chunk_size - local_size
        self.original_max_position_embeddings = dca["original_max_position_embeddings"]
        self.rope_theta = config.rope_theta
        self._inv_freq = None

    @property
    def dca_inv_freq(self) -> torch.Tensor:
        # computed on first use: modules are built on the meta device, where it would be a placeholder
        if self._inv_freq is None:
            self._inv_freq = default_inv_freq(self.rope_theta, self.head_dim)
        return self._inv_freq

    def length_scale(self, k_pos: torch.Tensor) -> torch.Tensor | None:
        if not self.original_max_position_embeddings:
            return None
        length = (k_pos.max(dim=1).values + 1).clamp(min=1).double()
        return (0.1 * torch.log(length / self.original_max_position_embeddings) + 1.0).clamp(min=1.0)

    def forward(self, x, cos, sin, mask, cache, is_causal, q_pos, k_pos):
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)

        def rot(y, positions):
            return apply_rope(y, *rope_cos_sin(self.dca_inv_freq, positions, 1.0, y.dtype))

        p_intra, p_succ, p_inter = dca_positions(q_pos, self.chunk_size, self.local_size)
        k = rot(k, p_intra)  # keys sit at k % chunk_len, like intra-chunk queries
        qs = [rot(q, p) for p in (p_intra, p_succ, p_inter)]
        scale = self.length_scale(k_pos)
        if scale is not None:
            f = scale.to(q.dtype)[:, None, None, None]
            k, qs = k * f, [y * f for y in qs]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        o = dual_chunk_attention(*qs, k, v, q_pos, k_pos, self.chunk_len)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


def enable_dual_chunk_attention(model, chunk_size: int | None = None, local_size: int | None = None,
                                original_max_position_embeddings: int | None = None):
    """Every layer's attention becomes DualChunkAttention (sharing its projections). Arguments
    default to the config's `dual_chunk_attention_config` (then to vLLM's defaults: chunk_size
    8192, local_size 1024), which is updated with them."""
    cfg = dict(model.config.dual_chunk_attention_config or {})
    dca = dca_settings(cfg, chunk_size, local_size, original_max_position_embeddings)
    model.config.dual_chunk_attention_config = {**cfg, **dca}
    return model.configure()


def apply_config(model):
    """Rebuild the parts of a model that its config decides (after config fields were set by
    hand, e.g. dual_chunk_attention_config): `Qwen2.configure`."""
    return model.configure()


def enable_yarn(model, factor: float, original_max_position_embeddings: int | None = None):
    """Static YaRN on a loaded model, as if config.json had `rope_scaling` {"type": "yarn", ...}
    (the Qwen2-7B/72B-Instruct recipe for 128K: factor 4 over the original 32768)."""
    orig = original_max_position_embeddings or model.config.max_position_embeddings
    model.config.rope_scaling = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig}
    return model.configure()


# ---------------------------------------------------------------------------------- chunked prefill
@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
            chunk_size: int = 2048, logits_to_keep: int = 1) -> torch.Tensor:
    """Feed a (long) prompt through `cache` chunk_size tokens at a time and return the last chunk's
    logits. Peak attention memory is then chunk x S instead of T x T; the result equals one
    whole-prompt forward. Sequence-dependent rotaries (dynamic NTK) are told the full prompt length
    first."""
    b, t = input_ids.shape
    lengths = attention_mask.sum(dim=1) if attention_mask is not None else torch.full((b,), t)
    model.rotary.begin_prompt(cache, lengths)
    logits = None
    for i in range(0, t, chunk_size):
        m = attention_mask[:, i:i + chunk_size] if attention_mask is not None else None
        logits = model(input_ids[:, i:i + chunk_size], attention_mask=m, cache=cache, logits_to_keep=logits_to_keep)
    return logits


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1) -> int:
    """Bytes of a static KV cache holding `tokens` positions (keys + values, all layers)."""
    return config.kv_bytes_per_token(dtype) * tokens * batch_size
