"""Model speed transforms for serving (applied once, after load, by `qwen2 serve`).

Serving runs the model on one row (a lone request), on many (16 decoding requests = a
[16, hidden] matrix per projection) and on long prefills, and the default float matmul (MKL's
sgemm behind `F.linear`) is slow at small row counts on this kind of CPU (MKL picks its AVX2 path
on AMD processors). Two replacements, chosen per dtype:

* float32: `F32Linear`, qwen2's own kernel (`torch.ops.qwen2.f32_linear`, qwen2/kernels/csrc/f32_linear.cpp)
  over the weight packed once into 16-column blocks. One copy of the weights serves every row
  count: one row streams each block at memory bandwidth, a batch meets each loaded weight vector
  with 6 rows at once in registers. A tied embedding reads its rows from the packed lm_head
  (`F32Embedding`), so the vocabulary matrix is held once. Every output is one fp32 accumulation
  in k order, the same for any number of rows: a request's projections do not depend on what it
  is batched with. The packed weights live in one mapping advised for transparent huge pages
  (`qwen2.kernels.memory.hugepage_mapping`), and nothing is left pointing into the checkpoint file.
  RMSNorm and the MLP's silu(gate) * up become one-pass ops
  (`F32RMSNorm`, `F32MLP`), and the engine's decode attention and greedy argmax use qwen2's
  kernels too (engine/paged.py, engine.py).
* bfloat16 (and float32 where the kernels cannot be built): `OneDNNLinear` (qwen2.quant.linear),
  oneDNN's inner product with the weight reordered once (faster than MKL at small row counts).

Same math as `F.linear`, different summation order: results agree to float rounding (the same
latitude a batched MKL matmul already has against a one-row one).
"""
from __future__ import annotations

import torch
from torch import nn

from qwen2 import kernels
from qwen2.kernels.memory import hugepage_mapping
from qwen2.model.attention import Attention, rotate_qk
from qwen2.model.decoder import MLP, RMSNorm
from qwen2.quant.linear import OneDNNLinear


