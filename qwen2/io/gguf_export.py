"""Write a model as a GGUF file that llama.cpp, Ollama and LM Studio run: what llama.cpp's
`convert_hf_to_gguf.py` writes for architecture `qwen2` / `qwen2moe` (and, for q4_0 / q4_k_m,
what `llama-quantize` then makes of it).

Tensors are the model's own, named through the GGUF name table read backwards (GGUF_NAMES), so
every format we load (HF, GGUF, first-generation Qwen, GPTQ, AWQ) exports. Which tensor gets
which type follows llama.cpp:
  * 1-D tensors (norms, biases) and the MoE router stay F32, as in every llama.cpp file;
  * f32 / f16 / bf16 / q8_0: every other weight in that type (convert_hf_to_gguf's --outtype);
  * q4_0: Q4_0, except the output head (the embedding, when tied) which llama-quantize keeps at
    Q6_K, or Q8_0 where its width is not a multiple of 256 (Qwen2-0.5B's 896);
  * q4_k_m: llama-quantize's Q4_K_M mix (Q4_K; Q6_K for the head and for attn_v / ffn_down of
    the layers `use_more_bits` picks), each K type falling back to a 32-block type (Q4_K -> Q5_0,
    Q6_K -> Q8_0) on rows whose width is not a multiple of 256.
Quantizers: the `gguf` package's (bit-exact ports of ggml's reference rows) where it has them;
Q4_K and Q6_K, which it only dequantizes, ported here from ggml-quants.c (quantize_row_q*_K_ref,
float32 arithmetic in C's order, so the bytes match llama-quantize's).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen2.errors import Qwen2Error
from qwen2.io.gguf import GGUF_NAMES
from qwen2.io.save import checkpoint_tensors
from qwen2.model.decoder import Qwen2

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")


def _gguf():
    import gguf
    return gguf


def file_type(outtype: str):
    g = _gguf().LlamaFileType
    return {"f32": g.ALL_F32, "f16": g.MOSTLY_F16, "bf16": g.MOSTLY_BF16, "q8_0": g.MOSTLY_Q8_0,
            "q4_0": g.MOSTLY_Q4_0, "q4_k_m": g.MOSTLY_Q4_K_M}[outtype]


# ----------------------------------------------------------------------------- tensor types
def _use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's choice of layers that get more bits in the K mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], outtype: str, n_layers: int, tied: bool):
    """The GGML type llama.cpp gives this tensor in a file of `outtype` (see the module doc)."""
    Q = _gguf().GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return Q.F32
    if outtype in ("f32", "f16", "bf16"):
        return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[outtype]
    ncols = shape[-1]
    if outtype == "q8_0":
        return Q.Q8_0 if ncols % 32 == 0 else Q.F16  # convert_hf_to_gguf's fallback on a QuantError
    base = Q.Q4_0 if outtype == "q4_0" else Q.Q4_K
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    if head:
        t = Q.Q8_0 if ncols % 256 else Q.Q6_K
    elif outtype == "q4_k_m" and (name.endswith(".attn_v.weight") or ".ffn_down" in name):
        t = Q.Q6_K if _use_more_bits(_layer(name), n_layers) else base
    else:
        t = base
    fallback = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}
    if ncols % _gguf().GGML_QUANT_SIZES[t][0]:
        t = fallback.get(t, t)
    if ncols % _gguf().GGML_QUANT_SIZES[t][0]:
        t = Q.F16  # llama-quantize's last resort for widths not a multiple of 32
    return t


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """float32 rows -> the bytes (or F32/F16 values) of `qtype`, as ggml's reference quantizers."""
    g = _gguf()
    Q = g.GGMLQuantizationType
    if qtype == Q.Q6_K:
        return _rows(x, _q6_k)
    if qtype == Q.Q4_K:
        return _rows(x, _q4_k)
    if qtype == Q.F16:  # gguf's F16 "quantizer" is a plain cast too; this skips its lazy wrapper
        return x.astype(np.float16)
    if qtype == Q.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    return g.quants.quantize(x, qtype)


