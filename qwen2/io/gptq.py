"""The GPTQ checkpoint layout, read and written: official GPTQ releases and what
`qwen2 quantize` writes load through here onto `qwen2.quant.linear.QuantLinear`.

Saved layout (one entry per linear, named like the HF weight it replaces; a fused projection of
the model is saved, and loaded, as its parts: q_proj, k_proj, v_proj; gate_proj, up_proj):
    <name>.qweight  int32 [in * bits / 32, out]   q packed along `in`, lowest bits first
    <name>.qzeros   int32 [n_groups, out * bits / 32]   (z - 1) packed along `out` (classic AutoGPTQ)
    <name>.scales   float16 [n_groups, out]
    <name>.g_idx    int32 [in]                     group of each input (i // group_size)
    <name>.bias     as in the float checkpoint
config.json gets "quantization_config": {"quant_method": "gptq", "bits", "group_size", "sym",
"desc_act": false, "lm_head": bool}. Embeddings and norms stay in the float dtype; so does the
lm_head of int4 files (GPTQ has one `bits` per file), which loading quantizes to int8.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from qwen2.errors import CheckpointError, Qwen2Error
from qwen2.io.build import build_model
from qwen2.io.names import HF_NAMES
from qwen2.io.safetensors import write_safetensors
from qwen2.io.save import checkpoint_tensors
from qwen2.model.decoder import fused_linears
from qwen2.quant.linear import (
    INT4_GROUPS,
    QuantLinear,
    _targets,
    dequantize,
    pack_int4_halves,
    quantize_tensor,
    stored_scales,
)


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """uint values [R, C] -> int32 [R * bits / 32, C], lowest bits first along R."""
    per = 32 // bits
    v = v.to(torch.int64).reshape(-1, per, v.shape[-1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits)[None, :, None]
    packed = (v << shifts).sum(1)  # < 2**32, as int64
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def _unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R', C] -> uint8 [R' * 32 / bits, C]."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int64) * bits)[None, :, None]
    v = (p.to(torch.int64)[:, None, :] & 0xFFFFFFFF) >> shifts
    return (v & (2 ** bits - 1)).reshape(-1, p.shape[-1]).to(torch.uint8)


def to_gptq(q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
            zeros: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """QuantLinear inputs (q [out, in], scales and zeros [n_groups, out]) -> the four GPTQ
    tensors; the stored zero point is z - 1 (classic AutoGPTQ), so z = 0 cannot be stored."""
    out_f, in_f = q.shape
    g = in_f if group_size in (-1, None) else group_size
    if zeros is None:
        zeros = torch.full((scales.shape[0], out_f), 2 ** (bits - 1), dtype=torch.uint8)
    stored = zeros.to(torch.int16) - 1
    if bool((stored < 0).any()):
        raise Qwen2Error("GPTQ layout cannot store a zero point of 0 (it stores z - 1)")
    return {"qweight": _pack_rows(q.T.contiguous(), bits),
            "qzeros": _pack_rows(stored.T.contiguous(), bits).T.contiguous(),
            "scales": scales.to(torch.float16).contiguous(),
            "g_idx": (torch.arange(in_f) // g).to(torch.int32)}


def from_gptq(t: dict[str, torch.Tensor], bits: int, group_size: int, name: str, zero_offset: int = 1):
    """The four GPTQ tensors -> (q uint8 [out, in], scales float32 [n_groups, out], zeros uint8
    [n_groups, out]). zero_offset: 1 for the classic layout (stores z - 1), 0 for gptq_v2."""
    try:
        q = _unpack_rows(t["qweight"], bits).T.contiguous()
        zeros = _unpack_rows(t["qzeros"].T.contiguous(), bits).T.to(torch.int16) + zero_offset
        scales = t["scales"].float()
    except KeyError as e:
        raise CheckpointError(f"{name}: missing GPTQ tensor {e}") from None
    out_f, in_f = q.shape
    g = in_f if group_size in (-1, None) else group_size
    if "g_idx" in t and not torch.equal(t["g_idx"].long(), torch.arange(in_f) // g):
        raise CheckpointError(f"{name}: act-order GPTQ (desc_act, permuted g_idx) is not supported")
    if bool((zeros > 2 ** bits - 1).any()):
        raise CheckpointError(f"{name}: zero points out of range for {bits} bits")
    return q, scales, zeros.to(torch.uint8)


def save_quantized(model, out_dir, bits: int | None = None, group_size: int | None = None,
                   lm_head: bool | None = None, sym: bool | None = None):
    """Write a model in the GPTQ layout (HF names: fused projections are written as their parts).

    A float model is quantized here, round-to-nearest (bits, group_size (default 128), sym
    (default True)). A model that
    quantize_model (either method) already quantized is written as it is: its QuantLinears' own
    q / scales / zeros, with bits, group_size and sym taken from it (the arguments may be left
    out, and must agree if given); a target linear still float is rounded to nearest.

    The lm_head is stored int8 in int8 files and, by default, float in int4 files (GPTQ has one
    `bits` per file; loading requantizes a float head to int8, see load_gptq): an int4 file of an
    untied model therefore needs the head float in memory (quantize_model(..., lm_head=False))."""
    quant = model.quant
    if quant:
        given = {"bits": bits, "group_size": None if quant["bits"] == 8 else group_size,
                 "sym": None if quant["bits"] == 8 else sym}
        for k, v in given.items():
            if v is not None and v != quant[k]:
                raise Qwen2Error(f"the model is already quantized with {k}={quant[k]}, not {v}")
        bits, gs, sym = quant["bits"], quant["group_size"], quant["sym"]
    else:
        if bits is None:
            raise Qwen2Error("save_quantized: bits is needed for a float model")
        gs = -1 if bits == 8 else (group_size or 128)
        sym = sym is not False or bits == 8
    if lm_head is None:
        lm_head = bits == 8
    tied = model.config.tie_word_embeddings
    if not lm_head and not tied and isinstance(model.lm_head, QuantLinear):
        raise Qwen2Error("this file keeps the lm_head float, but the model's lm_head is quantized: "
                         "quantize with lm_head=False (or save with lm_head=True)")
    targets = {full: lin for full, _, _, lin in _targets(model, lm_head, quantized=True)}
    fused = fused_linears(model)
    tensors: dict[str, torch.Tensor] = {}
    for mod, lin in targets.items():
        if isinstance(lin, QuantLinear):
            if lin.bits != bits or (bits == 4 and lin.group_size != gs):
                raise Qwen2Error(f"{mod} is int{lin.bits} group {lin.group_size}; the file is int{bits} group {gs}")
            q, s, z = lin.quantized()
        else:  # rows are quantized independently: the fused weight at once is its parts one by one
            q, s, z = quantize_tensor(lin.weight.data, bits, gs, sym=sym)
        lo = 0
        for name, n in _parts(mod, fused, q.shape[0]):
            tensors.update({f"{name}.{k}": v for k, v in
                            to_gptq(q[lo:lo + n], s[:, lo:lo + n], bits, gs, z[:, lo:lo + n]).items()})
            if lin.bias is not None:
                tensors[f"{name}.bias"] = lin.bias.data[lo:lo + n].contiguous()
            lo += n
    head_quantized = isinstance(model.lm_head, QuantLinear)
    for name, t in checkpoint_tensors(model, skip=lambda m: m in targets or (m == "lm_head" and head_quantized)):
        tensors[name] = t.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors.items(), out)
    cfg = model.config.to_hf_dict(str(model.dtype).removeprefix("torch."))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym,
                                  "desc_act": False, "lm_head": lm_head, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _parts(module: str, fused: dict, rows: int) -> list[tuple[str, int]]:
    """(checkpoint module name, output rows) of each part of a model linear (one if not fused)."""
    if module not in fused:
        return [(HF_NAMES.to_checkpoint(module), rows)]
    return [(HF_NAMES.to_checkpoint(module, k), n) for k, n in enumerate(fused[module])]


def load_gptq(config, tensors, dtype, device="cpu", source="checkpoint", release=None, float_head=False):
    """Build a model from a GPTQ-layout tensor stream (classic AutoGPTQ, or GPTQModel's
    `checkpoint_format: gptq_v2`, which stores z instead of z - 1). release, float_head: as
    load_packed's."""
    qc = config.raw.get("quantization_config") or {}
    bits, gs = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if bits not in (4, 8) or qc.get("desc_act"):
        raise CheckpointError(f"{source}: GPTQ bits={bits} desc_act={qc.get('desc_act')} "
                              "is not supported (4 or 8 bits, no act-order)")
    offset = 0 if qc.get("checkpoint_format") == "gptq_v2" else 1
    unpack = lambda t, name: from_gptq(t, bits, gs, name, zero_offset=offset)
    model = load_packed(config, tensors, dtype, device, source, release, ("qweight", "qzeros", "scales", "g_idx"),
                        unpack, bits, gs, bool(qc.get("lm_head", False)), float_head)
    model.quant["sym"] = bool(qc.get("sym", True))
    return model