class F32Linear(nn.Module):
    """A float32 linear over qwen2's packed layout (`kernels.f32_pack`: [ceil(N/16), K, 16])."""

    def __init__(self, lin: nn.Linear, packed: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("packed", kernels.f32_pack(lin.weight) if packed is None else packed)
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float().contiguous())

    def forward(self, x):
        return torch.ops.qwen2.f32_linear(x, self.packed, self.out_features, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, qwen2 f32 packed"


class F32Embedding(nn.Module):
    """Embedding lookups from a packed float32 [vocab, hidden] matrix (a tied lm_head's): row v is
    packed[v // 16, :, v % 16]. `weight` is the packed tensor itself (dtype and device for
    `Qwen2.dtype` / `.device`); it is not the [vocab, hidden] matrix."""

    def __init__(self, packed: torch.Tensor, num_embeddings: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, packed.shape[1]
        self.register_buffer("packed", packed)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed

    def forward(self, ids):
        return kernels.f32_unpack_rows(self.packed, ids)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, from the packed lm_head"


def replace_modules(model: nn.Module, kind: type, make) -> None:
    """Put make(module) in place of every module of exactly type `kind` (a speed pass: the new
    module shares the old one's parameters)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))


class F32MLP(MLP):
    """The model's MLP with silu(gate) * up in one pass over the fused gate/up output
    (`torch.ops.qwen2.silu_mul`) instead of a strided chunk, silu and multiply."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)  # the same projections, not new ones
        self.gate_up_proj, self.down_proj, self.splits = mlp.gate_up_proj, mlp.down_proj, mlp.splits

    def forward(self, x):
        if x.dtype == torch.float32:
            return self.down_proj(torch.ops.qwen2.silu_mul(self.gate_up_proj(x)))
        return super().forward(x)


class F32RMSNorm(RMSNorm):
    """The model's RMSNorm in one pass (`torch.ops.qwen2.rms_norm`) for float32."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.ops.qwen2.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def rotate_in_place(q, k, cos, sin):
    """Attention.rotate for float32 inference: q and k (fresh views of the projection's output)
    rotated in place by one kernel call each (`torch.ops.qwen2.rope_`, the same bits as
    apply_rope's six ops). Autograd and other dtypes take the model's own rotate_qk."""
    if q.dtype == torch.float32 and cos.dtype == torch.float32 and not (q.requires_grad or k.requires_grad):
        return torch.ops.qwen2.rope_(q, cos, sin), torch.ops.qwen2.rope_(k, cos, sin)
    return rotate_qk(q, k, cos, sin)


def _own_memory(model):
    """Copy every parameter and buffer that is not in the packed-weight mapping into memory of
    its own: a checkpoint loaded from a memory-mapped file leaves the norms and biases as views of
    the file, which keep the whole mapping (every page the packing read: the size of the
    weights) resident. Then return the freed heap to the OS."""
    from qwen2.kernels.memory import trim
    arena = getattr(model, "_f32_arena", None)
    lo = hi = 0
    if arena is not None:
        raw = torch.frombuffer(arena, dtype=torch.uint8)
        lo, hi = raw.data_ptr(), raw.data_ptr() + raw.numel()
    seen: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.is_mkldnn or lo <= t.data_ptr() < hi:
                    continue
                key = id(t)
                if key not in seen:
                    seen[key] = t.detach().clone()
                if isinstance(t, nn.Parameter):
                    t.data = seen[key]
                else:
                    table[name] = seen[key]
    trim()


def onednn_supported(model) -> bool:
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if model.dtype == torch.float32:
        return True
    # bf16 inner products need AVX512 (bf16 or at least BW); elsewhere oneDNN is no gain.
    return OneDNNLinear.supported(model.dtype)


def f32_supported(model) -> bool:
    return model.device.type == "cpu" and model.dtype == torch.float32 and kernels.available()


@torch.no_grad()
def prepare_for_serving(model, batch_hint: int = 16, huge_pages: bool = True):
    """In place: give every plain float linear (lm_head included; q/k/v and gate/up are already one
    matmul each) a faster kernel (see the module docstring); packed float32 weights go into
    transparent huge pages unless `huge_pages` is False. Quantized or otherwise special linears
    are left alone. Returns the model."""
    if f32_supported(model):
        _use_f32_kernels(model, huge_pages)
        from qwen2.quant.blocks import BlockLinear
        if not any(isinstance(m, BlockLinear) for m in model.modules()):  # GGUF blocks are copies already
            _own_memory(model)
        return model
    if not onednn_supported(model):
        return model
    for mod in list(model.modules()):
        for attr, child in list(mod.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == model.dtype and child.out_features > 1:
                setattr(mod, attr, OneDNNLinear(child, batch_hint))
    _own_memory(model)
    return model


def _use_f32_kernels(model, huge_pages: bool = True):
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    tied = type(emb) is nn.Embedding and type(head) is nn.Linear and head.weight is emb.weight
    todo = [(mod, attr, child) for mod in list(model.modules()) for attr, child in list(mod.named_children())
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.out_features > 1]
    # All packed weights in one mapping, each packed straight into its place (64-byte aligned):
    # peak memory is the original weights plus one packed copy.
    shapes = [(-(-c.out_features // 16), c.in_features, 16) for _, _, c in todo]
    sizes = [-(-(a * b * c * 4) // 64) * 64 for a, b, c in shapes]
    if huge_pages and todo:
        model._f32_arena, arena, _ = hugepage_mapping(sum(sizes))  # 2 MB pages where Linux has them
    off = 0
    for (mod, attr, child), shape, size in zip(todo, shapes, sizes):
        out = arena[off:off + size].view(torch.float32)[:shape[0] * shape[1] * 16].view(shape) if huge_pages else None
        setattr(mod, attr, F32Linear(child, kernels.f32_pack(child.weight, out)))
        off += size
    if tied:
        # The embedding reads the packed lm_head: the vocabulary matrix is held once.
        model.model.embed_tokens = F32Embedding(model.lm_head.packed, emb.num_embeddings)
    replace_modules(model, MLP, F32MLP)  # same parameters, one-pass forwards
    replace_modules(model, RMSNorm, F32RMSNorm)
    for mod in model.modules():
        if isinstance(mod, Attention) and mod.rotate is rotate_qk:
            mod.rotate = rotate_in_place