def _rows(x: np.ndarray, fn, chunk: int = 1 << 20) -> np.ndarray:
    """Apply a 256-block quantizer a few million values at a time (its temporaries are ~40x the
    input)."""
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, chunk // flat.shape[1])
    with np.errstate(all="ignore"):  # flat or all-zero blocks divide by zero, as in C, then are masked
        out = np.concatenate([fn(flat[i:i + step]) for i in range(0, flat.shape[0], step)])
    return out.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------- ggml-quants.c reference quantizers, ported
# Every operation is a float32 one, in C's order: the sums over the 16 (or 32) values of a
# sub-block are taken one value at a time, as C's loops do (no pairwise sums), so the results are
# bit-identical to quantize_row_q6_K_ref / quantize_row_q4_K_ref.
_F = np.float32
_GROUP_MAX_EPS = _F(1e-15)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    return np.rint(v).astype(np.int32)  # C: (v + 12582912.f) bit trick = round half to even


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) over rows of x [N, n]: (scale [N], L [N, n])."""
    n = x.shape[1]
    ax = np.abs(x)
    idx = np.argmax(ax, axis=1)  # C keeps the first of equal maxima, as argmax does
    mx = x[np.arange(len(x)), idx]
    amax = ax[np.arange(len(x)), idx]
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx).astype(_F)
    w = x * x

    def sums(iscale):
        lsc = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lsc.astype(_F)
        sumlx = np.zeros(len(x), _F)
        suml2 = np.zeros(len(x), _F)
        for i in range(n):
            sumlx = sumlx + w[:, i] * x[:, i] * lf[:, i]
            suml2 = suml2 + w[:, i] * lf[:, i] * lf[:, i]
        return lsc, sumlx, suml2

    iscale = (_F(-nmax) / mx).astype(_F)
    L, sumlx, suml2 = sums(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(_F)
    best = (scale * sumlx).astype(_F)
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = (-(_F(nmax) + _F(0.1) * _F(step)) / mx).astype(_F)
        l2, slx, sl2 = sums(isc)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            L = np.where(better[:, None], l2, L)
            with np.errstate(divide="ignore", invalid="ignore"):
                s2 = (slx / sl2).astype(_F)
            scale = np.where(better, s2, scale)
            best = np.where(better, (s2 * slx).astype(_F), best)
    scale = np.where(zero, _F(0), scale)
    L = np.where(zero[:, None], 0, L + nmax)
    return scale.astype(_F), L


def _q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref over rows [R, K] -> uint8 [R, K / 256 * 210]."""
    x = np.ascontiguousarray(x, dtype=_F).reshape(-1, 256)
    nb = len(x)
    sub = x.reshape(-1, 16)
    scales, _ = _make_qx_quants(sub, 32)
    scales = scales.reshape(nb, 16)
    aidx = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(nb), aidx]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (_F(-128) / np.where(empty, _F(1), max_scale)).astype(_F)
        d16 = (_F(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = (d16.astype(_F)[:, None] * sc.astype(_F)).astype(_F)  # [nb, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int(x.reshape(nb, 16, 16) / d[..., None])
    L = (np.clip(q, -32, 31) + 32)
    # a sub-block whose d is 0 keeps make_qx_quants' levels
    _, L0 = _make_qx_quants(sub, 32)
    L = np.where((d == 0)[..., None], L0.reshape(nb, 16, 16), L).reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = (L[:, :, [0, 1]] & 0xF) | ((L[:, :, [2, 3]] & 0xF) << 4)  # [nb, 2, 2, 32]
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    d16 = np.where(empty, np.float16(0), d16)
    ql = np.where(empty[:, None, None, None], 0, ql).astype(np.uint8).reshape(nb, 128)
    qh = np.where(empty[:, None, None], 0, qh).astype(np.uint8).reshape(nb, 64)
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.reshape(nb, 1).view(np.uint8)], axis=1)
    return out.reshape(-1)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, false) over
    rows of x [N, n]: (scale [N], the_min [N], L [N, n])."""
    N, n = x.shape
    mn = x[:, 0].copy()
    mxv = x[:, 0].copy()
    sum_w = weights[:, 0].copy()
    sum_x = (sum_w * x[:, 0]).astype(_F)
    for i in range(1, n):
        mn = np.minimum(mn, x[:, i])  # C: if (x[i] < min) min = x[i]
        mxv = np.maximum(mxv, x[:, i])
        sum_w = (sum_w + weights[:, i]).astype(_F)
        sum_x = (sum_x + weights[:, i] * x[:, i]).astype(_F)
    mn = np.minimum(mn, _F(0))
    flat = mxv == mn
    mn0 = mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (_F(nmax) / (mxv - mn)).astype(_F)
        scale = (_F(1) / iscale).astype(_F)
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best_mad = np.zeros(N, _F)
    for i in range(n):
        diff = (scale * L[:, i].astype(_F) + mn - x[:, i]).astype(_F)
        best_mad = (best_mad + weights[:, i] * (diff * diff)).astype(_F)
    for step in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            isc = ((_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / (mxv - mn)).astype(_F)
        Laux = np.clip(_nearest_int(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = Laux.astype(_F)
        sum_l = np.zeros(N, _F)
        sum_l2 = np.zeros(N, _F)
        sum_xl = np.zeros(N, _F)
        for i in range(n):
            wl = (weights[:, i] * lf[:, i]).astype(_F)
            sum_l = (sum_l + wl).astype(_F)
            sum_l2 = (sum_l2 + lf[:, i] * wl).astype(_F)
            sum_xl = (sum_xl + lf[:, i] * weights[:, i] * x[:, i]).astype(_F)
        D = (sum_w * sum_l2 - sum_l * sum_l).astype(_F)
        ok = D > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            this_scale = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(_F)
            this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(_F)
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            this_scale = np.where(pos, (sum_xl / sum_l2).astype(_F), this_scale)
        this_min = np.where(pos, _F(0), this_min)
        mad = np.zeros(N, _F)
        for i in range(n):
            diff = (this_scale * lf[:, i] + this_min - x[:, i]).astype(_F)
            mad = (mad + weights[:, i] * (diff * diff)).astype(_F)
        better = ok & (mad < best_mad)
        L = np.where(better[:, None], Laux, L)
        best_mad = np.where(better, mad, best_mad)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    # all-equal rows: C returns early with L = 0, scale = 0 and the_min = -min
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, _F(0), scale)
    mn = np.where(flat, mn0, mn)
    return scale.astype(_F), (-mn).astype(_F), L


def _q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref over rows [R, K] -> uint8 [R, K / 256 * 144]."""
    x = np.ascontiguousarray(x, dtype=_F).reshape(-1, 256)
    nb = len(x)
    sub = x.reshape(-1, 32)
    # weights[l] = av_x + fabsf(x[l]), av_x = sqrtf(sum_x2 / 32) over the sub-block, summed in order
    sum_x2 = np.zeros(len(sub), _F)
    for l in range(32):
        sum_x2 = (sum_x2 + sub[:, l] * sub[:, l]).astype(_F)
    av_x = np.sqrt((sum_x2 / _F(32)).astype(_F)).astype(_F)
    weights = (av_x[:, None] + np.abs(sub)).astype(_F)
    scales, mins, L = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = scales.max(axis=1)
    max_min = mins.max(axis=1)
    max_scale = np.maximum(max_scale, _F(0))
    max_min = np.maximum(max_min, _F(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, (_F(63) / max_scale).astype(_F), _F(0))
        inv_min = np.where(max_min > 0, (_F(63) / max_min).astype(_F), _F(0))
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins)).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    for j in range(8):
        if j < 4:
            packed[:, j] = ls[:, j]
            packed[:, j + 4] = lm[:, j]
        else:
            packed[:, j + 4] = (ls[:, j] & 0xF) | ((lm[:, j] & 0xF) << 4)
            packed[:, j - 4] |= (ls[:, j] >> 4) << 6
            packed[:, j] |= (lm[:, j] >> 4) << 6
    with np.errstate(divide="ignore", invalid="ignore"):
        d16 = (max_scale / _F(63)).astype(np.float16)
        dmin16 = (max_min / _F(63)).astype(np.float16)
    # get_scale_min_k4 read back: the 6-bit values just packed
    d = (d16.astype(_F)[:, None] * ls.astype(_F)).astype(_F)
    dm = (dmin16.astype(_F)[:, None] * lm.astype(_F)).astype(_F)
    xs = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int(((xs + dm[..., None]).astype(_F) / d[..., None]).astype(_F))
    q = np.clip(q, 0, 15)
    # C: `if (!d) continue;` keeps make_qkx2_quants' levels
    q = np.where((d == 0)[..., None], L.reshape(nb, 8, 32), q).astype(np.uint8)
    q = q.reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    out = np.concatenate([d16.reshape(nb, 1).view(np.uint8), dmin16.reshape(nb, 1).view(np.uint8),
                          packed, qs], axis=1)
    return out.reshape(-1)


