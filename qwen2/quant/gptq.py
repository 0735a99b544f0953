"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): weight-only quantization that corrects, column by column, the error
of rounding each weight by updating the not yet quantized weights of the same row, weighted by
the inputs' second moments H = X^T X measured on calibration text. Same grids and same file
layout as round-to-nearest (qwen2.quant.linear: symmetric or asymmetric groups, desc_act false,
g_idx = i // group_size), so nothing changes at load or run time. int4 defaults to asymmetric
groups, which measured best on the demo model (docs/performance.md).

    model = qwen2.load_model(path, dtype="bfloat16")
    ids = calibration_ids(qwen2.load_tokenizer(path))        # [n_samples, seq_len]
    quantize_model(model, 4, 32, method="gptq", calib_ids=ids)  # or gptq_model(...)

The walk over the model (`gptq_model`) is sequential: the calibration batch goes through decoder
layer i once, and a forward pre-hook on each linear quantizes it the first time it sees its input
(q/k/v are one fused linear, and so are gate/up: GPTQ treats each row on its own, so quantizing
the fused weight on the shared H is quantizing each part on it), then lets that forward continue
with the quantized weight. So each linear's H comes from inputs that the already quantized
linears before it produced (AutoGPTQ's "true sequential" order), the layer's output, computed
with all of its weights quantized, is the next layer's input, and each layer runs once. The whole
calibration batch goes through a layer in one call, so memory grows with n_samples * seq_len *
intermediate_size; besides the model itself, the only float32 copies are one linear's weight, its
H and H's inverse factor (down_proj's: intermediate_size^2 floats each). Estimated, not measured,
for Qwen2-7B at 16 x 512 tokens: about 1 GB of activations and 4 GB for down_proj's H and factor.

The algorithm per linear (`gptq_quantize`, the reference implementation's order of operations):
dead inputs (H_ii = 0) get H_ii = 1 and zero weights; H += 0.01 * mean(diag H) * I; U = the upper
Cholesky factor of H^-1; columns go in blocks of 128, within a block one at a time: quantize
column i, err = (w_i - q_i) / U_ii, subtract err * U_i,j from every later column j of the block,
and after the block the block's errors from all later columns at once (one matrix product). A
group's (scale, zero) comes from its weights as updated so far, when its first column is reached.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from types import SimpleNamespace

import torch
from torch import nn

from qwen2.errors import Qwen2Error
from qwen2.kernels.memory import trim
from qwen2.quant.linear import INT4_GROUPS, QuantLinear, _targets, dequantize, grid, stored_scales

# Calibration text: Python standard-library source of these modules. Disjoint from the modules
# that benchmarks/quality.py (and tests/test_quant_quality.py) score perplexity on, so the
# evaluation text is never calibrated on.
CALIB_MODULES = ("argparse", "dataclasses", "difflib", "functools", "json.decoder", "json.encoder", "csv",
                 "configparser", "pprint", "calendar", "contextlib", "enum", "ast", "tokenize", "gettext",
                 "statistics", "random", "logging")
CALIB_SAMPLES, CALIB_LEN = 16, 512


def calibration_text() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CALIB_MODULES)


def calibration_ids(tokenizer, n_samples: int = CALIB_SAMPLES, seq_len: int = CALIB_LEN,
                    text: str | None = None) -> torch.Tensor:
    """LongTensor [n, seq_len]: n_samples windows of seq_len tokens, spread evenly over the tokens
    of `text` (default: calibration_text()). Fewer windows when the text is short (at least one)."""
    if n_samples < 1 or seq_len < 2:
        raise Qwen2Error("calibration needs at least 1 sample of at least 2 tokens")
    ids = tokenizer.encode(calibration_text() if text is None else text)
    n = min(n_samples, len(ids) // seq_len)
    if n < 1:
        raise Qwen2Error(f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}")
    # n windows, the first at the start and the last at the end of the text, the rest spread evenly
    step = (len(ids) - seq_len) // max(n - 1, 1)
    return torch.tensor([ids[i * step:i * step + seq_len] for i in range(n)], dtype=torch.long)


# ----------------------------------------------------------------------------- one matrix
def hessian(x: torch.Tensor, chunk: int = 4096, block: int = 1024) -> torch.Tensor:
    """H = X^T X / n over the rows of x [..., in] (float32 [in, in]), a chunk of rows at a time.
    Wide inputs (down_proj's) get only the blocks on and above the diagonal computed, the rest
    mirrored: about 60% of the multiply-adds, the costliest step of GPTQ on CPU."""
    x = x.reshape(-1, x.shape[-1])
    k = x.shape[1]
    h = torch.zeros(k, k, dtype=torch.float32, device=x.device)
    edges = list(range(0, k, block)) + [k] if k >= 2 * block else [0, k]
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].float()
        for a, b in zip(edges, edges[1:]):
            h[a:b, a:].addmm_(xc[:, a:b].T, xc[:, a:])
    for a, b in zip(edges[1:-1], edges[2:]):  # lower blocks from the upper ones
        h[a:b, :a] = h[:a, a:b].T
    return h.div_(max(x.shape[0], 1))


def inverse_factor(h: torch.Tensor, damp: float = 0.01):
    """(U, dead): U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1, after dead
    inputs (H_ii = 0) get H_ii = 1; dead is their mask. Consumes h.

    Computed as the inverse of the flipped Cholesky factor of the flipped H (if J H J = L L^T,
    then H = (J L J)(J L J)^T with J L J upper, so H^-1 = U^T U with U = J L^-1 J): one Cholesky
    and one triangular solve, the same U as the usual cholesky -> cholesky_inverse -> cholesky
    upper (the Cholesky factor is unique) at a third of the time on CPU."""
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    mean = h.diagonal().mean()
    h.diagonal().add_(damp * mean)
    hf = h.flip(0, 1)
    del h
    for _ in range(5):  # float32 rounding can leave H a hair short of positive definite
        lf, info = torch.linalg.cholesky_ex(hf)
        if int(info) == 0:
            break
        hf.diagonal().add_(damp * mean)
    else:
        raise Qwen2Error("GPTQ: the calibration Hessian is not positive definite even after damping")
    del hf
    eye = torch.eye(lf.shape[0], dtype=lf.dtype, device=lf.device)
    u = torch.linalg.solve_triangular(lf, eye, upper=False).flip(0, 1)
    return u, dead


def gptq_quantize(w: torch.Tensor, u: torch.Tensor, bits: int, group_size: int, sym: bool = True,
                  dead: torch.Tensor | None = None, blocksize: int = 128, scale_dtype=None,
                  full_range: bool = False):
    """GPTQ of w [out, in] given U (inverse_factor of its inputs' H) -> (q uint8 [out, in],
    scales float32 [n_groups, out], zeros uint8 [n_groups, out]), the same format (and grid) as
    qwen2.quant.linear.quantize_tensor; group_size -1 = one group per output channel. scale_dtype: round
    each scale as a model in this dtype runs it and a file stores it (qwen2.quant.linear.stored_scales)
    before it is used, so the errors that get compensated are those of the weights that will run. Works in
    float32 (float64 if w or u is)."""
    out_f, in_f = w.shape
    g = in_f if group_size in (-1, None) else group_size
    if in_f % g:
        raise Qwen2Error(f"in_features {in_f} is not a multiple of group size {g}")
    # every group's first column must see its group's weights fully updated: a group lies in one
    # block, or starts where a block starts (when all earlier errors have been applied)
    bs = blocksize if (blocksize % g == 0 or g % blocksize == 0 or g == in_f) else g
    work = torch.float64 if torch.float64 in (w.dtype, u.dtype) else torch.float32
    u = u.to(work)
    wt = w.detach().to(work).t().contiguous()  # [in, out]: column i of w is the contiguous row i
    if dead is not None:
        wt[dead] = 0
    qt = torch.empty(in_f, out_f, dtype=torch.uint8, device=w.device)
    scales = torch.empty(in_f // g, out_f, dtype=torch.float32, device=w.device)
    zeros = torch.empty(in_f // g, out_f, dtype=torch.float32, device=w.device)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = wt[i1:i2].clone()
        e1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        with _one_thread():  # ~100 small ops per column: a second thread only adds waiting
            _columns(w1, e1, u1, qt, scales, zeros, i1, i2, g, wt, bits, sym, full_range, scale_dtype)
        if i2 < in_f:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), e1, alpha=-1)
    return qt.t().contiguous(), scales, zeros.to(torch.uint8)


class _one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)


