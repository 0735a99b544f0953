"""GGUF loading on small synthetic files: every dequantization type against independent references,
the llama.cpp -> HF name map (dense and MoE) against transformers' GGUF loader, dtypes, tying,
and clear errors for broken files."""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import qwen2
from qwen2.errors import CheckpointError
from qwen2.io.gguf import load_gguf_model, open_gguf, read_gguf_config
from qwen2.quant.blocks import set_exact
from util import TINY, TINY_MOE, hf_model

# ----------------------------------------------------------------------------- synthetic files
# Written the way llama.cpp's convert_hf_to_gguf.py does: gguf-py's own HF -> llama.cpp name map,
# stacked MoE experts, norms and biases in F32.
# Byte offsets of the fp16 super-block scales (d, dmin) inside each K-quant block (ggml-common.h).
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def random_kquant(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize K types) with small, finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        raw[:, :, off:off + 2] = np.full((rows, cols // block), 0.002, np.float16).view(np.uint8).reshape(
            rows, cols // block, 2)
    return raw.reshape(rows, -1)


def encode(x: np.ndarray, qtype: Q, seed: int = 0) -> np.ndarray:
    """(array to write, raw_dtype) for one tensor."""
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype in _K_SCALES:
        return random_kquant(x.shape[0], x.shape[1], qtype, seed)
    return gguf.quantize(x.astype(np.float32), qtype)


def write_gguf(path, model, qtypes: dict | None = None, default: Q = Q.F32, arch: str | None = None,
               drop: tuple = (), extra: dict | None = None, tie: bool | None = None,
               tokenizer_from: Path | None = None) -> Path:
    """Write a transformers Qwen2/Qwen2-MoE model as a GGUF file. `qtypes`: GGUF tensor name -> type
    for 2-D weights (others use `default`); `drop`: GGUF names to leave out; `extra`: more tensors
    (array, or (raw bytes, type)); `tokenizer_from`: a GGUF file whose tokenizer metadata to copy."""
    path = Path(path)
    cfg = model.config
    moe = getattr(cfg, "num_experts", 0) > 0
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE if moe else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch or gguf.MODEL_ARCH_NAMES[gguf_arch])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if tokenizer_from is not None:
        r = gguf.GGUFReader(tokenizer_from)

        def field(key):
            return r.fields[key].contents() if key in r.fields else None
        w.add_tokenizer_model(field("tokenizer.ggml.model"))
        w.add_token_list(field("tokenizer.ggml.tokens"))
        w.add_token_merges(field("tokenizer.ggml.merges"))
        w.add_token_types(field("tokenizer.ggml.token_type"))
        for key, add in (("eos", w.add_eos_token_id), ("bos", w.add_bos_token_id), ("padding", w.add_pad_token_id)):
            if field(f"tokenizer.ggml.{key}_token_id") is not None:
                add(field(f"tokenizer.ggml.{key}_token_id"))
        w.add_chat_template(field("tokenizer.chat_template"))
        del r
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    if tie or (tie is None and cfg.tie_word_embeddings):
        state.pop("lm_head.weight", None)
    if moe:  # llama.cpp stacks the experts of a layer: [n_expert, out, in]
        for i in range(cfg.num_hidden_layers):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys = [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(cfg.num_experts)]
                if keys[0] in state:
                    state[f"model.layers.{i}.mlp.experts.{proj}.weight"] = torch.stack([state.pop(k) for k in keys])
            key = f"model.layers.{i}.mlp.experts.gate_up_proj"
            if key in state:  # transformers 5 fuses experts: gate_up [E, 2*inter, hidden], down [E, hidden, inter]
                gu = state.pop(key)
                inter = gu.shape[1] // 2
                state[f"model.layers.{i}.mlp.experts.gate_proj.weight"] = gu[:, :inter]
                state[f"model.layers.{i}.mlp.experts.up_proj.weight"] = gu[:, inter:]
                state[f"model.layers.{i}.mlp.experts.down_proj.weight"] = state.pop(
                    f"model.layers.{i}.mlp.experts.down_proj")
    for hf_name, t in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if name in drop:
            continue
        x = t.numpy()
        if name.endswith("ffn_gate_inp_shexp.weight"):
            x = x.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
        qt = (qtypes or {}).get(name, default) if x.ndim >= 2 else Q.F32
        data = encode(x.reshape(-1, x.shape[-1]), qt, seed=len(name)).reshape(*x.shape[:-1], -1) \
            if qt not in (Q.F32, Q.F16) else encode(x, qt)
        w.add_tensor(name, data, raw_dtype=None if qt in (Q.F32, Q.F16) else qt)
    for name, data in (extra or {}).items():  # name -> array, or (raw bytes, type)
        data, qt = data if isinstance(data, tuple) else (data, None)
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_dequant(reader_tensor) -> torch.Tensor:
    """An independent reference: transformers' own torch dequantizer (ComfyUI-GGUF derived)."""
    from transformers.integrations.gguf.dequant import dequantize
    raw = torch.from_numpy(np.array(reader_tensor.data).reshape(-1).view(np.uint8).copy())
    shape = [int(s) for s in reversed(reader_tensor.shape)]
    return dequantize(raw, int(reader_tensor.tensor_type)).reshape(shape)


# hidden 256: K-quant rows hold whole 256-element super-blocks
CFG = dict(TINY, hidden_size=256, intermediate_size=512, vocab_size=320, tie_word_embeddings=False)

# One matrix per type (16 matrices in a 2-layer model, 13 types).
TYPES = {
    "token_embd.weight": Q.F16, "output.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q5_0,
    "blk.0.attn_output.weight": Q.Q5_1, "blk.0.ffn_gate.weight": Q.Q2_K, "blk.0.ffn_up.weight": Q.Q3_K,
    "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.attn_q.weight": Q.Q5_K, "blk.1.attn_k.weight": Q.Q6_K,
    "blk.1.attn_v.weight": Q.BF16, "blk.1.attn_output.weight": Q.F32, "blk.1.ffn_gate.weight": Q.Q8_0,
    "blk.1.ffn_up.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K,
}
# Relative Frobenius error of a quantized random-normal matrix, with margin (measured: about
# 0.0003 F16, 0.002 BF16, 0.004 Q8_0, 0.03 Q5_x, 0.07-0.09 Q4_x).
REL_ERR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1e-2, Q.Q5_0: 0.06, Q.Q5_1: 0.06,
           Q.Q4_0: 0.15, Q.Q4_1: 0.15}
