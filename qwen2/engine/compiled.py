"""Compiled decode: the engine's decode-only step through torch.compile (Inductor's generated C++).

    compile_decode(model)      # what qwen2.engine.runner.prepare does for bf16 / int8 / int4
    # the engine then runs every decode-only step through model.decode_step.paged(step, pool)

Why it pays on a CPU: batch-1 decoding streams every weight once per token, so its speed is the
memory bandwidth, and eager PyTorch falls short of it in two ways: ~300 small dispatches per token,
and matrix-vector products well below the bandwidth. Traced once, the step becomes one C++
function per shape; each projection is written as multiply-and-sum over the (dequantized) weight,
which Inductor turns into a single vectorized pass that converts bf16 / int8 / int4 to float32 in
registers and accumulates in float32, so the weight is read exactly once at streaming speed; bf16,
int8 and int4 weights use our C++ GEMV kernels (qwen2.kernels) inside the graph instead.

Fixed shapes make it traceable: each row attends over its keys in the engine's paged KV pool,
read at their pool slots inside the graph, padded to a block of SLOT_BLOCK slots with the
positions mask hiding the padding; this step's keys are written at slots given as a tensor. The
span and the pool size are dynamic dimensions, so one graph serves every step of every
generation (one for a single row, one for several). Prefill and mixed steps run eagerly.
Compiling takes 30-60 s the first time on 2 cores (Inductor caches it on disk for later runs); if
no C++ compiler is there, the first step says so on stderr and decoding stays eager.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from qwen2 import kernels
from qwen2.engine.fast import replace_modules
from qwen2.kernels.memory import hugepage_weights, trim
from qwen2.quant.linear import PackedLinear, QuantLinear, gemv_input

# Attention spans the cache in blocks of this many slots: new views of the cache only every
# SLOT_BLOCK tokens, and at most SLOT_BLOCK - 1 empty slots read per step.
SLOT_BLOCK = 64
# Inductor recomputes cheap pointwise producers inside their consumers. A GEMV consumer would then
# redo the RMSNorm for every output row; realizing anything over a few ops keeps it to one pass.
# Dynamo's guards on every module and parameter cost more per step than a check of the model's
# structure (CompiledDecode._unchanged), so they are skipped and the step checks that instead.
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 8,
                     "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row product, when traced, streams the weight once: the qwen2 bf16 GEMV
    kernel for bf16 weights, else multiply-and-sum (see module doc)."""

    @classmethod
    def of(cls, lin: nn.Linear) -> "GemvLinear":
        """The same weight and bias (no copy) behind this forward."""
        g = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        g.weight, g.bias = lin.weight, lin.bias
        return g

    def forward(self, x):
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            if self.weight.dtype == torch.bfloat16 and kernels.available():
                y = torch.ops.qwen2.bf16_gemv(x.reshape(1, -1), self.weight)[0]
            else:
                y = (gemv_input(x) * self.weight.float()).sum(-1)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class _PagedStepCache:
    """The engine's paged KV pool as the traced step sees it: this step's keys are written at
    their pool slots, and each row reads its keys from the pool at its own slots (padding rows of
    the span point at slot 0 and are masked by position -1); Inductor folds that gather into the
    attention it feeds, so no copy of the keys is made."""
    fixed_shape = True

    def __init__(self, pk, pv, kpos, write_slots, key_slots):
        self.pk, self.pv, self.kpos, self.write, self.keys = pk, pv, kpos, write_slots, key_slots

    def begin(self, positions):
        return self.kpos

    def update(self, layer, k, v):
        pk, pv = self.pk[layer], self.pv[layer]
        pk.index_copy_(0, self.write, k[:, :, 0])
        pv.index_copy_(0, self.write, v[:, :, 0])
        # Gathered once into a buffer of their own: read through the slot index inside the
        # attention loop, the keys would be re-gathered for every query head of the group.
        from torch._inductor import inductor_prims  # noqa: F401  (registers the op)
        k, v = pk[self.keys], pv[self.keys]                                     # [n, S, KV, D]
        k = torch.ops.prims.inductor_force_stride_order(k, k.stride())
        v = torch.ops.prims.inductor_force_stride_order(v, v.stride())
        return k.transpose(1, 2), v.transpose(1, 2)                             # [n, KV, S, D]


def _paged_step(model, ids, pos, write_slots, key_slots, kpos, pk, pv):
    return model(ids, position_ids=pos, cache=_PagedStepCache(pk, pv, kpos, write_slots, key_slots), logits_to_keep=1)


