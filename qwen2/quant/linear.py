"""Weight-only int8 / int4 quantization: round-to-nearest here, GPTQ in qwen2.quant.gptq (same grids,
same layout), saved in the GPTQ layout, run with PyTorch's packed CPU kernels and ours.

Numerics (GPTQ's, so official GPTQ checkpoints take the same path):
    w ~= (q - z) * s      q unsigned (0..255 or 0..15), one (s, z) per group
symmetric ("sym": true): z = 2**(bits-1), s = 2 * absmax / (2**bits - 1), or with full_range
(int4; llama.cpp Q4_0's scale) s = -m / 8, m the group's weight of largest magnitude, which then
lands exactly on level -8 so that all 16 levels are used (s is negative where m is positive);
asymmetric ("sym": false, int4 only): s = (max - min) / (2**bits - 1), z = round(-min / s), which
uses all 16 levels on skewed groups at no run-time cost (the int4 kernel takes a zero per group).
Defaults, from measurements on the demo model (docs/performance.md): round-to-nearest is
symmetric, absmax (asymmetric and full-range lower its KL to bf16 but not its perplexity); GPTQ
is asymmetric (lowest KL and perplexity; full range helps its symmetric grid). Scales are kept
as a file stores them (stored_scales: float16, rounded once). int8 is symmetric with one scale
per output channel (group_size -1); int4 one per `group_size` inputs.

The file layout (GPTQ's) is read and written by qwen2.io.gptq.

At run time a `QuantLinear` keeps plain layouts that every path can read:
int8 -> `int8 [out, in]` plus per-row scales; int4 -> `uint8 [out, in/2]`, two values a byte in
"halves" order (byte i of group g holds q[g*G + i] in its low nibble and q[g*G + G/2 + i] in its
high one, so one byte load feeds two contiguous runs of x), scales `[out, n_groups]` and, for
asymmetric files only, zeros `uint8 [out, n_groups]`. Three ways to run them:
  * compiled decode (qwen2.engine.compiled): one-row products written as dequantize-multiply-sum, which
    Inductor turns into one fused, vectorized pass over the packed weight (the fastest decode);
  * eager decode: `aten._weight_int8pack_mm` reads the int8 layout as it is; `pack_linears`
    repacks int4 into `aten._convert_weight_to_int4pack_for_cpu`'s opaque tiles for
    `aten._weight_int4pack_mm_for_cpu`;
  * many rows (prefill): dequantize + one float GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2 import kernels
from qwen2.errors import Qwen2Error
from qwen2.kernels.memory import trim

INT4_GROUPS = (32, 64, 128, 256)
# Above this many rows (prefill), an int8 matmul is faster as dequantize + bf16 GEMM.
_DEQUANT_ROWS = 32


def grid(wg: torch.Tensor, bits: int, sym: bool = True, full_range: bool = False):
    """(scale, zero), float32, of the groups along the last dim of wg [..., g]: the grid that
    quantize_tensor (round-to-nearest) and qwen2.quant.gptq both use; see the module doc. full_range
    (symmetric int4 only): llama.cpp Q4_0's scale, which puts the group's weight of largest
    magnitude exactly on level -8 (s < 0 where that weight is positive)."""
    maxq = 2 ** bits - 1
    wg = wg.float()
    if sym and full_range and bits == 4:
        m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = m / -(2 ** (bits - 1))
        scale = torch.where(scale.abs() < 1e-8, torch.full_like(scale, 1e-8), scale)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    elif sym:
        scale = (2 * wg.abs().amax(-1) / maxq).clamp(min=1e-8)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:  # the range always includes 0, so that zero weights stay exact
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
        # GPTQ stores z - 1, so z >= 1: a group (nearly) all above zero spans [-s, (maxq - 1) s]
        low = zero < 1
        scale = torch.where(low, (hi / (maxq - 1)).clamp(min=1e-8), scale)
        zero = zero.clamp(1, maxq)
    return scale, zero


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int, sym: bool = True, full_range: bool = False):
    """Round-to-nearest quantization of w [out, in] -> (q uint8 [out, in], scales float32
    [n_groups, out], zeros uint8 [n_groups, out]); group_size -1 = one group per output channel."""
    out_f, in_f = w.shape
    g = in_f if group_size in (-1, None) else group_size
    if in_f % g:
        raise Qwen2Error(f"in_features {in_f} is not a multiple of group size {g}")
    maxq = 2 ** bits - 1
    wg = w.float().reshape(out_f, in_f // g, g)
    scale, zero = grid(wg, bits, sym, full_range)  # [out, n_groups]
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    return (q.reshape(out_f, in_f).to(torch.uint8), scale.T.contiguous(),
            zero.T.to(torch.uint8).contiguous())


def stored_scales(s: torch.Tensor, dtype) -> torch.Tensor:
    """Scales (float32) as a model in `dtype` runs them and a GPTQ file stores them (float16):
    rounded once to bfloat16 for a bfloat16 model (such values are float16 values too, above
    float16's normal minimum 6.1e-5), to float16 otherwise. Rounding to float16 first and then to
    bfloat16 would round twice, and measurably worse (demo model int8: +0.23% perplexity instead of
    +0.03%)."""
    return (s.to(dtype) if dtype == torch.bfloat16 else s).half().float()


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of quantize_tensor, float32 [out, in] (zeros None: symmetric)."""
    out_f, in_f = q.shape
    n_groups = scales.shape[0]
    z = 2 ** (bits - 1) if zeros is None else zeros.T.float()[..., None]
    wg = q.float().reshape(out_f, n_groups, in_f // n_groups) - z
    return (wg * scales.T.float()[..., None]).reshape(out_f, in_f)


class QuantLinear(nn.Module):
    """Weight-only quantized linear: y = x @ dequant(W).T + b, via the packed CPU kernels."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, zeros: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size = bits, (-1 if bits == 8 else group_size)
        if bits == 8:
            if scales.shape[0] != 1:
                raise Qwen2Error("int8 needs one scale per output channel (group_size -1)")
            if zeros is not None and not bool((zeros == 128).all()):
                raise Qwen2Error("int8 must be symmetric (the int8 kernel takes no zero point)")
            self.register_buffer("qweight", (q.to(torch.int16) - 128).to(torch.int8).contiguous())
            self.register_buffer("scales", scales[0].to(dtype).contiguous())
        elif bits == 4:
            if group_size not in INT4_GROUPS:
                raise Qwen2Error(f"int4 needs group size in {INT4_GROUPS}")
            self.register_buffer("qweight", pack_int4_halves(q, group_size))
            self.register_buffer("scales", scales.T.to(dtype).contiguous())  # [out, n_groups]
            # symmetric grids (z = 8 everywhere) store no zeros
            sym = zeros is None or bool((zeros == 8).all())
            self.register_buffer("zeros", None if sym else zeros.T.contiguous())
        else:
            raise Qwen2Error(f"bits must be 8 or 4, not {bits}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype))
        # int4 only, after pack(): the aten kernel's tiles and (scale, zero) pairs
        self.register_buffer("packed_weight", None)
        self.register_buffer("packed_scales", None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int, dtype=None, sym: bool = True,
                    full_range: bool = False) -> "QuantLinear":
        """Round-to-nearest; the scales as a GPTQ file stores them (stored_scales), so that a model
        quantized in memory and the same model saved and loaded compute the same thing."""
        q, s, z = quantize_tensor(lin.weight.data, bits, -1 if bits == 8 else group_size, sym=sym or bits == 8,
                                  full_range=full_range)
        dtype = dtype or lin.weight.dtype
        return cls(q, stored_scales(s, dtype), bits, group_size, None if lin.bias is None else lin.bias.data, dtype, z)

    def quantized(self):
        """The constructor's (q uint8 [out, in], scales float32 [n_groups, out], zeros uint8
        [n_groups, out]) back, scales as held (in the compute dtype); plain layout only."""
        if self.packed:
            raise Qwen2Error("QuantLinear was repacked for the eager int4 kernel (pack()); its plain layout is gone")
        if self.bits == 8:
            q = (self.qweight.to(torch.int16) + 128).to(torch.uint8)
            s = self.scales.float()[None]
            return q, s, torch.full(s.shape, 128, dtype=torch.uint8)
        q = unpack_int4_halves(self.qweight, self.group_size)
        s = self.scales.float().T.contiguous()
        z = torch.full(s.shape, 8, dtype=torch.uint8) if self.zeros is None else self.zeros.T.contiguous()
        return q, s, z

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def packed(self) -> bool:
        return self.packed_weight is not None

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight [out, in] (or those output rows) in the compute dtype."""
        if self.bits == 8:
            return self.qweight[rows].to(self.dtype) * self.scales[rows, None]
        q = unpack_int4_halves(self.qweight[rows], self.group_size).float()
        n, k = q.shape
        z = 8.0 if self.zeros is None else self.zeros[rows].float()[..., None]
        return ((q.view(n, -1, self.group_size) - z) * self.scales[rows].float()[..., None]).view(n, k).to(self.dtype)

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W dequantized a block of output rows at a time: the float copy is never
        whole (a 4 MB float32 scratch at most), so prefill does not grow the heap by the size of
        the largest weight (+270 MB of RSS on Qwen2-0.5B int4 otherwise)."""
        step = max(16, (1 << 20) // self.in_features)
        if step >= self.out_features:
            return F.linear(x, self.dequantized())
        return torch.cat([F.linear(x, self.dequantized(slice(i, i + step)))
                          for i in range(0, self.out_features, step)], -1)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        """One row, as dequantize-multiply-sum over the packed weight: under torch.compile this
        becomes a single vectorized pass that streams the weight once (float32 accumulation)."""
        xf = gemv_input(x)
        if self.bits == 8:
            return (xf * self.qweight.float()).sum(-1) * self.scales.float()
        n, g = self.out_features, self.in_features // self.group_size
        w = self.qweight.view(n, g, self.group_size // 2).to(torch.int32)
        xs = xf.view(1, g, 2, self.group_size // 2)
        z = 8.0 if self.zeros is None else self.zeros.float()[..., None]
        d = (((w & 15).float() - z) * xs[:, :, 0] + ((w >> 4).float() - z) * xs[:, :, 1]) * self.scales.float()[..., None]
        return d.sum((-1, -2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.dtype)
        rows = x.shape[0]
        if rows == 1 and not self.packed and kernels.available():
            # decode: int8-activation integer dot products (qwen2/kernels/csrc/gemv_int8.cpp, gemv_int4.cpp),
            # eager or traced
            if self.bits == 8:
                y = torch.ops.qwen2.int8_gemv(x, self.qweight, self.scales)
            else:
                y = torch.ops.qwen2.int4_gemv(x, self.qweight, self.scales, self.zeros, self.group_size)
            y = y.to(self.dtype)
        elif rows == 1 and torch.compiler.is_compiling():
            y = self._gemv(x).to(self.dtype)
        elif self.packed:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed_weight, self.group_size, self.packed_scales)
        elif rows > _DEQUANT_ROWS or self.bits == 4:
            y = self._dequant_matmul(x)  # prefill: a real GEMM beats the GEMV-style kernels
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def pack(self) -> bool:
        """int4: repack for aten._weight_int4pack_mm_for_cpu (eager decode) and drop the plain
        layout (so compiled decode no longer applies). False where the kernel cannot take it."""
        if self.bits != 4 or self.packed:
            return self.packed
        if self.out_features % 16:
            return False
        q = unpack_int4_halves(self.qweight, self.group_size).to(torch.int32)
        # the kernel computes (q - 8) * scale + zero, so (q - z) * s needs zero = (8 - z) * s
        z = 8.0 if self.zeros is None else self.zeros.float()
        s = self.scales.float()
        pairs = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).to(self.dtype).contiguous()
        self.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self.packed_scales = pairs
        self.qweight = None
        return True

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}"


def gemv_input(x: torch.Tensor) -> torch.Tensor:
    """The one activation row of a traced matrix-vector product, as float32 [1, K] held in memory.
    Without the forced layout Inductor may fuse the producer (an RMSNorm, silu * up) into the
    product's inner loop and recompute it for every output row."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
    return torch.ops.prims.inductor_force_stride_order(x.float().reshape(1, -1), (x.shape[-1], 1))


def pack_int4_halves(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 values 0..15 [out, in] -> uint8 [out, in/2] in the halves order (see module doc)."""
    n, k = q.shape
    h = q.to(torch.uint8).view(n, k // group_size, 2, group_size // 2)
    return (h[:, :, 0] | (h[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4_halves(p: torch.Tensor, group_size: int) -> torch.Tensor:
    n = p.shape[0]
    h = p.view(n, -1, 1, group_size // 2)
    return torch.cat([h & 15, h >> 4], dim=2).reshape(n, -1)


class OneDNNLinear(nn.Module):
    """A float linear with its weight reordered once into oneDNN's layout (the layout its kernels
    want, done once at load instead of on every call; a copy: the original weight is dropped unless
    something else, e.g. a tied embedding, still holds it). Same results as F.linear; on AVX512 CPUs
    about twice the speed for bf16 matrix-vector products, which is what decoding is made of.
    batch_hint: the row count oneDNN picks the layout for (1 here, for decode: pack_linears;
    qwen2.engine.fast packs for serving batches of 16 rows)."""

    def __init__(self, lin: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        self.dtype = w.dtype
        # buffers (not plain attributes), so that they count in model.buffers() like any weight
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint))
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().contiguous())

    @staticmethod
    def supported(dtype) -> bool:
        return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and \
            torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")

    def forward(self, x):
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, oneDNN {str(self.dtype).removeprefix('torch.')}"


PackedLinear = OneDNNLinear  # pack_linears' name for it


def pack_linears(model, lm_head: bool = True):
    """In place, for eager decoding: int4 QuantLinears take the aten kernel's tiles, and every float
    nn.Linear becomes a OneDNNLinear (bf16 on AVX512 only; elsewhere float layers stay as they
    are). A tied lm_head gets its own packed copy, while the
    embedding keeps the original table for lookups."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.pack()
    if not PackedLinear.supported(model.dtype):
        trim()
        return model
    for full, mod, attr, lin in list(_targets(model, lm_head, routers=True)):
        if type(lin) is nn.Linear:
            setattr(mod, attr, PackedLinear(lin))
    trim()
    return model


def _targets(model, lm_head: bool, routers: bool = False, quantized: bool = False):
    """(name, parent module, attribute, linear) for every linear layer that gets quantized: all
    projections in the decoder (not the MoE router or shared-expert gate), and the lm_head.
    quantized=True: also those already replaced by a QuantLinear."""
    kinds = (nn.Linear, QuantLinear) if quantized else nn.Linear
    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            full = f"{name}.{attr}" if name else attr
            if not isinstance(child, kinds):
                continue
            if full == "lm_head" and not lm_head:
                continue
            if full.endswith(("shared_expert_gate", ".gate")) and not routers:
                continue
            yield full, mod, attr, child


def quantize_model(model, bits: int, group_size: int = 128, lm_head: bool = True, dtype=None,
                   head_bits: int | None = None, sym: bool | None = None, method: str = "rtn",
                   calib_ids: torch.Tensor | None = None, progress: bool = False, full_range: bool | None = None):
    """In place: replace linear layers with QuantLinear (int8 per-channel or int4 grouped). A tied
    lm_head gets its own quantized copy; the embedding stays a float lookup table. lm_head=False
    leaves the head float.

    method "rtn": round-to-nearest; "gptq": the decoder's linears by GPTQ on calib_ids
    [n_samples, seq_len] (qwen2.quant.gptq.calibration_ids; progress bar on stderr if progress), the
    lm_head round-to-nearest. Same layout, same run-time paths either way. The int4 grid defaults
    to what measured best on the demo model (docs/performance.md): symmetric for round-to-nearest,
    asymmetric (sym=False) for GPTQ; full_range (symmetric int4: llama.cpp Q4_0's scale, see grid)
    on for GPTQ, off for round-to-nearest.

    head_bits (default: 8) is the lm_head's precision: int4 there costs more quality than anywhere
    else (demo model, int4 group 32: +6.3% perplexity with an int4 head, +4.9% with int8; see
    docs/performance.md), which is why llama.cpp keeps the output at 6-8 bits in its 4-bit formats."""
    if bits == 4 and group_size not in INT4_GROUPS:
        raise Qwen2Error(f"int4 group size must be one of {INT4_GROUPS}")
    if method == "gptq":
        if calib_ids is None:
            raise Qwen2Error("method='gptq' needs calib_ids (see qwen2.quant.gptq.calibration_ids)")
        from qwen2.quant.gptq import gptq_model
        return gptq_model(model, bits, group_size, calib_ids, lm_head=lm_head, dtype=dtype, head_bits=head_bits,
                          sym=bool(sym), progress=progress, full_range=full_range)
    if method != "rtn":
        raise Qwen2Error(f"quantization method must be 'rtn' or 'gptq', not {method!r}")
    dtype = dtype or model.dtype
    head_bits = head_bits or 8
    sym = sym is None or sym
    for full, mod, attr, lin in _targets(model, lm_head):
        b = head_bits if full == "lm_head" else bits
        setattr(mod, attr, QuantLinear.from_linear(lin, b, group_size, dtype, sym=sym,
                                                   full_range=bool(full_range) and full != "lm_head"))
    model.quant = {"bits": bits, "group_size": -1 if bits == 8 else group_size, "sym": sym or bits == 8,
                   "lm_head": head_bits if lm_head else None}
    trim()  # the float weights just freed
    return model


# ------------------------------------------------------------------------- GPTQ layout on disk
