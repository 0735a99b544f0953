"""GGUF checkpoints (llama.cpp's format): config, tensors and tokenizer from one file.

Reading and dequantizing use the `gguf` package (llama.cpp's own reader and reference
dequantizers), so every type it knows (F32/F16/BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ*) loads here.
llama.cpp's converter keeps Qwen2's q/k rows in the HF order (it permutes q/k only for llama-style
architectures), and the reader already returns tensors in row-major [out, in] order, so each
llama.cpp tensor maps onto one model parameter (or one part of a fused projection) with the same
shape (GGUF_NAMES); only MoE experts, stored stacked [n_expert, out, in], are split per expert.

By default (dtype "auto" on the CPU, dense models, qwen2's kernels built) the quantized tensors
are not dequantized: each is repacked, without loss, into one of qwen2.quant.blocks' layouts
(`_block_linear`: Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K -> block4, Q8_0 -> block8, Q6_K -> block6, the file's
scales kept exactly) and run at the file's own precision with float32 activations; the logits are
the dequantized model's up to float32 summation order. Any other type, or an explicit dtype,
dequantizes as before.
"""
from __future__ import annotations

import functools
import os
import struct
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qwen2.errors import CheckpointError
from qwen2.io.build import build_model, parse_dtype
from qwen2.io.names import NameTable
from qwen2.model.config import ModelConfig

ARCHITECTURES = {"qwen2": "qwen2", "qwen2moe": "qwen2_moe"}

# llama.cpp module name -> model module (see qwen2.io.names)
GGUF_NAMES = NameTable({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": ("model.layers.{i}.self_attn.qkv_proj", 0),
    "blk.{i}.attn_k": ("model.layers.{i}.self_attn.qkv_proj", 1),
    "blk.{i}.attn_v": ("model.layers.{i}.self_attn.qkv_proj", 2),
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": ("model.layers.{i}.mlp.gate_up_proj", 0),
    "blk.{i}.ffn_up": ("model.layers.{i}.mlp.gate_up_proj", 1),
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
    # qwen2moe
    "blk.{i}.ffn_gate_inp": "model.layers.{i}.mlp.gate",
    "blk.{i}.ffn_gate_inp_shexp": "model.layers.{i}.mlp.shared_expert_gate",
    "blk.{i}.ffn_gate_shexp": ("model.layers.{i}.mlp.shared_expert.gate_up_proj", 0),
    "blk.{i}.ffn_up_shexp": ("model.layers.{i}.mlp.shared_expert.gate_up_proj", 1),
    "blk.{i}.ffn_down_shexp": "model.layers.{i}.mlp.shared_expert.down_proj",
    "blk.{i}.ffn_gate_exps": ("model.layers.{i}.mlp.experts.{e}.gate_up_proj", 0),  # [n_expert, out, in]
    "blk.{i}.ffn_up_exps": ("model.layers.{i}.mlp.experts.{e}.gate_up_proj", 1),
    "blk.{i}.ffn_down_exps": "model.layers.{i}.mlp.experts.{e}.down_proj",
})

# Rows dequantized at a time: bounds the float32 temporaries of the numpy dequantizers to a
# few tens of MB instead of several copies of the largest tensor (the 151936-row embedding).
_CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------- file access
def find_gguf(path: str | os.PathLike) -> Path:
    """A .gguf file, or the single .gguf file in a directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.glob("*.gguf") if f.is_file())
        if not files:
            raise CheckpointError(f"{p}: no .gguf file in this directory")
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            raise CheckpointError(f"{p}: several .gguf files ({names}); pass the one to load")
        return files[0]
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    return p


@functools.cache
def _reader_class(arrays: bool = True):
    import struct

    from gguf import GGUFReader, GGUFValueType

    class Reader(GGUFReader):
        """GGUFReader over a plain ndarray view of its memmap: np.memmap adds Python-level work
        (__array_finalize__) to every slice, which made reading the 300k tokenizer strings and
        the dequantizers' 16-row groups take seconds. arrays=False: array fields (the tokenizer's
        tokens, merges and types) are stepped over, not read (seconds less when only the model
        is wanted); they then hold no values."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        def _get_field_parts(self, orig_offs, raw_type):
            if arrays or raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            buf = self._plain
            if orig_offs + 12 > len(buf):
                raise ValueError("array field past the end of the file")
            itype, n = struct.unpack_from("<IQ", buf, orig_offs)
            offs = orig_offs + 12
            if itype == GGUFValueType.STRING:
                for _ in range(n):
                    if offs + 8 > len(buf):
                        raise ValueError("array field past the end of the file")
                    offs += 8 + struct.unpack_from("<Q", buf, offs)[0]
            elif itype in self.gguf_scalar_to_np:
                offs += np.dtype(self.gguf_scalar_to_np[itype]).itemsize * n
            else:  # nested arrays: the reader's own walk
                return super()._get_field_parts(orig_offs, raw_type)
            if offs > len(buf):
                raise ValueError("array field past the end of the file")
            parts = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
            return offs - orig_offs, parts, [], [GGUFValueType.ARRAY, GGUFValueType(itype)]

    return Reader