# ----------------------------------------------------------------------------- model tensors
def _float_model(model: Qwen2) -> Qwen2:
    """The model with every QuantLinear (GPTQ, AWQ, `qwen2 quantize`) replaced by a float32 Linear
    holding its exact dequantization."""
    from torch import nn

    from qwen2.quant.linear import QuantLinear, dequantize
    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                q, s, z = child.quantized()
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                lin.weight = nn.Parameter(dequantize(q, s, child.bits, z))
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.detach().float())
                setattr(mod, attr, lin)
    return model


def gguf_tensors(model: Qwen2) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor [out, in]) in llama.cpp's order; MoE experts stacked [n_expert, out, in]."""
    experts: dict[str, list[torch.Tensor]] = {}
    n_exp = model.config.num_experts
    for name, t in checkpoint_tensors(model, names=GGUF_NAMES):
        if "_exps." in name:
            experts.setdefault(name, []).append(t)
            if len(experts[name]) == n_exp:
                yield name, torch.stack(experts.pop(name))
            continue
        if name.endswith("ffn_gate_inp_shexp.weight"):
            t = t.reshape(-1)  # llama.cpp stores the [1, hidden] shared-expert gate as a vector
        yield name, t


# ----------------------------------------------------------------------------- metadata
@dataclass
class Field:
    value: object
    type: object            # gguf.GGUFValueType
    sub_type: object = None


