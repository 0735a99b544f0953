"""Checkpoint I/O: config forms, sharding, hub ids, memory, and clear errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from util import TINY, TINY_MOE, make_hf_checkpoint, read_config

import qwen2
from qwen2.errors import CheckpointError, Qwen2Error
from qwen2.model.config import ModelConfig


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def ids(n=8):
    return torch.arange(n)[None] % TINY["vocab_size"]


# ------------------------------------------------------------------------------------ configs
def to_2024_form(d: dict) -> dict:
    """The released-2024 config.json form: top-level rope_theta/rope_scaling/torch_dtype."""
    d = dict(d)
    rp = d.pop("rope_parameters", {}) or {}
    d["rope_theta"] = rp.get("rope_theta", 1e6)
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    d["torch_dtype"] = d.pop("dtype", "bfloat16")
    d.pop("layer_types", None)
    return d


def test_both_config_forms_give_the_same_model(tiny_ckpt, tmp_path):
    ref, path = tiny_ckpt
    v5 = read_config(path)
    assert "rope_parameters" in v5 and "layer_types" in v5  # what transformers 5 writes
    old = copy_ckpt(path, tmp_path / "old")
    (old / "config.json").write_text(json.dumps(to_2024_form(v5)))
    a, b = ModelConfig.from_file(path / "config.json"), ModelConfig.from_file(old / "config.json")
    assert a == b
    assert a.rope_theta == TINY["rope_theta"] and a.torch_dtype == "float32"
    with torch.no_grad():
        torch.testing.assert_close(qwen2.load_model(old, dtype="float32")(ids()), ref(ids()).logits,
                                   atol=1e-5, rtol=1e-5)


def test_released_qwen2_config_is_read():
    """The config.json of Qwen2-7B-Instruct as released, with the YaRN addition of its card."""
    d = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
         "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
         "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
         "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
         "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
         "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
         "vocab_size": 152064,
         "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}
    c = ModelConfig.from_hf_dict(d)
    assert (c.head_dim, c.num_key_value_heads, c.vocab_size) == (128, 4, 152064)
    assert c.sliding_window is None and set(c.layer_types) == {"full_attention"}
    assert c.rope_type == "yarn" and c.rope_scaling["factor"] == 4.0
    assert c.eos_token_id == 151645 and c.torch_dtype == "bfloat16"
    # transformers reads the same fields the same way
    from transformers import Qwen2Config
    hf = Qwen2Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert hf.layer_types == c.layer_types


def test_moe_config_fields(tmp_path):
    _, path = make_hf_checkpoint(tmp_path / "moe", dict(TINY_MOE, mlp_only_layers=[0], decoder_sparse_step=1))
    c = ModelConfig.from_file(path / "config.json")
    assert c.is_moe and c.num_experts == 8 and c.num_experts_per_tok == 2 and c.mlp_only_layers == [0]
    assert [c.is_moe_layer(i) for i in range(2)] == [False, True]
    model = qwen2.load_model(path, dtype="float32")
    assert type(model.model.layers[0].mlp).__name__ == "MLP"
    assert type(model.model.layers[1].mlp).__name__ == "SparseMoE"


def test_sliding_window_fields_are_honoured():
    base = dict(TINY, model_type="qwen2", num_hidden_layers=4)
    on = ModelConfig.from_hf_dict(dict(base, use_sliding_window=True, sliding_window=16, max_window_layers=2))
    assert on.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2 and on.sliding_window == 16
    off = ModelConfig.from_hf_dict(dict(base, use_sliding_window=False, sliding_window=16, max_window_layers=2))
    assert off.sliding_window is None and set(off.layer_types) == {"full_attention"}


def test_presets_match_the_released_sizes():
    expect = {"Qwen2-0.5B": 494_032_768, "Qwen2-1.5B": 1_543_714_304, "Qwen2-7B": 7_615_616_512,
              "Qwen2-72B": 72_706_203_648}
    for name, n in expect.items():
        with torch.device("meta"):
            m = qwen2.Qwen2(qwen2.preset(name))
        assert m.num_parameters() == n, name
    moe = qwen2.preset("Qwen2-57B-A14B")
    assert moe.is_moe and moe.num_experts == 64 and moe.num_experts_per_tok == 8
    with pytest.raises(CheckpointError, match="unknown preset"):
        qwen2.preset("Qwen2-3B")


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"hidden_size": None}, "missing required field.*hidden_size"),
    ({"num_attention_heads": 5}, "multiple of num_key_value_heads"),
])
def test_bad_configs_give_clear_errors(tiny_ckpt, tmp_path, change, match):
    d = read_config(tiny_ckpt[1])
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    bad = copy_ckpt(tiny_ckpt[1], tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=match):
        qwen2.load_model(bad)


def test_config_not_json(tiny_ckpt, tmp_path):
    bad = copy_ckpt(tiny_ckpt[1], tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        qwen2.load_model(bad)


# ------------------------------------------------------------------------------------ tensors
def rewrite_weights(path: Path, edit):
    f = path / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"model.layers.9.mlp.extra": torch.zeros(2)}), "unexpected tensor 'model.layers.9.mlp.extra'"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(3)}), r"'model.norm.weight' has shape \[3\].*\[64\]"),
])
def test_tensor_mismatches_name_the_tensor(tiny_ckpt, tmp_path, edit, match):
    bad = copy_ckpt(tiny_ckpt[1], tmp_path / "bad")
    rewrite_weights(bad, edit)
    with pytest.raises(CheckpointError, match=match):
        qwen2.load_model(bad)


def test_truncated_and_corrupt_files(tiny_ckpt, tmp_path):
    bad = copy_ckpt(tiny_ckpt[1], tmp_path / "trunc")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        qwen2.load_model(bad)
    bad2 = copy_ckpt(tiny_ckpt[1], tmp_path / "garbage")
    f2 = bad2 / "model.safetensors"
    f2.write_bytes(b"\xff" * 64 + f2.read_bytes()[64:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        qwen2.load_model(bad2)


def test_sharded_checkpoint_and_bad_index(tmp_path):
    ref, path = make_hf_checkpoint(tmp_path / "sh", TINY, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1
    with torch.no_grad():
        torch.testing.assert_close(qwen2.load_model(path, dtype="float32")(ids()), ref(ids()).logits,
                                   atol=1e-5, rtol=1e-5)
    index = path / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text("[1, 2")
    with pytest.raises(CheckpointError, match="index.json: bad index"):
        qwen2.load_model(path)
    d = json.loads(good)
    d["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors.*missing"):
        qwen2.load_model(path)


def test_pickle_weights_are_never_loaded(tmp_path, tiny_ckpt):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_ckpt[1] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not even looked at")
    with pytest.raises(CheckpointError, match="never unpickled"):
        qwen2.load_model(d)


def test_missing_paths_and_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(Qwen2Error, match="no such file or directory"):
        qwen2.load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        qwen2.load_model(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(Qwen2Error, match="local directory, e.g. --model"):
        qwen2.load_model("Qwen/Qwen2-0.5B-Instruct")


def test_hub_id_resolves_from_local_cache(tiny_ckpt, tmp_path, monkeypatch):
    """A model in the Hugging Face cache loads by its hub id with no network."""
    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Qwen2-Tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    copy_ckpt(tiny_ckpt[1], snap)
    (cache / "models--Qwen--Qwen2-Tiny" / "refs").mkdir()
    (cache / "models--Qwen--Qwen2-Tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    model = qwen2.load_model("Qwen/Qwen2-Tiny", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), tiny_ckpt[0](ids()).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ dtypes
def test_dtype_conversion_at_load(tmp_path):
    _, path = make_hf_checkpoint(tmp_path / "bf", TINY, dtype=torch.bfloat16)
    assert qwen2.load_model(path).dtype == torch.bfloat16  # auto = checkpoint dtype
    assert qwen2.load_model(path, dtype="float32").dtype == torch.float32
    with pytest.raises(Qwen2Error, match="unknown dtype"):
        qwen2.load_model(path, dtype="int3")


def test_float16_overflow_is_refused_and_bf16_is_safe(tmp_path):
    """A checkpoint whose activations exceed the float16 range (as late layers of several Qwen2
    sizes do): transformers in float16 produces inf/NaN; we refuse float16 with a clear message,
    and an fp16-stored checkpoint loads as bfloat16 with finite logits."""
    from transformers import AutoModelForCausalLM
    ref, path = make_hf_checkpoint(tmp_path / "hot", TINY, std=0.05)
    st16 = copy_ckpt(path, tmp_path / "st16")  # before the weights are made hot
    rewrite_weights(path, lambda s: s["model.layers.0.mlp.down_proj.weight"].mul_(5e5))
    x = ids(16)
    with torch.no_grad():
        hot16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).eval()
        h = hot16(x, output_hidden_states=True).hidden_states
        assert not all(torch.isfinite(t).all() for t in h), "fixture must overflow float16"
        with pytest.raises(Qwen2Error, match="float16.*bfloat16.*float32"):
            qwen2.load_model(path, dtype="float16")
        bf = qwen2.load_model(path, dtype="bfloat16")(x)
        fp = qwen2.load_model(path, dtype="float32")(x)
    assert torch.isfinite(bf).all() and torch.isfinite(fp).all()
    assert (bf.argmax(-1) == fp.argmax(-1)).float().mean() > 0.5
    # a checkpoint stored in float16 loads as bfloat16 under "auto"
    rewrite_weights(st16, lambda s: s.update({k: v.half() for k, v in s.items()}))
    cfg = read_config(st16)
    cfg["dtype"] = "float16"
    (st16 / "config.json").write_text(json.dumps(cfg))
    m = qwen2.load_model(st16)
    assert m.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_loading_bf16_peaks_near_the_weights_size(tmp_path):
    """Peak RSS while loading (and touching every weight) stays near the weights' size: the
    bf16 tensors are used in place from the memory-mapped file, never copied through fp32."""
    cfg = qwen2.preset("Qwen2-0.5B", num_hidden_layers=4)
    with torch.device("meta"):
        m = qwen2.Qwen2(cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    qwen2.save_model(m, tmp_path / "bf")
    del m
    script = textwrap.dedent(f"""
        import json, torch, qwen2
        # VmHWM, not ru_maxrss: the latter survives execve and would count the parent (pytest).
        def kb(field): return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) * 1024
        base = kb('VmRSS')
        m = qwen2.load_model({str(tmp_path / 'bf')!r}, dtype='bfloat16')
        s = sum(float(p.sum()) for p in m.parameters())
        w = sum(p.numel() * p.element_size() for p in m.parameters())
        print(json.dumps({{"weights": w, "peak": kb('VmHWM') - base}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak"] <= 1.25 * r["weights"], r


def test_dual_chunk_attention_config_is_applied_at_load(tiny_ckpt, tmp_path):
    from qwen2.model.longctx import DualChunkAttention
    d = copy_ckpt(tiny_ckpt[1], tmp_path / "dca")
    cfg = read_config(d)
    cfg["dual_chunk_attention_config"] = {"chunk_size": 16, "local_size": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    model = qwen2.load_model(d, dtype="float32")
    assert all(isinstance(l.self_attn, DualChunkAttention) for l in model.model.layers)
    short, long = ids(8), torch.arange(40)[None] % TINY["vocab_size"]
    plain = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    with torch.no_grad():  # within one chunk DCA is plain attention; beyond it, it is not
        torch.testing.assert_close(model(short), plain(short), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(long), plain(long), atol=1e-3)


# ----------------------------------------------------------------------------- qwen2 info
def test_info_parameter_count_equals_the_model():
    """`qwen2 info` counts parameters from the config (no model built): equal to the model's own
    count for every released config, tied and untied, dense and MoE (shared expert, dense layers)."""
    from qwen2.cli.info import param_count
    from qwen2.model.config import PRESETS, preset
    from qwen2.model.decoder import Qwen2
    configs = [preset(n) for n in PRESETS] + [
        ModelConfig.from_hf_dict(dict(TINY_MOE, model_type="qwen2_moe", mlp_only_layers=[1])),
        ModelConfig.from_hf_dict(dict(TINY, model_type="qwen2", tie_word_embeddings=False, head_dim=32))]
    for c in configs:
        with torch.device("meta"):
            assert param_count(c) == Qwen2(c).num_parameters(), c


def test_gguf_header_reader_equals_gguf_package(tmp_path):
    """qwen2.io.gguf_header (what info reads) against gguf's GGUFReader on a file with the real
    tokenizer arrays: every scalar field, array lengths, tensor names, shapes and types."""
    import gguf
    from util import hf_model

    from qwen2.io.gguf_header import read_header
    w = gguf.GGUFWriter(tmp_path / "h.gguf", "qwen2")
    w.add_block_count(2)
    w.add_rope_freq_base(1e6)
    w.add_token_list([f"tok{i}" for i in range(1000)] + ["日本", ""])
    w.add_token_types([1] * 1002)
    w.add_bool("x.flag", True)
    w.add_array("x.floats", [0.5, 1.5])
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    for name, t in hf_model(TINY).state_dict().items():
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref, ours = gguf.GGUFReader(tmp_path / "h.gguf"), read_header(tmp_path / "h.gguf")
    for k, f in ref.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        long = isinstance(v, list) and (len(v) > 64 or (v and isinstance(v[0], str)))
        assert ours.fields[k].contents() == (len(v) if long else pytest.approx(v)), k
    assert [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in ref.tensors] == \
           [(t.name, t.shape, t.tensor_type) for t in ours.tensors]


def test_info_shows_the_format(tmp_path, tiny_ckpt, ckpt):
    from qwen2.cli.info import describe
    from qwen2.io.gguf_export import export_gguf
    from qwen2.io.gptq import save_quantized
    from qwen2.quant.linear import quantize_model
    _, path = tiny_ckpt
    assert describe(path)["format"] == "HF safetensors"
    q4 = save_quantized(quantize_model(qwen2.load_model(path, dtype="float32"), 4, 32), tmp_path / "q4")
    assert describe(q4)["format"] == "GPTQ int4, group 32"
    q8 = save_quantized(quantize_model(qwen2.load_model(path, dtype="float32"), 8, -1), tmp_path / "q8")
    assert describe(q8)["format"] == "GPTQ int8, per channel"
    cfg = json.loads((q4 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    (q4 / "config.json").write_text(json.dumps(cfg))
    assert describe(q4)["format"] == "AWQ int4, group 128"
    g = export_gguf(ckpt, tmp_path / "m.gguf", "q8_0")
    a, b = describe(g), describe(ckpt)
    assert a["format"] == "GGUF Q8_0" and a["checkpoint_dtype"] == "Q8_0"
    same = ("parameters", "layers", "hidden_size", "vocab_size", "tied_embeddings", "context_length", "rope_theta")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
