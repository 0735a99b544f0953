"""Model speed transforms for serving (applied once, after load, by `qwen2 serve`).

Serving runs the model on many rows at once (16 decoding requests = a [16, hidden] matrix per
projection), where the default float matmul (MKL's sgemm behind `F.linear`) is slow on this kind of
CPU: MKL picks its AVX2 path on AMD processors and is poor at small row counts. oneDNN's inner
product uses the CPU's widest vector unit whatever the vendor and is 2-4x faster there (measured:
[16, 896] x [896, 151936] lm_head 115 ms -> ~40 ms; a whole 16-row Qwen2-0.5B decode step
~350 ms -> ~125 ms; one row ~165 ms -> ~90 ms). Same math, different summation order: results
agree with `F.linear` to float rounding (the same latitude a batched MKL matmul already has
against a one-row one).
"""
from __future__ import annotations

import torch
from torch import nn


class OneDNNLinear(nn.Module):
    """A float linear whose weight is reordered once into oneDNN's layout (a copy: the original
    weight is dropped unless something else, e.g. a tied embedding, still holds it)."""

    def __init__(self, lin: nn.Linear, batch_hint: int = 16):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach().contiguous()
        self.dtype = w.dtype
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint))
        self.bias = None if lin.bias is None else lin.bias.detach().contiguous()

    def forward(self, x):
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, oneDNN {str(self.dtype).removeprefix('torch.')}"


def onednn_supported(model) -> bool:
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if model.dtype == torch.float32:
        return True
    # bf16 inner products need AVX512 (bf16 or at least BW); elsewhere oneDNN is no gain.
    return model.dtype == torch.bfloat16 and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


@torch.no_grad()
def prepare_for_serving(model, batch_hint: int = 16):
    """In place: fuse q/k/v and gate/up into one matmul each, then give every plain float linear
    (lm_head included) oneDNN's kernel. Quantized or otherwise special linears are left alone.
    Returns the model."""
    if hasattr(model, "fuse") and not getattr(model, "fused", False):
        model.fuse()
    if not onednn_supported(model):
        return model
    for mod in list(model.modules()):
        for attr, child in list(mod.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == model.dtype and child.out_features > 1:
                setattr(mod, attr, OneDNNLinear(child, batch_hint))
    return model
