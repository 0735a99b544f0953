"""LoRA as a module-replacing pass: `add_lora(model, r, alpha, dropout, targets)` swaps each targeted
linear for a `LoRALinear` that keeps the original (float nn.Linear or quantized QuantLinear) as
`.base` and adds `scaling * B @ A` to it, with A [r, in] and B [out, r] trainable in float32.

The model is built fused (qkv_proj, gate_up_proj), while PEFT and the checkpoints name q_proj,
k_proj, v_proj, gate_proj and up_proj separately. A LoRA on q_proj is therefore a LoRA on the q rows
of qkv_proj: a fused linear carries one (A, B) pair per targeted part, named after the part, and
its output gains B_part @ A_part @ x on that part's rows only. That is exactly PEFT's per-projection
A/B (the same parameters, the same function), so adapters go both ways unchanged (qwen2.io.adapter).
The parts' A matrices are applied as one matmul (x read once for q, k and v). With dropout, the
parts of one fused linear share one dropout mask on x (PEFT draws one per projection): the same
distribution, not the same random stream.

`shared_copy(model)` is a second module tree over the same weight tensors: `add_lora` on it wraps
its projections and leaves the original untouched, so several adapters can serve over one copy of
the base weights (float, quantized or GGUF blocks, packed for serving or not).

`adapter_disabled(model)` turns every adapter off (DPO's reference policy is the same model with the
adapter off: no second copy); `merge_lora` folds the adapters into float weights for export.
"""
from __future__ import annotations

import contextlib
import copy
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TARGETS", "LoRALinear", "adapter_disabled", "add_lora", "frozen_forward", "lora_modules", "lora_parameters",
           "merge_lora", "peft_name", "shared_copy"]

# PEFT/checkpoint names of the parts of each fused projection, in row order (the module's `splits`).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_scratch = threading.local()