def load_packed(config, tensors, dtype, device, source, release, leaves: tuple, unpack, bits: int, gs: int,
                lm_head: bool, float_head: bool = False):
    """Build a model from a stream of packed quantized linears (GPTQ, AWQ): float tensors go
    through the usual name/shape checks; each quantized linear, once its `leaves` are in (all of
    its parts' for a fused projection), is unpacked by `unpack(tensors, name) -> (q uint8 [out, in],
    scales float32 [n_groups, out], zeros uint8 [n_groups, out])` and becomes a QuantLinear where
    our kernels take its layout, a float Linear holding its exact dequantization otherwise. A float
    head in the file (lm_head false) is rounded to int8 unless float_head (GGUF export keeps the
    file's own values)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    quantized: dict[str, tuple] = {}
    int8_head: list[QuantLinear] = []

    def float_tensors():
        for name, t in tensors:
            if name == "lm_head.weight" and not lm_head and not float_head:
                # a float head in the file (GPTQ's default): int8 at run time (+0.03% perplexity),
                # rounded straight from the file a block of rows at a time (no float copy)
                int8_head.append(_int8_weight_rows(t, dtype, release=release))
                yield name, torch.empty(t.shape, device="meta")
                continue
            mod, _, leaf = name.rpartition(".")
            if leaf in leaves:
                pending.setdefault(mod, {})[leaf] = t
                if len(pending[mod]) == len(leaves):
                    packed = pending.pop(mod)
                    q, sc, z = unpack(packed, f"{source}: {mod}")
                    shape = q.shape
                    # held until the model is built: int4 as the two-per-byte rows QuantLinear keeps
                    # (not one byte per weight), and the file's pages of the packed tensors let go
                    # (they were copied): loading peaks near the loaded model, not at 2-3x it
                    if bits == 4 and gs in INT4_GROUPS and shape[1] % gs == 0:
                        q = _Int4Rows(pack_int4_halves(q, gs), shape[1])
                    quantized[mod] = (q, sc, z)
                    if release is not None:
                        for x in packed.values():
                            release(x)
                    del packed
                    _malloc_trim()  # the unpacked temporaries go back to the system, not to a growing heap
                    yield f"{mod}.weight", torch.empty(shape, device="meta")
                continue
            yield name, t

    # Tied embeddings with a quantized head: load as untied (the head is its own tensor).
    cfg = config
    if lm_head and config.tie_word_embeddings:
        cfg = dataclasses.replace(config, tie_word_embeddings=False)
    # Quantized linears arrive as meta placeholders, which build_model leaves unallocated.
    model = build_model(cfg, float_tensors(), dtype, device, source=source, release=release)
    if pending:
        raise CheckpointError(f"{source}: incomplete quantized tensors for {', '.join(sorted(pending))[:200]}")
    if set(quantized) and not lm_head:
        quantized.pop("lm_head", None)
    fused = fused_linears(model)
    for full, mod, attr, lin in _targets(model, lm_head):
        parts = [name for name, _ in _parts(full, fused, lin.out_features)]
        for name in parts:
            if name not in quantized:
                raise CheckpointError(f"{source}: {name} is not quantized (expected {'/'.join(leaves)} tensors)")
        # q [out, in], scales and zeros [n_groups, out]: the parts' rows one after the other
        qs, ss, zs = zip(*(quantized.pop(n) for n in parts))
        s, z = torch.cat(ss, 1), torch.cat(zs, 1)
        bias = None if lin.bias is None else lin.bias.data
        if isinstance(qs[0], _Int4Rows):
            setattr(mod, attr, _int4_linear(torch.cat([x.rows for x in qs]), qs[0].in_features, s, z, gs, bias,
                                            dtype, device))
        else:
            setattr(mod, attr, quant_linear(torch.cat(qs), s, z, bits, gs, bias, dtype, device))
    model.config = config
    if not lm_head and not float_head:  # float head in the file (GPTQ's default): int8 at run time, +0.03% perplexity
        if int8_head:
            head = int8_head[0]
            b = model.lm_head.bias
            head.bias = None if b is None else torch.nn.Parameter(b.detach().to(dtype))
            model.lm_head = head
        else:  # tied: the embedding's table, which stays float for lookups
            model.lm_head = int8_rows(model.lm_head, dtype)
    model.quant = {"bits": bits, "group_size": gs, "sym": True, "lm_head": 8 if not lm_head else bits}
    return model


_libc = None


def _malloc_trim():
    """glibc's malloc_trim(0): a no-op where unavailable."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(0)


