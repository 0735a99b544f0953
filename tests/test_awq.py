"""AWQ checkpoints in AutoAWQ's GEMM layout (the official Qwen2-*-Instruct-AWQ releases), written
here by AutoAWQ's own packing (WQLinear_GEMM.from_linear) at the real Qwen2-0.5B / 1.5B dims, read
back against AutoAWQ's reference unpacking (awq.utils.packing_utils.dequantize_gemm)."""
import json

import pytest
import torch
from safetensors.torch import save_file

import qwen2
from qwen2.errors import CheckpointError
from qwen2.quant.linear import QuantLinear

DIMS = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def config(dims: str, layers=2, vocab=1024, **kw) -> dict:
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab, num_hidden_layers=layers,
                max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                hidden_act="silu", torch_dtype="float16", **DIMS[dims], **kw)


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """[out, in] of each linear of a layer."""
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}


def float_tensors(cfg, g) -> dict[str, torch.Tensor]:
    h = cfg["hidden_size"]
    t = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=g) * 0.05,
         "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        for n in ("q_proj", "k_proj", "v_proj"):
            out = shapes(cfg)[f"self_attn.{n}"][0]
            t[p + f"self_attn.{n}.bias"] = 0.05 * torch.randn(out, generator=g)
    return {k: v.half() for k, v in t.items()}


# --------------------------------------------------- AutoAWQ's packing and reference unpacking
def awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """WQLinear_GEMM.from_linear's loop: int [rows, cols] -> int32 [rows, cols / 8]."""
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].to(torch.int32) << (i * 4)
    return qweight


def awq_dequantize_reference(qweight, qzeros, scales, group_size):
    """awq.utils.packing_utils: unpack_awq, reverse_awq_order, (iweight - izeros) * scales; float32
    scales (AutoAWQ multiplies in float16, which rounds the products) -> W^T [in, out]."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(iweights.shape[-1], dtype=torch.int32).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    iweights, izeros = iweights[:, order], izeros[:, order]
    iweights, izeros = torch.bitwise_and(iweights, 15), torch.bitwise_and(izeros, 15)
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = izeros.repeat_interleave(group_size, dim=0)
    return (iweights - z).float() * s


def write_awq(path, cfg, group_size=128, seed=0):
    """An AWQ checkpoint with random levels, zeros and scales; returns the reference W^T per linear."""
    g = torch.Generator().manual_seed(seed)
    tensors = float_tensors(cfg, g)
    ref = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, (out_f, in_f) in shapes(cfg).items():
            n_groups = in_f // group_size
            q = torch.randint(0, 16, (in_f, out_f), generator=g)
            z = torch.randint(0, 16, (n_groups, out_f), generator=g)
            s = (torch.rand(n_groups, out_f, generator=g) * 0.004 + 0.001).half()
            p = f"model.layers.{i}.{name}"
            tensors.update({f"{p}.qweight": awq_pack(q), f"{p}.qzeros": awq_pack(z), f"{p}.scales": s})
            ref[p] = awq_dequantize_reference(tensors[f"{p}.qweight"], tensors[f"{p}.qzeros"], s, group_size)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    (path / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc)))
    return tensors, ref


def reference_model(tmp_path, cfg, tensors, ref):
    """The float model with each linear holding the reference dequantization, the float head
    rounded to int8 as loading does (see qwen2.io.gptq.load_packed)."""
    floats = {k: v for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    floats.update({f"{p}.weight": w.T.contiguous() for p, w in ref.items()})
    d = tmp_path / "reference"
    d.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in floats.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="float32")))
    m = qwen2.load_model(d, dtype="float32")
    m.lm_head = QuantLinear.from_linear(m.lm_head, 8, -1, torch.float32)
    return m


@pytest.mark.parametrize("dims", ["0.5B", "1.5B"])
def test_awq_equals_reference_dequantization(tmp_path, dims):
    cfg = config(dims)
    tensors, ref = write_awq(tmp_path / "awq", cfg)
    model = qwen2.load_model(tmp_path / "awq", dtype="float32")
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and layer.self_attn.qkv_proj.zeros is not None
    assert model.quant["bits"] == 4 and model.quant["sym"] is False
    fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "self_attn.o_proj": ("self_attn.o_proj",),
             "mlp.down_proj": ("mlp.down_proj",)}
    for i in range(cfg["num_hidden_layers"]):
        for mod, parts in fused.items():
            want = torch.cat([ref[f"model.layers.{i}.{p}"].T for p in parts])
            got = model.get_submodule(f"model.layers.{i}.{mod}").dequantized()
            assert torch.equal(got, want), (i, mod)
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        want = reference_model(tmp_path, cfg, tensors, ref)(ids)
        step = model(ids[:1, :1])  # one row: the int4 kernel (int8 activations)
    assert (ours - want).abs().max().item() <= 1e-4 * want.std().item()
    # the decode kernel takes the same layout; it rounds activations to int8: close, not equal
    assert (step[0, -1] - want[0, 0]).abs().max().item() <= 0.1 * want.std().item()


def test_awq_runs_in_bfloat16(tmp_path):
    """dtype auto (a float16 release runs in bfloat16): no further from the reference than the
    reference model itself in bfloat16."""
    cfg = config("0.5B", layers=1)
    tensors, ref = write_awq(tmp_path / "awq", cfg)
    ids = torch.arange(16)[None]
    model = qwen2.load_model(tmp_path / "awq")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        ours = model(ids)
        want = reference_model(tmp_path, cfg, tensors, ref)(ids)
        bf16 = reference_model(tmp_path / "b", cfg, tensors, ref).to(torch.bfloat16)(ids)
    assert (ours - want).abs().max().item() <= 1.5 * (bf16 - want).abs().max().item()


def test_bad_awq_files_are_clear(tmp_path):
    cfg = config("0.5B", layers=1)
    write_awq(tmp_path / "awq", cfg)
    c = json.loads((tmp_path / "awq" / "config.json").read_text())
    c["quantization_config"]["version"] = "gemv"
    (tmp_path / "awq" / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="GEMM"):
        qwen2.load_model(tmp_path / "awq")
    c["quantization_config"].update(version="gemm", group_size=64)  # the tensors say 128
    (tmp_path / "awq" / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="group size 64"):
        qwen2.load_model(tmp_path / "awq")
    c["quantization_config"].update(quant_method="bitsandbytes")
    (tmp_path / "awq" / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="bitsandbytes"):
        qwen2.load_model(tmp_path / "awq")