def _buffer(name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """This thread's reusable scratch tensor `name`, grown when too small: a QLoRA step
    dequantizes every weight twice (forward and backward), a few MB at a time, and fresh blocks
    for each made glibc's heap grow step after step (+1.4 GiB on Qwen2.5-0.5B after two steps)."""
    n = math.prod(shape)
    t = getattr(_scratch, name, None)
    if t is None or t.numel() < n or t.dtype != dtype or t.device != device:
        t = torch.empty(n, dtype=dtype, device=device)
        setattr(_scratch, name, t)
    return t[:n].view(shape)


def _dequantize_rows(base, i: int, j: int) -> torch.Tensor:
    """base.dequantized(slice(i, j)) (the same values) written into the scratch buffers."""
    n, k, dev = j - i, base.in_features, base.scales.device
    w = _buffer("w", (n, k), base.dtype, dev)
    if base.bits == 8:
        return torch.mul(w.copy_(base.qweight[i:j]), base.scales[i:j, None], out=w)
    gs = base.group_size
    p = base.qweight[i:j].view(n, k // gs, gs // 2)
    q = _buffer("q", (n, k // gs, 2, gs // 2), torch.uint8, dev)
    torch.bitwise_and(p, 15, out=q[:, :, 0])
    torch.bitwise_right_shift(p, 4, out=q[:, :, 1])
    f = _buffer("f", (n, k // gs, gs), torch.float32, dev).copy_(q.view(n, k // gs, gs))
    f.sub_(8.0 if base.zeros is None else base.zeros[i:j].float()[..., None])
    f.mul_(base.scales[i:j].float()[..., None])
    return w.copy_(f.view(n, k))


class _QuantMatmul(torch.autograd.Function):
    """y = base(x) for a quantized base (qwen2.quant.QuantLinear, whose kernels have no autograd),
    with the input's gradient grad_y @ W computed from the weight dequantized a block of rows at a
    time in backward: nothing of the weight is kept between forward and backward (QLoRA's point).
    Both directions dequantize into the same scratch buffers (see _buffer)."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base = base
        step = _rows_per_block(base)
        x2 = x.reshape(-1, base.in_features).to(base.dtype)
        y = x2.new_empty(x2.shape[0], base.out_features)
        for i in range(0, base.out_features, step):
            j = min(i + step, base.out_features)
            torch.mm(x2, _dequantize_rows(base, i, j).T, out=y[:, i:j])
        if base.bias is not None:
            y += base.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], base.out_features)

    @staticmethod
    def backward(ctx, grad):
        return quant_grad_input(ctx.base, grad), None


def quant_grad_input(base, grad: torch.Tensor) -> torch.Tensor:
    """grad @ W for a quantized linear's weight W, dequantized a block of rows at a time."""
    step = _rows_per_block(base)
    g = grad.reshape(-1, grad.shape[-1]).to(base.dtype)
    gx = g.new_empty(g.shape[0], base.in_features)
    for i in range(0, base.out_features, step):
        j = min(i + step, base.out_features)
        w = _dequantize_rows(base, i, j)
        if i == 0:
            torch.mm(g[:, i:j], w, out=gx)
        else:
            gx.addmm_(g[:, i:j], w)
    return gx.reshape(*grad.shape[:-1], base.in_features)


def _rows_per_block(base) -> int:
    return max(16, (1 << 20) // base.in_features)   # a 4 MB float32 block


def frozen_forward(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) with the input's gradient also through a quantized linear (QLoRA)."""
    if not isinstance(linear, nn.Linear) and torch.is_grad_enabled() and x.requires_grad:
        return _QuantMatmul.apply(x, linear)
    return linear(x)


class _MaskedScale(torch.autograd.Function):
    """x * scale with the positions in `drop` zeroed; the same in backward (dropout's function)."""

    @staticmethod
    def forward(ctx, x, drop, scale: float):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(drop, 0), None, None


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout whose mask comes from 64 random bits per 4 elements (16 bits each, drop
    when below round(p * 65536)) instead of one Bernoulli draw per element: on CPU, torch's
    Bernoulli sampling took 12% of a LoRA training step (5x the cost of these bits). The drop
    probability is p rounded to 1/65536 and the scale is its exact inverse keep rate, so the
    expectation is x. Draws from torch's default generator (seeded runs are reproducible)."""
    n = x.numel()
    thr = round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    drop = bits.view(torch.int16)[:n].view(x.shape) < (thr - 32768)
    return _MaskedScale.apply(x, drop, 65536 / (65536 - thr))


class LoRALinear(nn.Module):
    """base(x) + scaling * concat over parts of (B_p @ A_p @ dropout(x)) on each targeted part's
    rows (zeros on the others). parts: (name, rows) for every part of the base's output in order;
    targets: the part names that get an adapter.

    The adapters are float32 (the optimizer's master copy); they compute in the base's dtype, as
    under autocast: over a bfloat16 base, A and B are cast to bfloat16 for the step (r rows each,
    small) and B's product is accumulated into the base output in place (one addmm_), so no
    full-size float32 copy of the input or the output, and no full-size cast, is made."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], targets, r: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = parts
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        dev = next(iter(base.buffers() if not isinstance(base, nn.Linear) else base.parameters())).device
        for name, rows in parts:
            if name in targets:
                a = torch.empty(r, self.in_features, device=dev)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init; B = 0
                self.lora_A[name] = nn.Parameter(a)
                self.lora_B[name] = nn.Parameter(torch.zeros(rows, r, device=dev))
        self.dropout_p = float(dropout)
        self.enabled = True
        self.merged = False

    @property
    def quantized(self) -> bool:
        return not isinstance(self.base, nn.Linear)

    def base_forward(self, x):
        return frozen_forward(self.base, x)

    def _dropout(self, x):
        return fast_dropout(x, self.dropout_p) if self.training and self.dropout_p > 0 else x

    def _xa(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """scaling * dropout(x) @ A^T for all targeted parts at once: [N, r * parts], in dtype."""
        names = list(self.lora_A.keys())
        a = torch.cat([self.lora_A[n] for n in names]) if len(names) > 1 else self.lora_A[names[0]]
        return F.linear(self._dropout(x2).to(dtype), a.to(dtype)) * self.scaling

    def delta(self, x) -> torch.Tensor:
        """scaling * B @ A @ x over the whole output (float32). The scaling goes on the rank-r
        product and the parts' B matrices act as one block matrix: one matmul writes the whole
        output, with no full-size scaling pass and no concatenation of per-part outputs."""
        names = list(self.lora_A.keys())
        return F.linear(self._xa(x, torch.float32), self._block_b(names))

    def _block_b(self, names: list[str]) -> torch.Tensor:
        """[out, r * len(names)]: each targeted part's B in its rows and its columns of xa, zeros
        elsewhere (rows of untargeted parts get no update)."""
        if len(self.parts) == 1:
            return self.lora_B[names[0]]
        cols, r = self.r * len(names), self.r
        rows = []
        for name, n in self.parts:
            if name in self.lora_B:
                k = names.index(name)
                rows.append(F.pad(self.lora_B[name], (k * r, cols - (k + 1) * r)))
            else:
                rows.append(self.lora_B[names[0]].new_zeros(n, cols))
        return torch.cat(rows)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self.base_forward(x2)
        if self.enabled and not self.merged:
            b = self._block_b(list(self.lora_A.keys())).to(y.dtype)
            xa = self._xa(x2, y.dtype)
            if isinstance(self.base, nn.Linear) or isinstance(y.grad_fn, _QuantMatmul._backward_cls):
                # the fresh output of F.linear / _QuantMatmul, which their backward does not save
                y = y.addmm_(xa, b.t())
            else:  # another kernel's output (decode paths may hand back their own buffers)
                y = torch.addmm(y, xa, b.t())
        return y.view(*shape[:-1], self.out_features)

    def weight_delta(self) -> torch.Tensor:
        """scaling * B @ A for the whole weight [out, in], float32 (zeros on untargeted parts)."""
        blocks = []
        for name, rows in self.parts:
            if name in self.lora_A:
                blocks.append(self.lora_B[name].float() @ self.lora_A[name].float())
            else:
                blocks.append(torch.zeros(rows, self.in_features, device=self.lora_A[next(iter(self.lora_A))].device))
        return torch.cat(blocks) * self.scaling

    @torch.no_grad()
    def merge(self):
        if self.quantized:
            raise ValueError("a LoRA over quantized weights cannot be merged into them; merge on float weights")
        if not self.merged:
            self.base.weight += self.weight_delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.weight_delta().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, parts={list(self.lora_A.keys())}"


def _linears(model: nn.Module):
    """(full name, parent, attribute, module) of every projection LoRA can target: the decoder's
    linears (float or quantized), not the lm_head, the MoE router or the shared-expert gate."""
    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            full = f"{name}.{attr}" if name else attr
            if attr in FUSED_PARTS or attr in TARGETS:
                if isinstance(child, LoRALinear) or hasattr(child, "out_features"):
                    yield full, mod, attr, child


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets=TARGETS,
             use_rslora: bool = False) -> nn.Module:
    """In place: every targeted projection becomes a LoRALinear; all other parameters are frozen.
    targets: PEFT names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."""
    targets = set(targets)
    unknown = targets - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, not {r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for full, mod, attr, lin in _linears(model):
        if isinstance(lin, LoRALinear):
            raise ValueError(f"{full} already has a LoRA adapter")
        names = FUSED_PARTS.get(attr, (attr,))
        sizes = getattr(mod, "splits", {}).get(attr, (lin.out_features,))
        if targets & set(names):
            setattr(mod, attr, LoRALinear(lin, list(zip(names, sizes)), targets, r, alpha, dropout, use_rslora))
    if not any(True for _ in lora_modules(model)):
        raise ValueError("no LoRA target found in the model")
    return model


def lora_modules(model: nn.Module):
    """(name, LoRALinear) pairs."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_modules(model) for p in (*m.lora_A.values(), *m.lora_B.values())]


def peft_name(module_name: str, part: str) -> str:
    """The PEFT/checkpoint module path of one part of a (possibly fused) model linear:
    model.layers.0.self_attn.qkv_proj + q_proj -> model.layers.0.self_attn.q_proj. Wrapper prefixes
    (activation checkpointing, FSDP) are dropped."""
    module_name = module_name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")
    parent = module_name.rpartition(".")[0]
    return f"{parent}.{part}" if parent else part


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def merge_lora(model: nn.Module) -> nn.Module:
    """In place: fold every adapter into its base weight and put the plain linear back."""
    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(mod, attr, child.base)
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are `model`'s own tensors (nothing is
    copied): replacing a submodule of the copy (add_lora) leaves `model` as it was. A module that
    appears twice (a tied embedding's table) is copied once. The compiled decode step, which
    records `model`'s own modules, is not carried over."""
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            new = copy.copy(m)  # a new __dict__ holding the same values: tensors, config, ...
            new._parameters, new._buffers = dict(m._parameters), dict(m._buffers)
            memo[id(m)] = new
            new._modules = {k: None if c is None else visit(c) for k, c in m._modules.items()}
        return memo[id(m)]

    out = visit(model)
    if hasattr(out, "decode_step"):
        out.decode_step = None
    return out