def model_fields(config, arch: str) -> dict[str, Field]:
    """The architecture keys convert_hf_to_gguf.py writes (TextModel.set_gguf_parameters)."""
    V = _gguf().GGUFValueType
    u32 = lambda v: Field(int(v), V.UINT32)
    f32 = lambda v: Field(float(v), V.FLOAT32)
    f = {
        f"{arch}.block_count": u32(config.num_hidden_layers),
        f"{arch}.context_length": u32(config.max_position_embeddings),
        f"{arch}.embedding_length": u32(config.hidden_size),
        f"{arch}.feed_forward_length": u32(config.intermediate_size),
        f"{arch}.attention.head_count": u32(config.num_attention_heads),
        f"{arch}.attention.head_count_kv": u32(config.num_key_value_heads),
    }
    rs = config.rope_scaling or {}
    rtype = config.rope_type
    if rtype == "linear" and rs.get("factor") is not None:
        f[f"{arch}.rope.scaling.type"] = Field("linear", V.STRING)
        f[f"{arch}.rope.scaling.factor"] = f32(rs["factor"])
    elif rtype == "yarn" and rs.get("factor") is not None:
        f[f"{arch}.rope.scaling.type"] = Field("yarn", V.STRING)
        f[f"{arch}.rope.scaling.factor"] = f32(rs["factor"])
        f[f"{arch}.rope.scaling.original_context_length"] = u32(rs["original_max_position_embeddings"])
        for key, names in (("yarn_ext_factor", ("extrapolation_factor",)),
                           ("yarn_attn_factor", ("attention_factor", "attn_factor")),
                           ("yarn_beta_fast", ("beta_fast",)), ("yarn_beta_slow", ("beta_slow",))):
            v = next((rs[n] for n in names if rs.get(n) is not None), None)
            if v is not None:
                f[f"{arch}.rope.scaling.{key}"] = f32(v)
    f[f"{arch}.rope.freq_base"] = f32(config.rope_theta)
    f[f"{arch}.attention.layer_norm_rms_epsilon"] = f32(config.rms_norm_eps)
    if config.is_moe:
        f[f"{arch}.expert_count"] = u32(config.num_experts)
        f[f"{arch}.expert_used_count"] = u32(config.num_experts_per_tok)
        f[f"{arch}.expert_feed_forward_length"] = u32(config.moe_intermediate_size)
        f[f"{arch}.expert_shared_feed_forward_length"] = u32(config.shared_expert_intermediate_size)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        f[f"{arch}.attention.key_length"] = u32(config.head_dim)
        f[f"{arch}.attention.value_length"] = u32(config.head_dim)
    return f


