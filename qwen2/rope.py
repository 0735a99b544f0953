"""Rotary position embedding: functional helpers (rotate-half convention, as in transformers)."""
from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError


def rope_init(config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention_scaling) for the config's rope type."""
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = config.rope_type
    if rope_type == "default":
        return inv_freq, 1.0
    raise CheckpointError(f"config: rope_scaling type {rope_type!r} is not supported")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] for integer positions [B, T], computed in float32 then cast."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, D/2]
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
    schemes (dynamic NTK, YaRN) can keep their own state."""

    def __init__(self, config):
        super().__init__()
        inv_freq, self.scaling = rope_init(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.config = config

    def reset_parameters(self, device=None):
        """Recompute buffers (after building the model on the meta device)."""
        self.inv_freq = rope_init(self.config)[0].to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, cache=None):
        return rope_cos_sin(self.inv_freq, positions.clamp(min=0), self.scaling, dtype)
