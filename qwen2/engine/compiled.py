"""Compiled decode: the one-token step through torch.compile (Inductor's generated C++).

    model = qwen2.load_model(path, dtype="bfloat16").fuse()
    compile_decode(model)      # or qwen2.load(path, compile=True), `--compile` on the CLI
    model(next_ids, cache=cache, logits_to_keep=1)   # decode steps now run compiled

Why it pays on a CPU: batch-1 decoding streams every weight once per token, so its speed is the
memory bandwidth, and eager PyTorch falls short of it in two ways: ~300 small dispatches per token,
and matrix-vector products at ~60% of the bandwidth. Traced once, the step becomes one C++ function
per shape; each projection is written as multiply-and-sum over the (dequantized) weight, which
Inductor turns into a single vectorized pass that converts bf16 / int8 / int4 to float32 in
registers and accumulates in float32, so the weight is read exactly once at streaming speed; bf16, int8
and int4 weights use our C++ GEMV kernels (qwen2/kernels/__init__.py) inside the graph instead.

Fixed shapes make it traceable: the step attends over a prefix of the static KV cache rounded up
to a block of slots, with the positions mask hiding empty ones, and writes its keys at a slot
given as a tensor, so one compiled graph serves every step and every cache length (the length is
a dynamic dimension). Prefill, and any call that is not a plain one-token cached step, run eagerly.
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
from qwen2.kernels.memory import hugepage_weights, trim
from qwen2.quant.linear import PackedLinear, QuantLinear, gemv_input

# Attention spans the cache in blocks of this many slots: new views of the cache only every
# SLOT_BLOCK tokens, and at most SLOT_BLOCK - 1 empty slots read per step.
SLOT_BLOCK = 64
# Inductor recomputes cheap pointwise producers inside their consumers. A GEMV consumer would then
# redo the RMSNorm for every output row; realizing anything over a few ops keeps it to one pass.
# Guards on the model's modules (~300 parameters) cost ~1 ms a step to check; the step checks the
# model's structure itself instead (CompiledDecode._unchanged), so they are skipped.
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 8,
                     "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row product, when traced, streams the weight once: the qwen2 bf16 GEMV
    kernel for bf16 weights, else multiply-and-sum (see module doc)."""

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


class _StepCache:
    """The KV cache as the traced step sees it: fixed-shape views, writes at a slot tensor."""
    fixed_shape = True

    def __init__(self, k, v, positions, slot):
        self.k, self.v, self.positions, self.slot = k, v, positions, slot

    def begin(self, positions):
        return self.positions  # already holds this step's positions (written before the call)

    def update(self, layer, k, v):
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]


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
        return pk[self.keys].transpose(1, 2), pv[self.keys].transpose(1, 2)   # [n, KV, S, D]


def _paged_step(model, ids, pos, write_slots, key_slots, kpos, pk, pv):
    return model(ids, position_ids=pos, cache=_PagedStepCache(pk, pv, kpos, write_slots, key_slots), logits_to_keep=1)


def _step(model, ids, pos, slot, k, v, kpos):
    return model(ids, position_ids=pos, cache=_StepCache(k, v, kpos, slot), logits_to_keep=1)


class CompiledDecode:
    """Callable installed as `model.decode_step`: (ids [B, 1], KVCache) -> logits [B, 1, vocab]."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self._watch = _structure(model)
        # Dynamo keeps compiled graphs per code object, with a small limit: give each instance
        # its own code object, so that several models in one process never share (or exhaust) it.
        code = _step.__code__.replace(co_name=f"decode_step_{id(self):x}")
        self.step_fn = types.FunctionType(code, _step.__globals__, code.co_name)
        self._fn = torch.compile(self.step_fn, options=_INDUCTOR_OPTIONS)
        pcode = _paged_step.__code__.replace(co_name=f"paged_step_{id(self):x}")
        self._paged_fn = torch.compile(types.FunctionType(pcode, _paged_step.__globals__, pcode.co_name),
                                       options=_INDUCTOR_OPTIONS)

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

    def __call__(self, ids, cache):
        if not self._unchanged():
            # modules, weights or the attention kernel were swapped after compiling: the traced
            # step no longer describes this model (its module guards are off, see above)
            print("qwen2: the model changed after compile_decode; decoding eagerly "
                  "(call compile_decode again to recompile)", file=sys.stderr)
            self.model.decode_step = None
            return self.model(ids, cache=cache, logits_to_keep=1)
        n = cache.length
        if n + 1 > cache.max_len:
            raise ValueError(f"KV cache full: {n} + 1 tokens > {cache.max_len}")
        span = min(cache.max_len, -(-(n + 1) // SLOT_BLOCK) * SLOT_BLOCK)
        pos = cache.next_pos[:, None].clone()
        views = getattr(cache, "_step_views", None)
        if views is None or views[0] != span:
            # fixed view objects per span, kept on the cache (they live and die with it)
            k = [t[:, :, :span] for t in cache.k]
            v = [t[:, :, :span] for t in cache.v]
            for t in k + v:
                torch._dynamo.maybe_mark_dynamic(t, 2)
            cache._step_views = views = (span, k, v)
        _, k, v = views
        cache.positions[:, n] = pos[:, 0]
        # a copy with standard strides at every span (.contiguous() would hand back the view itself
        # for batch 1, whose row stride is the cache length: a second graph)
        kpos = cache.positions[:, :span].clone(memory_format=torch.contiguous_format)
        torch._dynamo.maybe_mark_dynamic(kpos, 1)
        try:
            logits = self._fn(self.model, ids, pos, torch.tensor([n]), k, v, kpos)
        except Exception as e:  # noqa: BLE001 - only the first call: compiling failed, not the model
            if self.calls:
                raise
            print(f"qwen2: compiled decode unavailable ({type(e).__name__}: {str(e).strip()[:300]}); "
                  "decoding eagerly", file=sys.stderr)
            self.model.decode_step = None
            cache.positions[:, n] = -1
            return self.model(ids, cache=cache, logits_to_keep=1)
        if not self.calls:
            trim()  # hand back the compiler's scratch memory (hundreds of MB) after the first step
        self.calls += 1
        cache.length = n + 1
        cache.next_pos = pos[:, 0] + 1
        return logits


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
    """In place: fuse projections and install the compiled one-token step (see module doc).
    Models the step cannot trace (MoE, custom attention kernels) are left eager, with a note on
    stderr. hugepages: move the weights into transparent huge pages (qwen2.kernels.memory). Returns the
    model."""
    why = can_compile(model)
    if why:
        print(f"qwen2: compiled decode not used: {why}; decoding eagerly", file=sys.stderr)
        return model
    model.fuse()
    if model.dtype == torch.bfloat16 or any(isinstance(m, QuantLinear) for m in model.modules()):
        kernels.available()  # build/load the CPU kernels now, not while tracing
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                g = GemvLinear.__new__(GemvLinear)
                g.__dict__.update(child.__dict__)  # same parameters, same names: no copy
                setattr(mod, name, g)
    if hugepages:
        hugepage_weights(model)  # also trims the heap (the unfused projections)
    else:
        trim()
    model.decode_step = CompiledDecode(model)  # after the moves: it records the final tensors
    return model