def check_exportable(config):
    """One clear line for what llama.cpp's qwen2 graphs cannot run."""
    if config.sliding_window is not None:
        raise Qwen2Error("GGUF export: llama.cpp's qwen2 architecture has no sliding-window attention "
                         "(use_sliding_window is on in this config)")
    if config.attention != "sdpa":
        raise Qwen2Error(f"GGUF export: llama.cpp cannot run this model's {config.attention} attention")
    if config.rope_type not in ("default", "linear", "yarn"):
        raise Qwen2Error(f"GGUF export: rope scaling {config.rope_type!r} has no GGUF equivalent "
                         "(linear and yarn do)")
    if config.is_moe and (config.mlp_only_layers or config.decoder_sparse_step != 1 or config.norm_topk_prob):
        raise Qwen2Error("GGUF export: llama.cpp's qwen2moe needs every layer sparse and no top-k renormalization")


_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4


def _looks_special(tok: str) -> bool:
    return tok.startswith("<|") and tok.endswith("|>")


def tokenizer_fields(src: Path, vocab_size: int) -> dict[str, Field]:
    """tokenizer.* keys: copied from a GGUF source; from an HF directory as convert_hf_to_gguf.py
    writes them (tokens and types as its get_vocab_base, merges / special ids / chat template via
    the gguf package's SpecialVocab); from first-generation Qwen's qwen.tiktoken."""
    g = _gguf()
    V = g.GGUFValueType
    if src.suffix == ".gguf" or (src.is_dir() and not (src / "config.json").exists()):
        from qwen2.io.gguf import open_gguf
        reader, _ = open_gguf(src)
        out = {}
        for key, fld in reader.fields.items():
            if key.startswith("tokenizer."):
                sub = fld.types[1] if fld.types[0] == V.ARRAY else None
                out[key] = Field(fld.contents(), fld.types[0], sub)
        return out
    from qwen2.io.load import load_tokenizer
    tok = load_tokenizer(src)
    if tok.vocab_size > vocab_size:
        raise Qwen2Error(f"{src}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                         f"{vocab_size} embedding rows; GGUF needs one row per token")
    tokens, types = [], []
    for i in range(vocab_size):
        b = tok.id_to_bytes(i) if i < tok.vocab_size else None
        if b is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        s = tok.id_to_token(i)
        if s in tok.added_tokens:
            types.append(_CONTROL if s in tok.special_tokens or _looks_special(s) else _USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(s)
    f = {
        "tokenizer.ggml.model": Field("gpt2", V.STRING),
        "tokenizer.ggml.pre": Field("qwen2", V.STRING),
        "tokenizer.ggml.tokens": Field(tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": Field(types, V.ARRAY, V.INT32),
    }
    if (src / "qwen.tiktoken").is_file() and not (src / "tokenizer.json").is_file():
        from qwen2.text.tokenizer import load_tiktoken_ranks, tiktoken_merges, token_str
        merges = [f"{token_str(a)} {token_str(b)}" for a, b in tiktoken_merges(load_tiktoken_ranks(src / "qwen.tiktoken"))]
        f["tokenizer.ggml.merges"] = Field(merges, V.ARRAY, V.STRING)
        eos = tok.eos_token_id
        for k in ("bos_token_id", "eos_token_id", "padding_token_id"):
            f[f"tokenizer.ggml.{k}"] = Field(eos, V.UINT32)
        f["tokenizer.chat_template"] = Field(tok.chat_template_or_default, V.STRING)
        return f
    sv = g.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    if sv.merges:
        f["tokenizer.ggml.merges"] = Field(list(sv.merges), V.ARRAY, V.STRING)
    key = {"pad": "padding"}
    for typ, tid in sv.special_token_ids.items():
        f[f"tokenizer.ggml.{key.get(typ, typ)}_token_id"] = Field(int(tid), V.UINT32)
    # Qwen2 adds no BOS / EOS when encoding; llama.cpp's newer SpecialVocab reads that from
    # tokenizer.json's post-processor, gguf 0.19's only from tokenizer_config.json
    adds = {"bos": False, "eos": False, **sv.add_special_token}
    for typ, value in adds.items():
        f[f"tokenizer.ggml.add_{typ}_token"] = Field(bool(value), V.BOOL)
    template = sv.chat_template or tok.chat_template
    if isinstance(template, list):  # named templates: llama.cpp keeps the default one under this key
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        f["tokenizer.chat_template"] = Field(template, V.STRING)
    return f


def _general(w, source: Path | None, name: str | None):
    """general.* as convert_hf_to_gguf.py writes them: the gguf package's Metadata heuristics over
    the model directory (its README's model card, the directory name), a size label from the
    parameter count."""
    g = _gguf()
    total, shared, expert, n_expert = w.get_total_parameter_count()
    model_dir = source if source is not None and source.is_dir() else None
    meta = g.Metadata.load(None, model_dir, name, total)
    if meta.name is None and source is not None and source.suffix == ".gguf":
        from .gguf import open_gguf
        field = open_gguf(source, arrays=False)[0].fields.get("general.name")
        meta.name = field.contents() if field is not None else None  # a re-export keeps its name
    if meta.name is None:
        meta.name = model_dir.name if model_dir else (source.stem if source else "model")
    if meta.size_label is None and total > 0:
        meta.size_label = g.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)


# ----------------------------------------------------------------------------- writing
def write_gguf(model: Qwen2, tok_fields: dict[str, Field], out, outtype: str = "f16", *, force: bool = False,
               source: Path | None = None, name: str | None = None, progress: bool | None = None) -> Path:
    """Write `model` as a GGUF file (see the module doc); general.* metadata from the `source`
    directory's model card, `name` overriding. Atomic: the file appears under `out` only once
    complete (a temporary file in the same directory, renamed)."""
    g = _gguf()
    if outtype not in OUTTYPES:
        raise Qwen2Error(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise Qwen2Error(f"{out} exists; pass --force (force=True) to overwrite it")
    if out.is_dir():
        raise Qwen2Error(f"{out} is a directory; give the .gguf file to write")
    if not out.parent.is_dir():
        raise Qwen2Error(f"{out.parent}: no such directory")
    config = model.config
    check_exportable(config)
    arch = "qwen2moe" if config.is_moe else "qwen2"
    model = _float_model(model)
    odd = next((n for n, _ in model.named_buffers() if n.endswith(("qweight", "qs"))), None)
    if odd is not None:
        raise Qwen2Error(f"GGUF export needs float (or QuantLinear) weights, not {odd!r}: load the model "
                         "with an explicit dtype (e.g. dtype='float32')")
    n_layers = config.num_hidden_layers
    tied = config.tie_word_embeddings
    plan = []  # (name, shape, qtype)
    for tname, t in gguf_tensors(model):
        plan.append((tname, tuple(t.shape), tensor_type(tname, tuple(t.shape), outtype, n_layers, tied)))

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = g.GGUFWriter(tmp, arch)
    try:
        w.add_type(g.GGUFType.MODEL)
        for key, fld in model_fields(config, arch).items():
            w.add_key_value(key, fld.value, fld.type, fld.sub_type)
        w.add_file_type(int(file_type(outtype)))
        for key, fld in tok_fields.items():
            w.add_key_value(key, fld.value, fld.type, fld.sub_type)
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        nbytes = 0
        for tname, shape, qt in plan:
            block, size = g.GGML_QUANT_SIZES[qt]
            n = int(np.prod(shape)) // block * size
            dt = {g.GGMLQuantizationType.F32: np.float32, g.GGMLQuantizationType.F16: np.float16}.get(qt, np.uint8)
            byte_shape = shape if dt is not np.uint8 else g.quant_shape_to_byte_shape(shape, qt)
            w.add_tensor_info(tname, byte_shape, np.dtype(dt), n, raw_dtype=qt)
            nbytes += n
        _general(w, source, name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from tqdm import tqdm
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=nbytes, desc=f"writing {out.name}", unit="B", unit_scale=True, disable=not show,
                  leave=False) as bar:
            for (tname, shape, qt), (_, t) in zip(plan, gguf_tensors(model)):
                data = quantize(t.detach().to(torch.float32).numpy(), qt)
                w.write_tensor_data(data)
                bar.update(data.nbytes)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export_gguf(src, out, outtype: str = "f16", *, force: bool = False, adapter=None,
                progress: bool | None = None) -> Path:
    """Load any checkpoint we read (HF dir, GGUF, first-generation Qwen, GPTQ, AWQ; a path or a
    hub id) and write it as a GGUF file of `outtype`. adapter: a LoRA adapter directory (PEFT's
    format, e.g. from `qwen2 finetune`), merged into the weights first (in float32)."""
    from qwen2.io.hub import resolve
    from qwen2.io.load import load_model
    if outtype not in OUTTYPES:
        raise Qwen2Error(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise Qwen2Error(f"{out} exists; pass --force to overwrite it")
    path = resolve(src)
    dtype = "float32" if adapter is not None else _load_dtype(path)
    if path.is_dir() and _model_type(path) == "qwen":
        # first-generation Qwen without its inference-time dynamic NTK / logn attention (llama.cpp
        # has neither): identical within seq_length, as `qwen2 convert` writes it
        from qwen2.io.qwen1 import load_qwen1
        model = load_qwen1(path, dtype=dtype, long_context=False)
    elif path.is_dir() and (path / "config.json").is_file() and _quantized(path):
        from qwen2.io.load import load_hf
        model = load_hf(path, dtype, float_head=True)  # the file's own head, not its run-time int8 copy
    else:
        model = load_model(path, dtype=dtype)
    if adapter is not None:
        from qwen2.io.adapter import load_adapter
        from qwen2.model.lora import merge_lora
        if model.quant:
            raise Qwen2Error("an adapter merges into whole float weights: not into a quantized checkpoint")
        merge_lora(load_adapter(model, adapter))
    return write_gguf(model, tokenizer_fields(path, model.config.vocab_size), out, outtype, force=force,
                      source=path, progress=progress)


def _config_json(path: Path) -> dict:
    try:
        d = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _model_type(path: Path):
    return _config_json(path).get("model_type")


def _quantized(path: Path) -> bool:
    return bool(_config_json(path).get("quantization_config"))


def _load_dtype(path: Path) -> str:
    """The checkpoint's own dtype, except float16 (which loads as bfloat16, losing bits):
    float32 then, as for GGUF sources (dequantized into float32 exactly)."""
    cfg = path / "config.json"
    if path.is_dir() and cfg.is_file():
        try:
            d = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "auto"
        if str(d.get("torch_dtype") or d.get("dtype")) in ("float16", "torch.float16"):
            return "float32"
        return "auto"
    return "float32"