@dataclasses.dataclass
class _Int4Rows:
    """An int4 weight already in QuantLinear's packed rows (uint8 [out, in / 2])."""
    rows: torch.Tensor
    in_features: int


def _int4_linear(rows: torch.Tensor, in_features: int, s, z, gs: int, bias, dtype, device="cpu") -> QuantLinear:
    """QuantLinear(q, s, 4, gs, bias, dtype, z) from q already packed into its rows (the same
    buffers as that call makes)."""
    lin = QuantLinear(torch.zeros(1, gs, dtype=torch.uint8), torch.ones(1, 1), 4, gs, None, dtype)
    lin.out_features, lin.in_features = rows.shape[0], in_features
    lin.qweight = rows.to(device)
    lin.scales = s.T.to(device=device, dtype=dtype).contiguous()
    lin.zeros = None if bool((z == 8).all()) else z.T.contiguous().to(device)
    lin.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(device=device, dtype=dtype))
    return lin


def int8_rows(lin: torch.nn.Linear, dtype, rows: int = 4096, release=None) -> QuantLinear:
    """`QuantLinear.from_linear(lin, 8, -1, dtype)` (the same values: one scale per output row),
    quantized a block of rows at a time straight into the int8 weight, so the temporaries are a
    block's, not the whole head's: the whole [151936, 896] head at once took 1.8 GB beyond the
    loaded model (a 2.7 GB peak to load a 0.57 GB int4 file of Qwen2.5-0.5B)."""
    head = _int8_weight_rows(lin.weight.data, dtype, rows, release)
    head.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().to(dtype))
    return head


