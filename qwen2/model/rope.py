"""Rotary position embedding: functional helpers (rotate-half convention, as in transformers),
`rope_init` per rope type, and the `Rotary` modules the model calls once per forward.

Rope types: "default", "linear" and "yarn" (static YaRN exactly as transformers computes it, which
is how Qwen2-7B/72B-Instruct reach 128K). First-generation Qwen's dynamic NTK depends on the
sequence, not only on the config, so it is a `Rotary` subclass that keeps its per-sequence alpha
on the cache object.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qwen2.errors import CheckpointError


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_init(rs: dict, base: float, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers' `_compute_yarn_parameters`: frequencies that turn
    fewer than beta_slow times over the original window are interpolated (divided by factor), those
    turning more than beta_fast times are kept, with a linear ramp between; cos/sin are scaled by
    the attention factor (default 0.1 ln(factor) + 1)."""
    orig = rs.get("original_max_position_embeddings") or max_position_embeddings
    factor = rs.get("factor")
    if factor is None:
        factor = max_position_embeddings / orig
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim index that turns `rotations` times over orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_init(config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention_scaling) for the config's rope type."""
    dim = config.head_dim
    base = config.rope_theta
    rope_type = config.rope_type
    rs = config.rope_scaling or {}
    if rope_type == "default":
        return default_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return default_inv_freq(base, dim) / rs["factor"], 1.0
    if rope_type == "yarn":
        if "factor" not in rs and not rs.get("original_max_position_embeddings"):
            raise CheckpointError("config: rope_scaling yarn needs factor or original_max_position_embeddings")
        return yarn_init(rs, base, dim, config.max_position_embeddings)
    raise CheckpointError(f"config: rope_scaling type {rope_type!r} is not supported (default, linear, yarn)")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] for integer positions [B, T], computed in float32 then cast.
    inv_freq is [D/2] (shared) or [B, D/2] (one set of frequencies per row)."""
    inv_freq = inv_freq.to(positions.device)
    if inv_freq.dim() == 2:
        inv_freq = inv_freq[:, None, :]
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Rotary(nn.Module):
    """cos/sin for a step's positions. A module (not a bare function) so that position-dependent
    schemes (dynamic NTK) can keep their own state."""

    def __init__(self, config):
        super().__init__()
        # On the CPU even while the model is built on the meta device: ops on meta tensors go
        # through torch._refs, whose first use imports dynamo and sympy (~70 MB for the whole run).
        with torch.device("cpu"):
            inv_freq, self.scaling = rope_init(config)
        # then onto the device the model is built on (a plain copy, no decomposition)
        self.register_buffer("inv_freq", inv_freq.to(torch.empty(0).device), persistent=False)
        self.config = config

    def reset_parameters(self, device=None):
        """Recompute buffers (after building the model on the meta device)."""
        self.inv_freq = rope_init(self.config)[0].to(device)

    def begin_prompt(self, cache, prompt_lengths: torch.Tensor):
        """Told the full prompt lengths [B] before a prompt is fed in chunks (no-op here)."""

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, cache=None):
        return rope_cos_sin(self.inv_freq, positions.clamp(min=0), self.scaling, dtype)


def ntk_alpha(length: int, seq_length: int) -> float:
    """First-generation Qwen's dynamic NTK alpha for a sequence of true length L:
    max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1), so 1 within seq_length, 3 up to 2x, 7 up to 4x."""
    if length <= 0:
        return 1.0
    return float(max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1))


class DynamicNTKRotary(Rotary):
    """First-generation Qwen's dynamic NTK rotary: the base becomes base * alpha ** (d / (d - 2)),
    alpha computed per row from the prompt's true length (non-padding tokens) at prefill and kept
    for the decode steps that follow. With a cache the alpha lives on the cache object
    (`cache.ntk_alpha`, [B]); without one every call is a whole-sequence prefill."""

    def __init__(self, config, seq_length: int):
        super().__init__(config)
        self.seq_length = seq_length
        self._freqs: dict[float, torch.Tensor] = {}

    def inv_freq_for(self, alpha: float) -> torch.Tensor:
        if alpha not in self._freqs:  # the exact expression of the original (Python-float base)
            d = self.config.head_dim
            base = self.config.rope_theta * alpha ** (d / (d - 2))
            self._freqs[alpha] = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
        return self._freqs[alpha]

    def alphas(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.tensor([ntk_alpha(int(n), self.seq_length) for n in lengths.tolist()], dtype=torch.float64)

    def begin_prompt(self, cache, prompt_lengths: torch.Tensor):
        cache.ntk_alpha = self.alphas(prompt_lengths)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, cache=None):
        alpha = getattr(cache, "ntk_alpha", None) if cache is not None else None
        if alpha is None or len(alpha) != positions.shape[0]:
            alpha = self.alphas((positions >= 0).sum(dim=1))
            if cache is not None:
                cache.ntk_alpha = alpha
        pos = positions.clamp(min=0)
        if bool((alpha == 1).all()):
            return rope_cos_sin(self.inv_freq, pos, self.scaling, dtype)
        inv = torch.stack([self.inv_freq_for(float(a)) for a in alpha.tolist()])  # [B, D/2]
        return rope_cos_sin(inv, pos, self.scaling, dtype)


def make_rotary(config) -> Rotary:
    """The rotary the config asks for: first-generation Qwen's dynamic NTK (use_dynamic_ntk), else
    the rope type's fixed frequencies."""
    if config.use_dynamic_ntk:
        return DynamicNTKRotary(config, config.seq_length)
    return Rotary(config)