def open_gguf(path: str | os.PathLike, arrays: bool = True):
    """(GGUFReader, file path), with every way a file can be broken turned into one clear line.
    arrays=False: array metadata (the tokenizer) is skipped, not read."""
    f = find_gguf(path)
    try:
        with open(f, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e})") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{f}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = _reader_class(arrays)(f, "r")
    except ValueError as e:
        # The reader raises ValueError for unknown tensor/value types and for data past the
        # end of the file (its memmap views come out short).
        msg = str(e)
        if "is not a valid GGMLQuantizationType" in msg:
            raise CheckpointError(f"{f}: unknown tensor type ({msg}); this gguf package cannot read it, "
                                  "try upgrading it: pip install -U gguf") from None
        raise CheckpointError(f"{f}: corrupt or truncated GGUF file ({msg})") from None
    except (IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    _check_sizes(reader, f)
    return reader, f


def _check_sizes(reader, f: Path):
    """Every tensor's bytes must lie inside the file; a truncated download otherwise surfaces
    later as a confusing reshape error (or silently short data)."""
    from gguf import GGML_QUANT_SIZES
    end = os.path.getsize(f)
    for t in reader.tensors:
        block, type_size = GGML_QUANT_SIZES.get(t.tensor_type, (1, 0))
        need = int(t.n_elements) // block * type_size
        if t.data_offset + need > end or (type_size and t.n_bytes != need):
            raise CheckpointError(f"{f}: truncated GGUF file (tensor {t.name!r} needs bytes up to "
                                  f"{t.data_offset + need:,}, the file has {end:,})")


def _array(reader, key: str):
    """An array field's values as a list; with arrays=False readers (open_gguf) read straight from
    the file's bytes (300k strings in a fraction of a second instead of numpy views)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.data or reader.byte_order != "I" or len(field.parts) != 5:  # read by the reader itself
        return field.contents()
    buf = reader.data
    itype, n = int(field.parts[3][0]), int(field.parts[4][0])
    off = field.parts[4].__array_interface__["data"][0] - buf.__array_interface__["data"][0] + 8
    if itype == 8:  # strings
        out, mv = [], memoryview(buf)
        for _ in range(n):
            length = struct.unpack_from("<Q", buf, off)[0]
            out.append(str(mv[off + 8:off + 8 + length], "utf-8"))
            off += 8 + length
        return out
    return np.frombuffer(buf, dtype=reader.gguf_scalar_to_np[itype], count=n, offset=off).tolist()


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def architecture(reader, f: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f}: GGUF architecture {arch!r} is not supported "
                              f"(expected {' or '.join(ARCHITECTURES)})")
    return arch


# ----------------------------------------------------------------------------- config
def _config_dict(reader, f: Path) -> dict:
    """An HF-style config.json dict from the GGUF metadata."""
    arch = architecture(reader, f)

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{f}: metadata key {arch}.{key} is missing")
        return v

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{f}: missing tensor 'token_embd.weight'")
    vocab = int(_field(reader, f"{arch}.vocab_size", int(embd.shape[-1])))  # shape is [in, out]
    heads = int(need("attention.head_count"))
    d = {
        "model_type": ARCHITECTURES[arch],
        "architectures": ["Qwen2MoeForCausalLM" if arch == "qwen2moe" else "Qwen2ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 32768)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        # llama.cpp drops `output.weight` when the checkpoint ties it to the embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if (ff := _field(reader, f"{arch}.feed_forward_length")) is not None:
        d["intermediate_size"] = int(ff)
    if (kl := _field(reader, f"{arch}.attention.key_length")) is not None:
        d["head_dim"] = int(kl)
    if (sw := _field(reader, f"{arch}.attention.sliding_window")) is not None:
        d.update(use_sliding_window=True, sliding_window=int(sw), max_window_layers=0)
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear") or (scaling == "linear" and
                                                   _field(reader, f"{arch}.rope.scaling.factor", 1.0) != 1.0):
        d["rope_scaling"] = {"rope_type": scaling,
                             "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
        if (orig := _field(reader, f"{arch}.rope.scaling.original_context_length")) is not None:
            d["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    if arch == "qwen2moe":
        d.update(
            num_experts=int(need("expert_count")),
            num_experts_per_tok=int(need("expert_used_count")),
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")),
            # llama.cpp's qwen2moe graph does not renormalize the top-k weights
            norm_topk_prob=bool(_field(reader, f"{arch}.expert_weights_norm", False)),
        )
    return d


def read_gguf_config(path) -> ModelConfig:
    """The model configuration stored in a GGUF file's metadata."""
    reader, f = open_gguf(path, arrays=False)
    return ModelConfig.from_hf_dict(_config_dict(reader, f), source=str(f))


# ----------------------------------------------------------------------------- tensors
def _dequantize(t, dtype: torch.dtype, f: Path) -> torch.Tensor:
    """One GGUF tensor as a torch tensor [out, in] of `dtype`, dequantized in row chunks straight
    into the result (float32 temporaries stay small; no float32 copy of a bf16 tensor)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import dequantize
    data = t.data
    if data.ndim < 2 or data.shape[0] == 1:
        chunks = [data]
    else:
        per_row = max(1, int(t.n_elements) // data.shape[0])
        step = max(1, _CHUNK_ELEMENTS // per_row)
        chunks = [data[i:i + step] for i in range(0, data.shape[0], step)]
    out, row = None, 0
    for c in chunks:
        try:
            x = dequantize(c, t.tensor_type) if t.tensor_type not in (Q.F32, Q.F16) else c
        except NotImplementedError:
            raise CheckpointError(f"{f}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                                  "package cannot dequantize") from None
        with warnings.catch_warnings():  # F32/F16 data is a read-only view of the mmap
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(x))
        if out is None:
            if len(chunks) == 1:
                return x.to(dtype, copy=True)  # never keep a view of the file's read-only mmap
            out = torch.empty((data.shape[0],) + tuple(x.shape[1:]), dtype=dtype)
        out[row:row + x.shape[0]] = x
        row += x.shape[0]
    return out


def _tensors(reader, f: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor [out, in] in dtype) for every tensor of the file."""
    for t in reader.tensors:
        x = _dequantize(t, dtype, f).contiguous()
        if t.name.endswith("ffn_gate_inp_shexp.weight"):
            x = x.reshape(1, -1)  # llama.cpp stores the [1, hidden] gate as a vector
        yield t.name, x


def auto_dtype(config: ModelConfig, device) -> torch.dtype:
    """GGUF weights are quantized, so the compute dtype is ours to choose. On CPU float32: x86
    CPUs without AVX512-BF16 run bf16 matmuls several times slower than fp32, and fp32 holds the dequantized values exactly. bfloat16 on
    accelerators, and on CPU when the fp32 weights would take more than half the RAM."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    params = _param_count(config)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    if ram and params * 4 > ram / 2:
        return torch.bfloat16
    return torch.float32


def _param_count(c: ModelConfig) -> int:
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    if c.is_moe:
        mlp = 3 * c.hidden_size * (c.num_experts * c.moe_intermediate_size + c.shared_expert_intermediate_size)
    else:
        mlp = 3 * c.hidden_size * c.intermediate_size
    emb = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * (attn + mlp) + emb


def load_gguf_model(path, dtype="auto", device="cpu"):
    """A `qwen2.model.decoder.Qwen2` from a GGUF file (or a directory holding one). dtype "auto" on
    the CPU: the quantized tensors at the file's own precision (qwen2.quant.blocks, see the module
    doc) where the model and the types allow, else dequantized into `auto_dtype`'s dtype; an
    explicit dtype: dequantized tensor by tensor into it."""
    reader, f = open_gguf(path, arrays=False)  # the tokenizer's arrays are load_gguf_tokenizer's
    config = ModelConfig.from_hf_dict(_config_dict(reader, f), source=str(f))
    if dtype in (None, "auto") and _blocks_apply(reader, config, device):
        return _load_blocks(reader, f, config)
    dt = auto_dtype(config, device) if dtype in (None, "auto") else parse_dtype(dtype, config)
    config.torch_dtype = str(dt).removeprefix("torch.")
    return build_model(config, _tensors(reader, f, dt), dt, device, source=str(f), total=len(reader.tensors),
                       names=GGUF_NAMES)


# ----------------------------------------------------------------------------- block types
def _f16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16))


def _bytes(b: np.ndarray, dtype=np.uint8) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(dtype))


def _k_levels(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K 4-bit levels [blocks, 8, 32] from qs [blocks, 128]: each 32 bytes hold one
    32-value group in their low nibbles and the next in their high ones."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 15).reshape(-1, 8, 32)


def _halves(q: np.ndarray, n: int) -> torch.Tensor:
    """4-bit levels [..., 32] per group -> block4's bytes [n, K/2] (value i low, 16 + i high)."""
    return torch.from_numpy(np.ascontiguousarray(((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).astype(np.uint8)
                                                 .reshape(n, -1)))


def _block_linear(t):
    """A GGUF tensor of a block type as a qwen2.quant.blocks.BlockLinear holding exactly its
    values (scales and minimums as stored, or their exact float32 products for the K types);
    None for other types."""
    from gguf import GGMLQuantizationType as Q

    from qwen2.quant.blocks import BlockLinear
    typ = t.tensor_type
    if typ not in _block_types() or t.data.ndim != 2:
        return None
    n = t.data.shape[0]
    k = int(t.n_elements) // n
    b = t.data.reshape(-1, _block_types()[typ])  # one block a row
    if typ in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        has_min, has_qh = typ in (Q.Q4_1, Q.Q5_1), typ in (Q.Q5_0, Q.Q5_1)
        o = 4 if has_min else 2
        m = BlockLinear.raw("block4", n, k, qweight=_bytes(b[:, o + 4 * has_qh:]).view(n, k // 2),
                            qh=_bytes(b[:, o:o + 4], np.int32).view(n, k // 32) if has_qh else None,
                            scales=_bytes(b[:, :2], np.float16).view(n, k // 32),
                            offsets=_bytes(b[:, 2:4], np.float16).view(n, k // 32) if has_min else None,
                            zero=0 if has_min else (16 if has_qh else 8))
        return m
    if typ == Q.Q8_0:
        return BlockLinear.raw("block8", n, k, qweight=_bytes(b[:, 2:], np.int8).view(n, k),
                               scales=_bytes(b[:, :2], np.float16).view(n, k // 32))
    if typ in (Q.Q4_K, Q.Q5_K):
        from gguf.quants import Q4_K
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
        # kept as stored: 6-bit sc and m per group, d and -dmin per 256 in float16 (the kernels form
        # the reference's float32 products d * sc and -(dmin * m), exact, so w = s * q - dm as there)
        s8 = torch.from_numpy(np.ascontiguousarray(sc.astype(np.uint8))).view(n, k // 32)
        m8 = torch.from_numpy(np.ascontiguousarray(mn.astype(np.uint8))).view(n, k // 32)
        q = _k_levels(b[:, 16:144] if typ == Q.Q4_K else b[:, 48:176])
        qh = None
        if typ == Q.Q5_K:  # bit j of qh[l]: the fifth bit of value l of group j
            bits = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            qh = torch.from_numpy((bits.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
                                  .astype(np.uint32).view(np.int32).reshape(n, k // 32))
        return BlockLinear.raw("block4", n, k, qweight=_halves(q, n), qh=qh, scales=s8, offsets=m8, zero=0,
                               sscales=d.reshape(n, k // 256).contiguous(),
                               soffsets=(-dmin).reshape(n, k // 256).contiguous())
    if typ == Q.Q6_K:  # the values as stored (ql, qh: block6), int8 scales per 16, d per 256
        s8 = torch.from_numpy(np.ascontiguousarray(b[:, 192:208]).view(np.int8)).reshape(n, k // 16)
        return BlockLinear.raw("block6", n, k, qweight=_bytes(b[:, :192]).view(n, k // 4 * 3), scales=s8,
                               sscales=_f16(b[:, 208:210]).reshape(n, k // 256).contiguous())
    return None


@functools.cache
def _block_types() -> dict:
    """The block types run at their own precision -> bytes per block."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    return {q: GGML_QUANT_SIZES[q][1] for q in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)}


def _drop_pages(a: np.ndarray) -> None:
    """MADV_DONTNEED over the whole pages of a view of the file's mapping: they leave this
    process's resident memory and stay in the page cache (a later load reads them from there)."""
    from qwen2.io.safetensors import MADV_DONTNEED, madvise_pages
    if a.size:
        madvise_pages(a.__array_interface__["data"][0], a.nbytes, MADV_DONTNEED)


def _blocks_apply(reader, config: ModelConfig, device) -> bool:
    """Whether to run this file's quantized tensors at their own precision (see the module doc)."""
    from qwen2 import kernels
    if torch.device(device).type != "cpu" or config.is_moe or os.environ.get("QWEN2_GGUF_DEQUANTIZE"):
        return False
    if not any(t.tensor_type in _block_types() for t in reader.tensors):
        return False
    return kernels.available()


def _load_blocks(reader, f: Path, config: ModelConfig):
    """The model with every weight of a block type in a BlockLinear (fused projections as
    PartsLinear, the embedding a BlockEmbedding over the same blocks as a tied lm_head)."""
    from torch import nn

    from qwen2.kernels.memory import trim
    from qwen2.quant.blocks import BlockEmbedding, BlockLinear, PartsLinear
    config.torch_dtype = "float32"
    # The metadata (300k tokenizer strings as small numpy views) is read; freed now, before the
    # model's objects are made among it, its ~200 MB go back to the OS instead of staying behind.
    reader.fields.clear()
    trim()
    modules: dict[str, dict] = {}  # model module -> {part (None: whole): module}

    def tensors():
        for t in reader.tensors:
            m = _block_linear(t)
            _drop_pages(t.data)  # copied out: the file's pages need not stay resident
            if m is None:
                x = _dequantize(t, torch.float32, f).contiguous()
                if t.name.endswith("ffn_gate_inp_shexp.weight"):
                    x = x.reshape(1, -1)
                # float weights stay parameters, except parts of a projection whose other parts
                # are blocks: those become plain linears beside them
                if x.dim() != 2 or not t.name.endswith(".weight") or t.name.startswith("token_embd"):
                    yield t.name, x
                    continue
                m = nn.Linear(x.shape[1], x.shape[0], bias=False, device="meta")
                m.weight = nn.Parameter(x, requires_grad=False)
            for pname, part, _ in GGUF_NAMES.to_model(t.name, m.qweight if isinstance(m, BlockLinear) else m.weight) or ():
                modules.setdefault(pname.rpartition(".")[0], {})[part] = m
            yield t.name, torch.empty(m.out_features, m.in_features, device="meta")

    model = build_model(config, tensors(), torch.float32, "cpu", source=str(f), total=len(reader.tensors),
                        names=GGUF_NAMES)
    for path, parts in modules.items():
        parent, _, attr = path.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, attr)
        if path == "model.embed_tokens":
            table = parts[None]
            setattr(owner, attr, BlockEmbedding(table))
            if config.tie_word_embeddings:
                model.lm_head = table  # the same blocks
            continue
        bias = getattr(old, "bias", None)
        if None in parts:
            new = parts[None]
            if bias is not None:
                new.bias = bias.detach().float().contiguous() if isinstance(new, BlockLinear) else nn.Parameter(bias.detach())
        else:
            ps = [parts[i] for i in sorted(parts)]
            new = BlockLinear.cat(ps) if all(isinstance(p, BlockLinear) for p in ps) else None
            if new is None:
                new = PartsLinear(ps, bias)
            elif bias is not None:
                new.bias = bias.detach().float().contiguous()
        setattr(owner, attr, new)
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise CheckpointError(f"{f}: no block weights for {', '.join(meta[:5])}")
    # the conversion's temporaries (numpy unpacking, the parts merged by cat) back to the OS now:
    # left in the heap, later allocations pin their pages (+900 MB resident on the 1.5B file)
    modules.clear()
    old = new = parts = ps = None
    trim()
    return model


# ----------------------------------------------------------------------------- tokenizer
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def _tokenizer_parts(path) -> dict:
    """vocab {token: id}, merges, added tokens, chat template and bos/eos/pad token strings from
    the `tokenizer.ggml.*` metadata (see load_gguf_tokenizer)."""
    reader, f = open_gguf(path, arrays=False)
    architecture(reader, f)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{f}: tokenizer.ggml.model is {model!r}; Qwen2 uses byte-level BPE ('gpt2')")
    try:
        tokens = _array(reader, "tokenizer.ggml.tokens")
        merges = _array(reader, "tokenizer.ggml.merges")
        types = _array(reader, "tokenizer.ggml.token_type")
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: corrupt tokenizer metadata ({e})") from None
    if not tokens or not merges:
        raise CheckpointError(f"{f}: no tokenizer in the metadata (tokenizer.ggml.tokens/merges missing)")
    types = types or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{f}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab, added = {}, []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == _CONTROL or ty == _USER_DEFINED:
            added.append({"id": i, "content": tok, "special": ty == _CONTROL})
        else:
            vocab[tok] = i

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return {"vocab": vocab, "merges": merges, "added": added,
            "chat_template": _field(reader, "tokenizer.chat_template"), "bos_token": name("bos_token_id"),
            "eos_token": name("eos_token_id"), "pad_token": name("padding_token_id"),
            "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id")}


def load_gguf_tokenizer(path):
    """The byte-level BPE tokenizer described by `tokenizer.ggml.*` and `tokenizer.chat_template`.

    Control tokens (`<|im_end|>`, ...) become special added tokens, user-defined ones (Qwen2.5's
    `<tool_call>`) plain added tokens, as in transformers; the unused `[PAD...]` rows stay in the
    vocabulary (no merge reaches them) so that every id the model can emit decodes.
    The split regex is Qwen2's whatever `tokenizer.ggml.pre` says (qwen2, deepseek-r1-qwen, ...:
    the same regex), and text is NFC-normalized like Qwen2's own tokenizer.json (the GGUF file
    does not record the normalizer; transformers' and llama.cpp's GGUF paths skip it).
    """
    from qwen2.text.tokenizer import Tokenizer
    p = _tokenizer_parts(path)
    return Tokenizer.from_vocab_merges(
        p["vocab"], p["merges"], p["added"], chat_template=p["chat_template"], bos_token=p["bos_token"],
        eos_token=p["eos_token"], pad_token=p["pad_token"], normalize_nfc=True)


def save_gguf_tokenizer(path, out_dir) -> list[Path]:
    """Write the GGUF file's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json
    with the chat template, vocab.json, merges.txt; generation_config.json with its eos), so that a
    checkpoint made from the file (`qwen2 quantize`) loads with its tokenizer like any other."""
    import json

    from qwen2.text.tokenizer import write_hf_tokenizer
    p = _tokenizer_parts(path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in p["merges"]]
    # As in Qwen's own files: the vocabulary stops where the added tokens begin (the GGUF file's
    # [PAD...] rows past them are embedding padding, which transformers would renumber otherwise)
    first_added = min((t["id"] for t in p["added"]), default=None)
    if first_added is not None:
        p["vocab"] = {t: i for t, i in p["vocab"].items() if i < first_added}
    added = [{"id": t["id"], "content": t["content"], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": not t["special"], "special": t["special"]} for t in p["added"]]
    config = {"bos_token": p["bos_token"], "chat_template": p["chat_template"], "eos_token": p["eos_token"],
              "pad_token": p["pad_token"]}
    extra = {}
    if p["eos_token_id"] is not None:
        extra["generation_config.json"] = json.dumps({"eos_token_id": int(p["eos_token_id"])}, indent=2)
    return write_hf_tokenizer(out_dir, p["vocab"], merges, added,
                              {k: v for k, v in config.items() if v is not None}, extra)