class CompiledDecode:
    """Installed as `model.decode_step` by compile_decode; the engine calls `paged(step, pool)`."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self._watch = _structure(model)
        # Dynamo keeps compiled graphs per code object, with a small limit: give each instance
        # its own code object, so that several models in one process never share (or exhaust) it.
        self._paged_code = _paged_step.__code__.replace(co_name=f"paged_step_{id(self):x}")
        self._paged_fn = torch.compile(types.FunctionType(self._paged_code, _paged_step.__globals__,
                                                          self._paged_code.co_name), options=_INDUCTOR_OPTIONS)

    def _unchanged(self) -> bool:
        attrs, items = self._watch
        return (all(getattr(o, a) is v for o, a, v in attrs)
                and all(d.get(k) is v for d, k, v in items))

    def paged(self, step, pool):
        """One decode-only engine step (qwen2.engine.paged.PackedStep) through the traced graph:
        logits [n, vocab] for the step's n rows, or None when the step must run eagerly (the
        model changed after compiling, or compiling failed: said once on stderr)."""
        if not self._unchanged():
            print("qwen2: the model changed after compile_decode; decoding eagerly "
                  "(call compile_decode again to recompile)", file=sys.stderr)
            self.model.decode_step = None
            return None
        d = step.decode
        n = d.n
        span = -(-d.s_max // SLOT_BLOCK) * SLOT_BLOCK
        key_slots = F.pad(d.key_slots.view(n, d.s_max), (0, span - d.s_max))
        kpos = F.pad(d.k_pos, (0, span - d.s_max), value=-1)
        ids, pos = step.input_ids.view(n, 1), step.position_ids.view(n, 1)
        for t in (key_slots, kpos):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        for t in pool.k + pool.v:  # pools are sized per engine: one graph for any size
            torch._dynamo.maybe_mark_dynamic(t, 0)
        if not self.calls:
            # Users should know why the first reply waits.
            print("qwen2: compiling the decode step (up to a minute the first time on this machine; "
                  "cached afterwards; --eager skips it)", file=sys.stderr, flush=True)
        try:
            logits = self._paged_fn(self.model, ids, pos, step.new_slots, key_slots, kpos, pool.k, pool.v)
        except Exception as e:  # noqa: BLE001 - only the first call: compiling failed, not the model
            if self.calls:
                raise
            print(f"qwen2: compiled decode unavailable ({type(e).__name__}: {str(e).strip()[:300]}); "
                  "decoding eagerly", file=sys.stderr)
            self.model.decode_step = None
            return None
        if not self.calls:
            trim()  # hand back the compiler's scratch memory (hundreds of MB) after the first step
        self.calls += 1
        return logits[:, 0]


def _structure(model) -> tuple[list, list]:
    """What the traced step was specialized on, as (object, attribute, value) and (dict, key,
    value) triples: the rotary, each attention kernel, each module in its parent, each parameter
    and buffer."""
    attrs = [(model, "rotary", model.rotary)]
    items = []
    for mod in model.modules():
        for table in (mod._modules, mod._parameters, mod._buffers):
            items += [(table, name, value) for name, value in table.items()]
        if hasattr(mod, "attn_fn"):
            attrs.append((mod, "attn_fn", mod.attn_fn))
    return attrs, items


def can_compile(model) -> str | None:
    """Why this model cannot take the compiled step (None: it can)."""
    from qwen2.model.decoder import SparseMoE, sdpa_attention
    from qwen2.model.rope import Rotary
    if any(isinstance(m, SparseMoE) for m in model.modules()):
        return "MoE layers route tokens with data-dependent shapes"
    if any(getattr(m, "attn_fn", sdpa_attention) is not sdpa_attention for m in model.modules()):
        return "a custom attention kernel is installed (long-context mode)"
    if type(model.rotary) is not Rotary:
        return "position-dependent rotary scaling"
    if any(isinstance(m, PackedLinear) or (isinstance(m, QuantLinear) and m.packed)
           for m in model.modules()):
        return "weights are pre-packed for the eager kernels (compile before pack_linears)"
    return None


def compile_decode(model, hugepages: bool = True):
    """In place: install the compiled one-token step (see module doc).
    Models the step cannot trace (MoE, custom attention kernels) are left eager, with a note on
    stderr. hugepages: move the weights into transparent huge pages (qwen2.kernels.memory). Returns the
    model."""
    why = can_compile(model)
    if why:
        print(f"qwen2: compiled decode not used: {why}; decoding eagerly", file=sys.stderr)
        return model
    if model.dtype == torch.bfloat16 or any(isinstance(m, QuantLinear) for m in model.modules()):
        kernels.available()  # build/load the CPU kernels now, not while tracing
    replace_modules(model, nn.Linear, GemvLinear.of)
    if hugepages:
        hugepage_weights(model)  # also trims the heap
    else:
        trim()
    model.decode_step = CompiledDecode(model)  # after the moves: it records the final tensors
    return model