IDS = torch.tensor([[5, 17, 200, 3, 99, 1, 250, 42, 7, 8, 300, 11]])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(source transformers model, GGUF path) with every matrix in a different type."""
    model = hf_model(CFG)
    path = write_gguf(tmp_path_factory.mktemp("mixed") / "tiny-mixed.gguf", model, TYPES)
    return model, path


def hf_from_gguf(path, dtype=torch.float32, config=None):
    from transformers import AutoModelForCausalLM
    kw = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kw).eval()


def test_every_type_dequantizes_like_independent_references(mixed):
    """Each tensor equals transformers' own torch dequantizer (a separate implementation) where it
    has the type, and is within quantization error of the original weights where gguf-py could
    quantize them (K-quants are random blocks, checked against the torch dequantizer only)."""
    src, path = mixed
    ours = load_gguf_model(path, dtype="float32")
    original = src.state_dict()
    reader, _ = open_gguf(path)
    by_gguf = {t.name: t for t in reader.tensors}
    checked = set()
    for gname, qt in TYPES.items():
        hname, got = _loaded(ours, gname)
        assert got.dtype == torch.float32 and got.shape == original[hname].shape, gname
        if qt not in (Q.F32, Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1):  # transformers' torch dequantizer lacks these
            ref = transformers_dequant(by_gguf[gname])
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=f"{gname} ({qt.name})")
            checked.add(qt)
        if qt in QUANTIZABLE:
            rel = ((got - original[hname]).norm() / original[hname].norm()).item()
            assert rel <= REL_ERR[qt], f"{gname} ({qt.name}): relative error {rel:.4f}"
            checked.add(qt)
    assert checked == set(TYPES.values())


def _loaded(model, gname: str) -> tuple[str, torch.Tensor]:
    """(transformers name, what the model holds) of a GGUF tensor, through the name tables: a
    parameter, or its rows of a fused projection."""
    from qwen2.io.gguf import GGUF_NAMES
    from qwen2.io.names import HF_NAMES
    from qwen2.model.decoder import fused_linears
    [(pname, part, _)] = GGUF_NAMES.to_model(gname, None)
    mod, _, leaf = pname.rpartition(".")
    p = dict(model.named_parameters())[pname].detach()
    if part is not None:
        sizes = fused_linears(model)[mod]
        lo = sum(sizes[:part])
        p = p[lo:lo + sizes[part]]
    return f"{HF_NAMES.to_checkpoint(mod, part)}.{leaf}", p


def test_logits_match_transformers_gguf_loader(mixed):
    _, path = mixed
    with torch.no_grad():
        ref = hf_from_gguf(path)(IDS).logits
        ours = set_exact(load_gguf_model(path))(IDS)  # float32 activations (the default's int8: test_gguf_kernels)
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.std().item()


def test_config_from_metadata_matches_source(mixed):
    src, path = mixed
    c = read_gguf_config(path)
    s = src.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.max_position_embeddings) == (
        "qwen2", s.vocab_size, s.hidden_size, s.intermediate_size, s.num_hidden_layers,
        s.num_attention_heads, s.num_key_value_heads, s.hidden_size // s.num_attention_heads,
        s.max_position_embeddings)
    assert c.rope_theta == s.rope_parameters["rope_theta"] and c.rms_norm_eps == pytest.approx(s.rms_norm_eps)
    assert c.tie_word_embeddings is False and c.rope_scaling is None


def test_dtypes(mixed):
    _, path = mixed
    fp32 = load_gguf_model(path, dtype="float32")  # dequantized (auto keeps the blocks: test_gguf_kernels.py)
    bf16 = load_gguf_model(path, dtype="bfloat16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    for (n, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), n  # straight dequant -> bf16, no detour
    with torch.no_grad():
        x, y = fp32(IDS), bf16(IDS)
    assert (x - y).abs().max().item() < 0.15 * x.std().item()  # bf16 compute
    with pytest.raises(qwen2.Qwen2Error, match="float16"):
        load_gguf_model(path, dtype="float16")


def test_parameters_do_not_alias_the_file(tmp_path):
    """F32 tensors come out of a read-only mmap; the model must own writable copies."""
    path = write_gguf(tmp_path / "f32.gguf", hf_model(CFG))
    m = load_gguf_model(path)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # would crash on a read-only mapping


def test_tied_when_output_absent(tmp_path):
    src = hf_model(dict(CFG, tie_word_embeddings=True))
    path = write_gguf(tmp_path / "tied.gguf", src, default=Q.Q8_0)
    m = set_exact(qwen2.load_model(path))  # the checkpoint.py dispatch; Q8_0 blocks shared by embedding and head
    assert m.config.tie_word_embeddings and m.lm_head is m.model.embed_tokens.table
    f32 = qwen2.load_model(path, dtype="float32")  # dequantized
    assert f32.lm_head.weight is f32.model.embed_tokens.weight
    with torch.no_grad():
        ref = hf_from_gguf(path)(IDS).logits
        assert (m(IDS) - ref).abs().max().item() <= 1e-4 * ref.std().item()
        assert (f32(IDS) - ref).abs().max().item() <= 1e-4 * ref.std().item()
    assert qwen2.load_model(tmp_path).config.tie_word_embeddings  # a directory holding one .gguf


def test_moe_matches_transformers(tmp_path):
    src = hf_model(dict(TINY_MOE, hidden_size=64))
    path = write_gguf(tmp_path / "moe.gguf", src, default=Q.Q8_0)
    c = read_gguf_config(path)
    assert (c.model_type, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.shared_expert_intermediate_size, c.norm_topk_prob) == ("qwen2_moe", 8, 2, 32, 96, False)
    ids = IDS % src.config.vocab_size
    with torch.no_grad():
        # transformers reads no expert sizes from qwen2moe metadata (it falls back to Qwen1.5-MoE's
        # defaults), so it gets the source config; the tensors still come from the file.
        ref = hf_from_gguf(path, config=src.config)(ids).logits
        ours = load_gguf_model(path)(ids)
        orig = src(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.std().item()
    assert (ours - orig).abs().max().item() < 0.05 * orig.std().item()  # Q8_0 vs the float model


# ----------------------------------------------------------------------------- broken files
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("small") / "small.gguf", hf_model(CFG), default=Q.Q8_0)


def test_wrong_magic(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match=r"fake\.gguf: not a GGUF file"):
        qwen2.load_model(p)


def test_truncated(small, tmp_path):
    data = small.read_bytes()
    for cut in (len(data) - 1000, len(data) // 2, 200):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.gguf: (corrupt or )?truncated"):
            load_gguf_model(p)


def test_unknown_architecture(tmp_path):
    p = write_gguf(tmp_path / "llama.gguf", hf_model(CFG), arch="llama")
    with pytest.raises(CheckpointError, match=r"llama\.gguf: GGUF architecture 'llama' is not supported"):
        load_gguf_model(p)


def test_unknown_quant_type(small, tmp_path):
    # Patch the type id of the first tensor's info record to a value ggml never assigned.
    reader, _ = open_gguf(small)
    t = reader.tensors[0]
    data = bytearray(small.read_bytes())
    name = t.name.encode()
    pos = data.index(name) + len(name) + 4 + 8 * len(t.shape)
    assert int.from_bytes(data[pos:pos + 4], "little") == int(t.tensor_type)
    data[pos:pos + 4] = (250).to_bytes(4, "little")
    p = tmp_path / "badtype.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"badtype\.gguf: unknown tensor type"):
        load_gguf_model(p)


def test_type_without_dequantizer(tmp_path):
    """Q8_1 is a valid ggml type (an activation format) that gguf-py cannot dequantize."""
    size = gguf.GGML_QUANT_SIZES[Q.Q8_1][1]
    raw = np.random.default_rng(0).integers(0, 256, (256, 256 // 32 * size), dtype=np.uint8)
    p = write_gguf(tmp_path / "q81.gguf", hf_model(CFG), drop=("blk.0.attn_q.weight",),
                   extra={"blk.0.attn_q.weight": (raw, Q.Q8_1)})
    with pytest.raises(CheckpointError, match=r"q81\.gguf: tensor 'blk\.0\.attn_q\.weight' has type Q8_1"):
        load_gguf_model(p)


def test_missing_and_unexpected_tensors(tmp_path):
    src = hf_model(CFG)
    p = write_gguf(tmp_path / "missing.gguf", src, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"missing\.gguf: missing tensor.*model\.layers\.1\.mlp\.down_proj"):
        load_gguf_model(p)
    p = write_gguf(tmp_path / "extra.gguf", src, extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"extra\.gguf: unexpected tensor 'blk\.0\.mystery\.weight'"):
        load_gguf_model(p)
    p = write_gguf(tmp_path / "noembd.gguf", src, drop=("token_embd.weight",))
    with pytest.raises(CheckpointError, match=r"noembd\.gguf: missing tensor 'token_embd\.weight'"):
        load_gguf_model(p)


def test_directories(small, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .gguf file"):
        load_gguf_model(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(small, two / "a.gguf")
    shutil.copy(small, two / "b.gguf")
    with pytest.raises(CheckpointError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        qwen2.load_model(two)


def test_garbage_after_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(CheckpointError, match=r"bad\.gguf: corrupt or truncated GGUF file"):
        read_gguf_config(p)