def _columns(w1, e1, u1, qt, scales, zeros, i1, i2, g, wt, bits, sym, full_range, scale_dtype):
    """The columns i1..i2-1 of one block, one at a time (see gptq_quantize)."""
    maxq = 2 ** bits - 1
    s = z = None
    if i1 % g:  # the block starts inside a group (g > block size only when g is a multiple of it)
        s, z = scales[i1 // g], zeros[i1 // g]
    for i in range(i2 - i1):
        c = i1 + i
        if c % g == 0:
            src = w1[i:i + g] if c + g <= i2 else wt[c:c + g]  # (c == i1 in the second case)
            s, z = grid(src.t(), bits, sym, full_range)
            if scale_dtype is not None:
                s = stored_scales(s, scale_dtype)
            scales[c // g], zeros[c // g] = s, z
        col = w1[i]
        q = torch.clamp(torch.round(col / s) + z, 0, maxq)
        qt[c] = q.to(torch.uint8)
        err = (col - (q - z) * s).div_(u1[i, i])
        w1[i + 1:].addr_(u1[i, i + 1:], err, alpha=-1)
        e1[i] = err


# ----------------------------------------------------------------------------- the model
class _Capture(nn.Module):
    """Stands in for decoder layer i during one forward: records the arguments the model passes
    it (hidden states, rotary tables, mask, positions) and passes the hidden states on."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.self_attn = SimpleNamespace(layer_idx=layer_idx)  # Qwen2.forward reads it
        self.args = None

    def forward(self, x, *args):
        self.args = args
        return x


@torch.no_grad()
def _layer_inputs(model, ids: torch.Tensor):
    """(hidden states entering layer 0, [the other forward arguments of each layer])."""
    layers = model.model.layers
    caps = nn.ModuleList(_Capture(i) for i in range(len(layers)))
    model.model.layers = caps
    try:
        x0 = model.model.embed_tokens(ids)
        model(ids, logits_to_keep=1)
    finally:
        model.model.layers = layers
    return x0, [c.args for c in caps]


class _LayerGPTQ:
    """Forward pre-hooks on one decoder layer's linears: the first call of each linear quantizes
    it with GPTQ (H from that call's input; linears fed the same input tensor share H and U) and
    swaps in the quantized weight before the call goes on."""

    def __init__(self, targets, bits, group_size, sym, full_range, damp, scale_dtype):
        self.bits, self.group_size, self.sym, self.full_range = bits, group_size, sym, full_range
        self.damp, self.scale_dtype = damp, scale_dtype
        self.results: dict[int, tuple] = {}
        self.last = None  # (input tensor, U, dead) of the most recent input
        self.hooks = [lin.register_forward_pre_hook(self._hook) for _, _, _, lin in targets]

    def _hook(self, lin, args):
        if id(lin) in self.results:
            return
        x = args[0]
        if self.last is None or self.last[0] is not x:
            self.last = None  # free the previous U first
            u, dead = inverse_factor(hessian(x), self.damp)
            self.last = (x, u, dead)
        _, u, dead = self.last
        gs = -1 if self.bits == 8 else self.group_size
        q, s, z = gptq_quantize(lin.weight, u, self.bits, gs, self.sym, dead, scale_dtype=self.scale_dtype,
                                full_range=self.full_range)
        self.results[id(lin)] = (q, s, z)
        lin.weight.data = dequantize(q, s, self.bits, z).to(lin.weight.dtype)

    def close(self):
        for h in self.hooks:
            h.remove()
        self.last = None


def gptq_model(model, bits: int, group_size: int, calib_ids: torch.Tensor, lm_head: bool = True,
               dtype=None, head_bits: int | None = None, sym: bool = False, damp: float = 0.01,
               progress: bool = True, full_range: bool | None = None):
    """In place, like qwen2.quant.linear.quantize_model (same arguments and result), but the decoder's
    linears are quantized with GPTQ on calib_ids [n, seq_len] (see calibration_ids). The lm_head
    (lm_head=True) is round-to-nearest at head_bits (default 8), as in quantize_model; with
    lm_head=False it stays float (what an int4 file stores).

    int4 grids: asymmetric (sym=False, a zero point per group) by default, the closest to the
    float model on the demo model by KL, top-1 and perplexity (docs/performance.md); sym=True with
    full_range (default on) uses llama.cpp Q4_0's scale (qwen2.quant.linear.grid), better than the plain
    symmetric one under GPTQ. int8 is always symmetric per channel."""
    if bits not in (4, 8):
        raise Qwen2Error(f"bits must be 8 or 4, not {bits}")
    if bits == 4 and group_size not in INT4_GROUPS:
        raise Qwen2Error(f"int4 group size must be one of {INT4_GROUPS}")
    if model.quant or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise Qwen2Error("GPTQ needs a float model (this one is already quantized)")
    if model.decode_step is not None:
        raise Qwen2Error("GPTQ needs the model as loaded (quantize before compile_decode)")
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise Qwen2Error("calib_ids must be a non-empty [n_samples, seq_len] tensor of token ids")
    dtype = dtype or model.dtype
    sym = sym or bits == 8
    head_bits = head_bits or 8
    gs = -1 if bits == 8 else group_size
    full_range = (full_range is None or full_range) and bits == 4 and sym
    scale_dtype = dtype
    x, layer_args = _layer_inputs(model, calib_ids.to(model.device))
    layers = model.model.layers
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(layers), desc=f"GPTQ int{bits}", unit="layer", file=sys.stderr,
                   dynamic_ncols=True, leave=True)
    try:
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}."
            targets = [t for t in _targets(model, lm_head=False) if t[0].startswith(prefix)]
            hooks = _LayerGPTQ(targets, bits, group_size, sym, full_range, damp, scale_dtype)
            try:
                with torch.no_grad():
                    x = layer(x, *layer_args[i])
            finally:
                hooks.close()
            for full, mod, attr, lin in targets:
                res = hooks.results.get(id(lin))
                if res is None:  # never called on the calibration text (an MoE expert no token chose)
                    setattr(mod, attr, QuantLinear.from_linear(lin, bits, gs, dtype, sym=sym, full_range=full_range))
                    continue
                q, s, z = res
                setattr(mod, attr, QuantLinear(q, s, bits, gs, None if lin.bias is None else lin.bias.data, dtype, z))
            del hooks, targets
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    del x, layer_args
    if lm_head:
        model.lm_head = QuantLinear.from_linear(model.lm_head, head_bits, group_size, dtype, sym=sym)
    model.quant = {"bits": bits, "group_size": gs, "sym": sym, "lm_head": head_bits if lm_head else None}
    trim()
    return model