def _int8_weight_rows(w: torch.Tensor, dtype, rows: int = 4096, release=None) -> QuantLinear:
    """int8_rows of a weight (no bias) in any float dtype, each block of rows taken to `dtype`
    first (the values the loaded model would hold); `release(block)` after each block."""
    n, k = w.shape
    qweight = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=dtype)
    for i in range(0, n, rows):
        q, sc, _ = quantize_tensor(w[i:i + rows].to(dtype), 8, -1, sym=True)
        qweight[i:i + rows] = q.to(torch.int16) - 128    # the int8 layout QuantLinear holds
        scales[i:i + rows] = stored_scales(sc, dtype)[0]
        if release is not None:  # the file's float rows, now int8, leave resident memory block by block
            release(w[i:i + rows])
    head = QuantLinear(torch.full((1, k), 128, dtype=torch.uint8), torch.ones(1, 1), 8, -1, None, dtype)
    head.out_features, head.qweight, head.scales = n, qweight, scales
    return head


def quant_linear(q, s, z, bits: int, gs: int, bias, dtype, device="cpu") -> torch.nn.Module:
    """QuantLinear where our kernels take the layout (int4 in groups of 32..256, any zero points;
    int8 with one symmetric scale per output channel); otherwise (int8 in groups: the official
    GPTQ-Int8 releases' group 128) a float Linear holding the exact dequantization, in dtype."""
    sym8 = bits == 8 and s.shape[0] == 1 and bool((z == 128).all())
    if sym8 or (bits == 4 and gs in INT4_GROUPS and q.shape[1] % gs == 0):
        return QuantLinear(q, s, bits, gs, bias, dtype, z)
    lin = torch.nn.Linear(q.shape[1], q.shape[0], bias=bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(dequantize(q, s, bits, z).to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin
