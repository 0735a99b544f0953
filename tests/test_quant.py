"""int8/int4 weight-only quantization: math, GPTQ layout on disk, loading, fast-path parity."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import qwen2
from qwen2.cli import main as cli
from qwen2 import kernels
from qwen2.quant.linear import QuantLinear, dequantize, pack_linears, quantize_model, quantize_tensor, stored_scales
from qwen2.io.gptq import from_gptq, to_gptq


@pytest.mark.parametrize("bits,group,sym,full", [(8, -1, True, False), (4, 32, True, False), (4, 128, True, False),
                                                 (4, 32, True, True), (4, 128, True, True), (4, 32, False, False),
                                                 (4, 128, False, False)])
def test_round_to_nearest_error_bound(bits, group, sym, full):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    w[:3] += 2.0  # skewed rows, where asymmetric groups pay off
    q, s, z = quantize_tensor(w, bits, group, sym=sym, full_range=full)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2 ** bits - 1
    assert s.shape == z.shape == ((1 if group == -1 else 256 // group), 96)
    deq = dequantize(q, s, bits, z)
    err = (deq - w).abs()
    step = s.T.abs().repeat_interleave(256 // s.shape[0], dim=1)
    if full:
        # llama.cpp Q4_0's grid: s = -m / 8 with m the group's weight of largest magnitude, which
        # lands exactly on level -8, so all 16 levels are used (s < 0 where m > 0); a weight of the
        # other sign beyond 7.5 steps is clipped to +7 (error up to one step)
        g = w.view(96, -1, group)
        m = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        torch.testing.assert_close(s.T[..., None], m / -8)
        assert bool((s < 0).any()) and bool((s > 0).any())
        assert torch.equal(deq.view(96, -1, group).gather(-1, g.abs().argmax(-1, keepdim=True)), m)
        assert bool((q.view(96, -1, group).amin(-1) == 0).all())  # level -8 is used in every group
        clipped = (w / s.T.repeat_interleave(group, dim=1)) > 7.5
        assert bool((err[clipped] <= step[clipped] + 1e-6).all())
        err, step = err[~clipped], step[~clipped]
    else:
        assert bool((s > 0).all())
    assert bool((err <= step / 2 + 1e-6).all())
    if not sym:  # all 16 levels used: a finer step than symmetric on the skewed rows
        s_sym = quantize_tensor(w, bits, group, sym=True)[1]
        assert bool((s[:, :3] < 0.8 * s_sym[:, :3]).all())


def test_stored_scales_round_once():
    """A bf16 model's scales are rounded once, to bf16 (not to float16 and then bf16), and are then
    exactly what a file stores (float16) and loading gives back; float32 models keep float16."""
    s = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 0.1 + 1e-4
    b = stored_scales(s, torch.bfloat16)
    assert torch.equal(b, s.bfloat16().float()) and torch.equal(b, b.half().float())
    assert not torch.equal(b, s.half().bfloat16().float())  # double rounding differs somewhere
    f = stored_scales(s, torch.float32)
    assert torch.equal(f, s.half().float())


def test_gptq_packing_layout():
    """qweight packs 32/bits values along `in`, lowest bits first; qzeros holds zero - 1."""
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s = torch.rand(2, 16) + 0.1
    t = to_gptq(q, s, 4, 32)
    assert t["qweight"].shape == (8, 16) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, 2) and t["scales"].dtype == torch.float16
    assert t["g_idx"].tolist() == [i // 32 for i in range(64)]
    word = int(t["qweight"][1, 3]) & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 15 for k in range(8)] == q[3, 8:16].tolist()
    assert (int(t["qzeros"][0, 0]) & 0xFFFFFFFF) == 0x77777777  # zero 8 stored as 7
    q2, s2, z2 = from_gptq(t, 4, 32, "x")
    assert torch.equal(q2, q) and torch.equal(s2, s.half().float()) and bool((z2 == 8).all())
    z = torch.randint(1, 16, (2, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ta = to_gptq(q, s, 4, 32, z)  # asymmetric: stored as z - 1, eight zeros per int32 along `out`
    word = int(ta["qzeros"][1, 1]) & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 15 for k in range(8)] == (z[1, 8:16].int() - 1).tolist()
    assert torch.equal(from_gptq(ta, 4, 32, "x")[2], z)
    q8 = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
    t8 = to_gptq(q8, torch.rand(1, 8), 8, -1)
    assert t8["qweight"].shape == (4, 8) and (int(t8["qzeros"][0, 0]) & 0xFFFFFFFF) == 0x7F7F7F7F
    assert torch.equal(from_gptq(t8, 8, -1, "x")[0], q8)


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (4, 32, True), (4, 64, True), (4, 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode, small batch, prefill (int8 dequant path)
def test_quant_linear_matches_dequantized(bits, group, sym, dtype, rows):
    lin = torch.nn.Linear(128, 80, bias=True)
    ql = QuantLinear.from_linear(lin, bits, group, dtype, sym=sym)
    q, s, z = quantize_tensor(lin.weight.data, bits, group, sym=sym)
    s = stored_scales(s, dtype)  # from_linear keeps the scales a file holds (float16), rounded once
    x = torch.randn(rows, 128)
    ref = x.to(dtype).float() @ dequantize(q, s.to(dtype).float(), bits, z).T + lin.bias.to(dtype).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    xd = x.to(dtype)
    # the three ways to run it: the plain layout eagerly, the multiply-sum form that compiled decode
    # traces (evaluated eagerly here), and the eager kernels after pack()
    outs = {"plain": ql(xd).float(),
            "gemv": torch.stack([ql._gemv(r[None]) for r in xd]) + ql.bias.float()}
    if ql.pack():  # int4 only (int8's eager kernel reads the plain layout)
        outs["packed"] = ql(xd).float()
    if rows == 1 and kernels.available():
        # one row goes through qwen2.kernels, which quantizes x to int8 in blocks of 32: allow
        # its bound, sum over blocks of amax/254 * sum |w|, plus the output's dtype rounding
        w = dequantize(q, s.to(dtype).float(), bits, z)
        xb = xd.float().view(-1, 32)
        bound = (xb.abs().amax(-1, keepdim=True) / 254 * w.abs().view(80, -1, 32).sum(-1).T).sum(0)
        bound = bound + ref.abs()[0] * (2 ** -8 if dtype == torch.bfloat16 else 1e-5) + 1e-6
        plain = outs.pop("plain")[0]
        assert bool(((plain - ref[0]).abs() <= bound).all()), ((plain - ref[0]).abs() - bound).max()
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=name)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_negative_scales(group, asym, dtype):
    """Scales may be negative ((q - z) * s is the same weight as (z - q) * -s; a grid that puts a
    group's largest magnitude on -8, like llama.cpp's Q4_0, gives them): every int4 path agrees
    with the dequantized weight (plain, compiled multiply-sum, qwen2 kernel, aten tiles)."""
    g = torch.Generator().manual_seed(group)
    q = torch.randint(0, 16, (48, 256), dtype=torch.uint8, generator=g)
    s = (torch.rand(256 // group, 48, generator=g) + 0.5) * 0.01
    s = torch.where(torch.rand(s.shape, generator=g) < 0.5, -s, s)  # mixed signs, row by row
    z = torch.randint(1, 16, s.shape, dtype=torch.uint8, generator=g) if asym else None
    bias = torch.randn(48, generator=g)
    ql = QuantLinear(q, s, 4, group, bias, dtype, z)
    w = dequantize(q, s.to(dtype).float(), 4, z)
    assert bool((ql.dequantized().float() == w.to(dtype).float()).all())
    for rows in (1, 5, 40):
        x = torch.randn(rows, 256, generator=g).to(dtype)
        ref = x.float() @ w.T + bias.to(dtype).float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        outs = {"plain": ql(x).float(), "gemv": torch.stack([ql._gemv(r[None]) for r in x]) + ql.bias.float()}
        if rows == 1 and kernels.available():  # the kernel's int8 activations: its derived bound
            xb = x.float().view(-1, 32)
            bound = (xb.abs().amax(-1, keepdim=True) / 254 * w.abs().view(48, -1, 32).sum(-1).T).sum(0)
            bound = bound + ref.abs()[0] * (2 ** -8 if dtype == torch.bfloat16 else 1e-5) + 1e-6
            assert bool(((outs.pop("plain")[0] - ref[0]).abs() <= bound).all())
        packed = copy.deepcopy(ql)
        assert packed.pack()
        outs["packed"] = packed(x).float()
        for name, out in outs.items():
            torch.testing.assert_close(out, ref, atol=tol * ref.abs().max().item(), rtol=tol, msg=name)


@pytest.mark.parametrize("bits,sym", [(8, True), (4, True), (4, False)])
def test_prefill_dequantizes_in_row_blocks(bits, sym):
    """Many rows take dequantize + GEMM a block of output rows at a time (bounded scratch memory):
    the blocks (the last one short) must add up to the whole product."""
    lin = torch.nn.Linear(8192, 300, bias=True)  # 128 rows a block: 128 + 128 + 44
    ql = QuantLinear.from_linear(lin, bits, 32, torch.float32, sym=sym)
    x = torch.randn(40, 8192)
    ref = F.linear(x, ql.dequantized(), ql.bias)
    torch.testing.assert_close(ql(x), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ql.dequantized(slice(128, 256)), ql.dequantized()[128:256])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_close_to_float_and_decodes(tiny_ckpt, bits):
    ref_model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = ref_model(ids)
    qm = quantize_model(copy.deepcopy(ref_model), bits, 32)
    out = qm(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if bits == 8 else 0.3), rel  # random weights: the worst case for int4
    assert isinstance(qm.lm_head, QuantLinear) and type(qm.model.embed_tokens) is torch.nn.Embedding
    assert qm.lm_head.bits == 8 and qm.model.layers[0].mlp.down_proj.bits == bits
    # the fused projections are quantized whole, which is quantizing each part (rows are independent)
    qkv = qm.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and isinstance(qm.model.layers[0].mlp.gate_up_proj, QuantLinear)
    w = ref_model.model.layers[0].self_attn.qkv_proj.weight.detach()
    got = qkv.quantized()
    lo = 0
    for n in ref_model.model.layers[0].self_attn.splits["qkv_proj"]:
        q, sc, z = quantize_tensor(w[lo:lo + n], bits, -1 if bits == 8 else 32)
        assert torch.equal(got[0][lo:lo + n], q) and torch.equal(got[2][:, lo:lo + n], z)
        torch.testing.assert_close(got[1][:, lo:lo + n], stored_scales(sc, torch.float32), atol=0, rtol=0)
        lo += n
    # Static-cache decode in the quantized model = its own full forward, on the plain
    # layout and after repacking for the eager int4 kernel (a different kernel: looser bound).
    packed = pack_linears(copy.deepcopy(qm))
    if bits == 4:
        assert packed.model.layers[0].mlp.down_proj.packed and packed.model.layers[0].mlp.down_proj.qweight is None
    for m, tol in ((qm, 1e-4), (packed, 2e-3)):
        cache = m.new_cache(2, 16)
        steps = [m(ids[:, :12], cache=cache, logits_to_keep=1)]
        steps += [m(ids[:, i:i + 1], cache=cache) for i in range(12, 16)]
        torch.testing.assert_close(torch.cat(steps, 1), out[:, 11:], atol=tol * out.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("bits,group,asym", [(8, 128, False), (4, 32, False), (4, 32, True)])
def test_quantize_cli_roundtrip(tiny_ckpt, tmp_path, bits, group, asym):
    out = tmp_path / f"q{bits}"
    assert cli(["quantize", str(tiny_ckpt[1]), str(out), "--bits", str(bits), "--group-size", str(group),
                "--dtype", "float32"] + (["--asym"] if asym else [])) == 0
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["sym"] == (not asym) and not qc["desc_act"]
    assert qc["group_size"] == (-1 if bits == 8 else group)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        sc = f.get_tensor("model.layers.0.mlp.down_proj.scales")
    inter, hidden = 128, 64
    assert qw.dtype == torch.int32 and qw.shape == (inter * bits // 32, hidden)
    assert sc.dtype == torch.float16 and sc.shape == ((1 if bits == 8 else inter // group), hidden)
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.embed_tokens.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    # int8 files carry an int8 head; int4 files a float one (tied here: only the embedding is stored)
    assert ("lm_head.qweight" in names) == (bits == 8) and "lm_head.weight" not in names

    loaded = qwen2.load_model(out, dtype="float32")
    assert loaded.quant == {"bits": bits, "group_size": qc["group_size"], "sym": not asym, "lm_head": 8}
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.bits == 8
    direct = quantize_model(qwen2.load_model(tiny_ckpt[1], dtype="float32"), bits, group, sym=not asym)
    ids = torch.randint(0, 512, (1, 10))
    # Exactly the numerics of quantizing in memory (which keeps the scales float16, as files do).
    torch.testing.assert_close(loaded(ids), direct(ids), atol=0, rtol=0)
    assert cli(["quantize", str(out), str(tmp_path / "again"), "--bits", "8"]) == 1  # already quantized


def test_bad_group_size_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    assert cli(["quantize", str(tiny_ckpt[1]), str(tmp_path / "x"), "--bits", "4", "--group-size", "48"]) == 1
    assert "group-size" in capsys.readouterr().err
