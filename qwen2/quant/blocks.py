"""Weights quantized in small blocks: the layouts that GGUF's block
types repack into without loss (qwen2.io.gguf), usable from any other loader too (AWQ-style
asymmetric int4: `BlockLinear.int4(q, scales, offsets=-scales * zeros, group_size=128)`).

    block4   w[n, k] = scales[n, g] * (q[n, k] - zero) + offsets[n, g],  g = k // 32, q in 0..31
             (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K; 5-bit values keep their top bit in a plane `qh`)
    block8   w[n, k] = scales[n, k // G] * q[n, k],  q int8, G = 16 or 32        (Q8_0)
    block6   w[n, k] = scales[n, k // 16] * (q[n, k] - 32), q in 0..63 at 6 bits a weight, 192 bytes
             per 256 weights in Q6_K's own order (ql[128], qh[64]; block_linear.cpp's b6_unpack)   (Q6_K)

Scales and offsets are kept in float16 when every value survives the round trip (Q4_0, Q5_0,
Q8_0: the file's own float16). The K types (Q4_K, Q5_K, Q6_K) keep theirs as the file does: an
8-bit integer per group (`scales`, `offsets`: uint8, or int8 for Q6_K's signed scales) times the
file's float16 per super-block of 256 weights (`sscales`, `soffsets`; float32 is accepted too):
scales[n, g] = sscales[n, g // S] * scales8[n, g], the exact float32 product of the file's
reference dequantization, streamed at one byte per group instead of four (`super_scales` says S).
No value is ever rounded, so the weights are exactly the file's. The kernels
(torch.ops.qwen2.block4_linear / block8_linear, qwen2/kernels/csrc/block_linear.cpp) read these
layouts as they are. By default up to 16 rows of x (decode, small batches, speculative
verification) are quantized to int8 per block of 32 and meet the weights in integer dot products
(llama.cpp's numerics: |err| <= sum_b amax_b / 254 * sum_b |w|; each weight row read once for all
rows); more rows (prefill) dequantize 32 output columns at a time into the fp32 tiles of f32_linear.
`exact=True` (`set_exact(model)`, or QWEN2_GGUF_EXACT=1) keeps float32 activations at every row
count: the dequantized weight's float32 product up to summation order. Without qwen2's kernels
the exact math runs as dequantize + F.linear.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from qwen2 import kernels
from qwen2.errors import Qwen2Error

GROUP = 32  # block4's group; block8 takes 16 or 32


def _lossless(*ts: torch.Tensor) -> torch.dtype:
    """float16 when every value of ts (float32) is a float16 value, else float32."""
    return torch.float16 if all(bool((t.half().float() == t).all()) for t in ts) else torch.float32


class BlockLinear(nn.Module):
    """y = x @ W.T (+ bias) for W in one of the block layouts above; y float32.
    Build it with `BlockLinear.int4(...)` or `BlockLinear.int8(...)`."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.kind, self.zero, self.group_size = "block4", 0, GROUP
        # float32 activations (the dequantized weight's product up to fp32 rounding) instead of the
        # default int8 ones (llama.cpp's numerics, ~2x faster decode): QWEN2_GGUF_EXACT=1 or set_exact
        self.exact = os.environ.get("QWEN2_GGUF_EXACT", "") not in ("", "0")
        for name in ("qweight", "qh", "scales", "offsets", "bias", "sscales", "soffsets"):
            self.register_buffer(name, None)

    @classmethod
    def raw(cls, kind: str, out_features: int, in_features: int, qweight: torch.Tensor, scales: torch.Tensor,
            qh: torch.Tensor | None = None, offsets: torch.Tensor | None = None, zero: int = 0,
            sscales: torch.Tensor | None = None, soffsets: torch.Tensor | None = None) -> BlockLinear:
        """The kernels' layout as it is (see the module doc and qwen2/kernels/csrc/block_linear.cpp);
        scales / offsets float16 or float32, or 8-bit integers with float16 or float32 super-block scales /
        offsets (sscales / soffsets [out, groups / S]), kept as given."""
        m = cls(out_features, in_features)
        m.kind, m.zero = kind, int(zero)
        m.group_size = GROUP if kind == "block4" else in_features // scales.shape[1]
        if kind == "block6" and (in_features % 256 or tuple(qweight.shape) != (out_features, in_features // 4 * 3)):
            raise Qwen2Error(f"block6 needs in_features a multiple of 256 and qweight [out, in * 3/4], "
                             f"got {in_features} and {list(qweight.shape)}")
        m.qweight, m.qh, m.scales, m.offsets = qweight, qh, scales, offsets
        m.sscales, m.soffsets = sscales, soffsets
        return m

    @property
    def super_scales(self) -> int:
        """Groups per super-block scale (0: scales are floats of their own)."""
        return 0 if self.sscales is None else self.scales.shape[1] // self.sscales.shape[1]

    def float_scales(self, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, offsets) of `rows` as float32 [rows, groups] (offsets None if there are none)."""
        s, o = self.scales[rows], None if self.offsets is None else self.offsets[rows]
        if self.sscales is None:
            return s.float(), None if o is None else o.float()
        r = self.super_scales
        s = self.sscales[rows].float().repeat_interleave(r, -1) * s.float()
        return s, None if o is None else self.soffsets[rows].float().repeat_interleave(r, -1) * o.float()

    @classmethod
    def int4(cls, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None, zero: int = 0,
             bias: torch.Tensor | None = None, group_size: int = GROUP) -> BlockLinear:
        """w = scales * (q - zero) + offsets per group of `group_size` inputs (a multiple of 32):
        q integer levels [out, in] in 0..31 (values past 15 cost a bit plane), scales and offsets
        (None: 0) [out, in / group_size]."""
        n, k = q.shape
        if k % GROUP or group_size % GROUP or k % group_size:
            raise Qwen2Error(f"block4 needs in_features and group size multiples of {GROUP} (got {k}, {group_size})")
        q = q.to(torch.int32)
        if int(q.min()) < 0 or int(q.max()) > 31:
            raise Qwen2Error("block4 levels must lie in 0..31")
        rep = group_size // GROUP
        scales = scales.float().repeat_interleave(rep, 1)
        offsets = None if offsets is None else offsets.float().repeat_interleave(rep, 1)
        m = cls(n, k)
        m.zero = int(zero)
        g = q.view(n, k // GROUP, 2, GROUP // 2)
        m.qweight = ((g[:, :, 0] & 15) | ((g[:, :, 1] & 15) << 4)).to(torch.uint8).reshape(n, k // 2).contiguous()
        if int(q.max()) > 15:
            bits = (q.view(n, k // GROUP, GROUP) >> 4).to(torch.int64) << torch.arange(GROUP)
            m.qh = bits.sum(-1).to(torch.int32).contiguous()  # int64 sum, then two's-complement wrap
        dt = _lossless(scales, *(() if offsets is None else (offsets,)))
        m.scales = scales.to(dt).contiguous()
        m.offsets = None if offsets is None else offsets.to(dt).contiguous()
        m.bias = None if bias is None else bias.detach().float().contiguous()
        return m

    @classmethod
    def int8(cls, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> BlockLinear:
        """w = scales[:, k // G] * q for q int8 [out, in] and scales [out, in / G], G 16 or 32."""
        n, k = q.shape
        if scales.shape[0] != n or k % scales.shape[1] or k // scales.shape[1] not in (16, 32):
            raise Qwen2Error(f"block8 needs scales [out, in/16] or [out, in/32], got {list(scales.shape)}")
        m = cls(n, k)
        m.kind, m.group_size = "block8", k // scales.shape[1]
        m.qweight = q.to(torch.int8).contiguous()
        m.scales = scales.float().to(_lossless(scales.float())).contiguous()
        m.bias = None if bias is None else bias.detach().float().contiguous()
        return m

    @classmethod
    def cat(cls, parts: list[BlockLinear]) -> BlockLinear | None:
        """One BlockLinear of the parts' rows stacked (a fused projection as one kernel call), or
        None when their layouts differ (kind, group, zero, offsets or not, scale dtype)."""
        a = parts[0]
        same = all(p.kind == a.kind and p.group_size == a.group_size and p.zero == a.zero
                   and p.in_features == a.in_features and (p.offsets is None) == (a.offsets is None)
                   and p.scales.dtype == a.scales.dtype and p.super_scales == a.super_scales
                   and p.bias is None for p in parts)
        if not same:
            return None
        m = cls(sum(p.out_features for p in parts), a.in_features)
        m.kind, m.zero, m.group_size = a.kind, a.zero, a.group_size
        m.qweight = torch.cat([p.qweight for p in parts])
        m.scales = torch.cat([p.scales for p in parts])
        if a.offsets is not None:
            m.offsets = torch.cat([p.offsets for p in parts])
        if a.sscales is not None:
            m.sscales = torch.cat([p.sscales for p in parts])
            m.soffsets = None if a.soffsets is None else torch.cat([p.soffsets for p in parts])
        if any(p.qh is not None for p in parts):  # a part without the 5th-bit plane gets a zero one
            m.qh = torch.cat([p.qh if p.qh is not None else torch.zeros(p.out_features, p.in_features // GROUP,
                                                                           dtype=torch.int32) for p in parts])
        return m

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of the dequantized weight, float32 [*ids.shape, in]."""
        if kernels.available():
            if self.kind == "block4":
                return torch.ops.qwen2.block4_rows(self.qweight, self.qh, self.scales, self.offsets, self.zero, ids,
                                                   self.sscales, self.soffsets)
            op = torch.ops.qwen2.block6_rows if self.kind == "block6" else torch.ops.qwen2.block8_rows
            return op(self.qweight, self.scales, ids, self.sscales)
        flat = ids.reshape(-1)
        return self._dequantize(flat).view(*ids.shape, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in]."""
        return self.rows(torch.arange(self.out_features))

    def _dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """PyTorch's version of the kernels' dequantization (no qwen2 kernels here)."""
        n, k = rows.numel(), self.in_features
        s, o = self.float_scales(rows)
        if self.kind == "block6":
            return ((_b6_levels(self.qweight[rows]) - 32).float().view(n, -1, 16) * s[..., None]).view(n, k)
        if self.kind == "block8":
            return (self.qweight[rows].float().view(n, -1, self.group_size) * s[..., None]).view(n, k)
        b = self.qweight[rows].to(torch.int32).view(n, -1, GROUP // 2)
        q = torch.cat([b & 15, b >> 4], -1)
        if self.qh is not None:
            q = q + ((self.qh[rows].to(torch.int64)[..., None] >> torch.arange(GROUP)) & 1).to(torch.int32) * 16
        w = (q - self.zero).float() * s[..., None]
        if o is not None:
            w = w + o[..., None]
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~120 times a token: the buffers straight from their dict and the op
        # from its overload (module attribute lookups and op resolution were 2/3 of a small call)
        b = self._buffers
        if kernels.available():
            if self.kind == "block4":
                return torch.ops.qwen2.block4_linear.default(x, b["qweight"], b["qh"], b["scales"], b["offsets"],
                                                             self.zero, b["bias"], self.exact, b["sscales"],
                                                             b["soffsets"])
            op = torch.ops.qwen2.block6_linear if self.kind == "block6" else torch.ops.qwen2.block8_linear
            return op.default(x, b["qweight"], b["scales"], b["bias"], self.exact, b["sscales"])
        return F.linear(x.float(), self.dequantized(), self.bias)

    def extra_repr(self):
        more = f", zero={self.zero}" + (", 5-bit" if self.qh is not None else "") + \
            (", offsets" if self.offsets is not None else "") if self.kind == "block4" else ""
        sup = "" if self.sscales is None else \
            f" x {str(self.sscales.dtype).removeprefix('torch.')} per {self.super_scales} groups"
        return (f"{self.in_features}, {self.out_features}, {self.kind}, group_size={self.group_size}{more}, "
                f"scales {str(self.scales.dtype).removeprefix('torch.')}{sup}")


def _b6_levels(qw: torch.Tensor) -> torch.Tensor:
    """block6 bytes [n, K * 3/4] -> levels q in 0..63 [n, K] (int32), Q6_K's order."""
    n = qw.shape[0]
    b = qw.view(n, -1, 192).to(torch.int32)
    ql, qh = b[..., :128].view(n, -1, 2, 2, 32), b[..., 128:].view(n, -1, 2, 1, 32)  # [.., half, c & 1, i]
    lo = torch.stack([ql & 15, ql >> 4], 3).view(n, -1, 2, 4, 32)                    # c = 2 * (c >> 1) + (c & 1)
    hi = (qh >> torch.tensor([0, 2, 4, 6]).view(4, 1)) & 3                              # [.., half, c, i]
    return (lo | (hi << 4)).reshape(n, -1)


def set_exact(model: nn.Module, exact: bool = True) -> nn.Module:
    """Run every BlockLinear of `model` with float32 activations (exact=True: the dequantized
    model's logits up to float32 rounding) or int8 ones (False, the default: llama.cpp's numerics,
    the fast path for up to 16 rows). Returns the model."""
    for m in model.modules():
        if isinstance(m, BlockLinear):
            m.exact = bool(exact)
    return model


class PartsLinear(nn.Module):
    """A fused projection (q/k/v, gate/up) whose parts are stored separately (their block types
    may differ): the parts' outputs side by side, plus the fused bias."""

    def __init__(self, parts: list[nn.Module], bias: torch.Tensor | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x):
        y = torch.cat([p(x) for p in self.parts], -1)
        return y if self.bias is None else y + self.bias


class BlockEmbedding(nn.Module):
    """Embedding lookups that dequantize only the rows asked for, from a BlockLinear's blocks (the
    same storage as a tied lm_head's)."""

    def __init__(self, table: BlockLinear):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("_probe", torch.zeros(0, device=table.qweight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """Not the table: an empty float32 tensor that says the model's compute dtype and device."""
        return self._probe

    def forward(self, ids):
        return self.table.rows(ids)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.kind}"
