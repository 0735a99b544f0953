"""GPTQ (qwen2/gptq.py): the algorithm on matrices (against round-to-nearest and the reference
formulation), the sequential walk over a model, the file round trip and the CLI."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from util import TINY, TINY_MOE, make_hf_checkpoint

import qwen2
from qwen2.cli import main as cli
from qwen2.errors import Qwen2Error
from qwen2.io.gptq import save_quantized
from qwen2.quant.gptq import (
    calibration_ids,
    gptq_model,
    gptq_quantize,
    hessian,
    inverse_factor,
)
from qwen2.quant.linear import QuantLinear, dequantize, quantize_model, quantize_tensor

# (bits, group size, sym, full_range)
GRIDS = [(4, 32, True, True), (4, 32, True, False), (4, 32, False, False), (4, 128, True, True),
         (4, 256, True, False), (8, -1, True, False)]


def correlated_inputs(n, k, seed=0):
    """Rows of x [n, k] with strongly correlated features and uneven scales (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    return x * torch.exp(torch.randn(k, generator=g))  # some channels much larger than others


@pytest.mark.parametrize("bits,group,sym,full", GRIDS)
def test_diagonal_hessian_is_round_to_nearest(bits, group, sym, full):
    """With uncorrelated inputs (diagonal H) no error is passed on: every weight is rounded on its
    own, with its group's scale from the original weights, i.e. exactly round-to-nearest."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 512, generator=g)
    w[:4] += 1.5  # skewed rows (asymmetric grids)
    h = torch.diag(torch.rand(512, generator=g) + 0.1)
    u, dead = inverse_factor(h)
    assert not bool(dead.any())
    q, s, z = gptq_quantize(w, u, bits, group, sym, dead, full_range=full)
    rq, rs, rz = quantize_tensor(w, bits, group, sym, full_range=full)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)


@pytest.mark.parametrize("bits,group,sym,full", GRIDS)
def test_output_error_below_round_to_nearest(bits, group, sym, full):
    """On correlated inputs GPTQ's output error ||(W - Wq) X^T|| is well below round-to-nearest's
    (what it minimizes), while its weights stay on the same grid."""
    x = correlated_inputs(2048, 512)
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.05
    u, dead = inverse_factor(hessian(x))
    q, s, z = gptq_quantize(w, u, bits, group, sym, dead, full_range=full)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2 ** bits - 1 and s.shape == z.shape
    rq, rs, rz = quantize_tensor(w, bits, group, sym, full_range=full)
    err_gptq = ((w - dequantize(q, s, bits, z)) @ x.T).norm()
    err_rtn = ((w - dequantize(rq, rs, bits, rz)) @ x.T).norm()
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)  # 0.81-0.83 here


def sequential_gptq(w, u, bits, g, sym, full):
    """GPTQ without lazy blocks, the paper's Algorithm 1 as written: one column at a time, its error
    passed to all later columns at once; a group's grid from its weights when it is reached."""
    from qwen2.quant.linear import grid
    w = w.clone()
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % g == 0:
            s, z = grid(w[:, i:i + g], bits, sym, full)
        q = torch.clamp(torch.round(w[:, i] / s) + z, 0, 2 ** bits - 1)
        out[:, i] = (q - z) * s
        w[:, i + 1:] -= ((w[:, i] - out[:, i]) / u[i, i])[:, None] * u[i, i + 1:][None]
    return out


@pytest.mark.parametrize("bits,group,sym,full", GRIDS)
def test_blocked_equals_sequential(bits, group, sym, full):
    """The blocked implementation (lazy updates, groups inside blocks) computes Algorithm 1 exactly
    (in float64: in float32 the summation order differs, and one rounding tie that goes the other
    way changes the rest of its row)."""
    x = correlated_inputs(1024, 512, seed=5).double()
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(6)).double() * 0.05
    u, dead = inverse_factor(x.T @ x / 1024)
    q, s, z = gptq_quantize(w, u, bits, group, sym, dead, full_range=full)
    g = 512 if group == -1 else group
    ref = sequential_gptq(w, u, bits, g, sym, full)
    got = (q.double().view(64, -1, g) - z.T.double()[..., None]) * s.T.double()[..., None]
    assert torch.equal(got.view(64, 512), ref)


def test_inverse_factor_matches_reference():
    """U from the flipped Cholesky = the reference chain cholesky -> cholesky_inverse -> upper
    Cholesky, on the damped H; dead inputs get H_ii = 1 and zero weights."""
    x = correlated_inputs(600, 96, seed=3).double()
    x[:, [5, 40]] = 0  # dead inputs
    h = hessian(x.float()).double()
    torch.testing.assert_close(h, x.T @ x / 600, rtol=1e-5, atol=1e-5 * float(h.abs().max()))
    hb = hessian(x.float(), chunk=256, block=40)  # blocks on and above the diagonal, mirrored
    assert torch.equal(hb, hb.T)
    torch.testing.assert_close(hb.double(), h, rtol=1e-5, atol=1e-5 * float(h.abs().max()))
    u, dead = inverse_factor(h.clone().float())
    ref = h.clone()
    assert dead.nonzero().flatten().tolist() == [5, 40]
    ref[dead, dead] = 1
    ref += 0.01 * ref.diagonal().mean() * torch.eye(96, dtype=ref.dtype)
    ref_u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.double(), ref_u, rtol=1e-3, atol=1e-4 * float(ref_u.abs().max()))
    w = torch.randn(16, 96)
    q, s, z = gptq_quantize(w, u, 4, 32, True, dead)
    assert bool((dequantize(q, s, 4, z)[:, [5, 40]] == 0).all())


def test_scales_rounded_to_storage():
    """scale_dtype: the scales used (and returned) are those the file (float16) and the model dtype
    hold, so what is compensated is what runs."""
    x = correlated_inputs(512, 128, seed=4)
    w = torch.randn(32, 128) * 0.02
    u, dead = inverse_factor(hessian(x))
    _, s, _ = gptq_quantize(w, u, 4, 32, True, dead, scale_dtype=torch.bfloat16)
    assert torch.equal(s, s.half().bfloat16().float()) and torch.equal(s, s.half().float())


def test_calibration_ids():
    class Tok:  # one id per character
        def encode(self, text):
            return [ord(c) % 512 for c in text]
    ids = calibration_ids(Tok(), 4, 100, text="abcdefghij" * 100)
    assert ids.shape == (4, 100) and ids.dtype == torch.long
    text_ids = Tok().encode("abcdefghij" * 100)
    assert ids[0].tolist() == text_ids[:100] and ids[-1].tolist() == text_ids[-100:]  # spread over all of it
    assert calibration_ids(Tok(), 50, 100, text="x" * 250).shape == (2, 100)  # fewer when the text is short
    with pytest.raises(Qwen2Error, match="fewer than one sample"):
        calibration_ids(Tok(), 4, 100, text="short")
    default = calibration_ids(Tok(), 2, 64)  # the stdlib calibration text
    assert default.shape == (2, 64)


def _random_calib(vocab, n=4, length=32, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_model_walk_is_sequential(tiny_ckpt):
    """Each linear is GPTQ'd on the inputs that the model, with every linear before it already
    quantized, feeds it: layer 0's q_proj on the normed embeddings; layer 1's down_proj on what the
    quantized model computes up to it."""
    base = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    ids = _random_calib(base.config.vocab_size)
    qm = gptq_model(copy.deepcopy(base), 4, 32, ids, progress=False)
    assert qm.quant == {"bits": 4, "group_size": 32, "sym": False, "lm_head": 8}  # asymmetric by default
    assert all(isinstance(m, QuantLinear) for n, m in qm.named_modules() if n.endswith("_proj") or n == "lm_head")

    def gptq_of(weight, x):  # (GPTQ's default int4 grid: asymmetric)
        u, dead = inverse_factor(hessian(x))
        return gptq_quantize(weight, u, 4, 32, False, dead, scale_dtype=torch.float32)

    # q/k/v are one fused linear: GPTQ of it is GPTQ of each part on the same input, bit for bit
    x0 = base.model.layers[0].input_layernorm(base.model.embed_tokens(ids))
    w = base.model.layers[0].self_attn.qkv_proj.weight.detach()
    got = qm.model.layers[0].self_attn.qkv_proj.quantized()
    lo = 0
    for n in base.model.layers[0].self_attn.splits["qkv_proj"]:  # q, k, v
        q, s, z = gptq_of(w[lo:lo + n], x0)
        assert torch.equal(got[0][lo:lo + n], q) and torch.equal(got[1][:, lo:lo + n], s)
        assert torch.equal(got[2][:, lo:lo + n], z)
        lo += n

    seen = {}

    def record(mod, args):
        seen["x"] = args[0]
    hook = qm.model.layers[1].mlp.down_proj.register_forward_pre_hook(record)
    qm(ids)
    hook.remove()
    q, s, z = gptq_of(base.model.layers[1].mlp.down_proj.weight, seen["x"])
    got = qm.model.layers[1].mlp.down_proj.quantized()
    assert torch.equal(got[0], q) and torch.equal(got[1], s) and torch.equal(got[2], z)


def test_model_closer_to_float_than_rtn(tiny_ckpt):
    """On its calibration text, the GPTQ model's logits are closer to the float model's than the
    round-to-nearest model's (int4 group 32 and int8)."""
    base = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    ids = _random_calib(base.config.vocab_size, n=8, length=64, seed=1)
    ref = base(ids)
    for bits, sym in ((4, True), (4, False), (8, True)):  # the same grid for both
        g = gptq_model(copy.deepcopy(base), bits, 32, ids, sym=sym, full_range=False, progress=False)(ids)
        r = quantize_model(copy.deepcopy(base), bits, 32, sym=sym)(ids)
        assert (g - ref).norm() < 0.8 * (r - ref).norm(), (bits, sym, (g - ref).norm(), (r - ref).norm())


@pytest.mark.parametrize("tied,bits,sym", [(True, 4, True), (False, 4, False), (False, 8, True)])
def test_saved_file_gives_same_logits(tmp_path, tied, bits, sym):
    """save_quantized writes the GPTQ model's own q/scales/zeros: loading the file gives exactly the
    in-memory model's logits (int4 files keep a float head that loading makes int8)."""
    cfg = dict(TINY, tie_word_embeddings=tied)
    _, path = make_hf_checkpoint(tmp_path / "ckpt", cfg, seed=3)
    ids = _random_calib(cfg["vocab_size"], seed=2)
    for dtype in ("float32", "bfloat16"):
        m = gptq_model(qwen2.load_model(path, dtype=dtype), bits, 32, ids, lm_head=bits == 8, sym=sym, progress=False)
        out = save_quantized(m, tmp_path / f"q{bits}{dtype}")
        if bits == 4:  # what loading does to the float head
            m.lm_head = QuantLinear.from_linear(m.lm_head, 8, -1, m.dtype)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc == {"quant_method": "gptq", "bits": bits, "group_size": -1 if bits == 8 else 32, "sym": sym,
                      "desc_act": False, "lm_head": bits == 8, "checkpoint_format": "gptq"}
        loaded = qwen2.load_model(out, dtype=dtype)
        test_ids = _random_calib(cfg["vocab_size"], n=2, length=12, seed=5)
        torch.testing.assert_close(loaded(test_ids), m(test_ids), atol=0, rtol=0)
        # not what round-to-nearest would have written
        rtn = quantize_model(qwen2.load_model(path, dtype=dtype), bits, 32, sym=sym)
        assert not torch.equal(rtn(test_ids), m(test_ids))


def test_save_refuses_inconsistent_requests(tiny_ckpt, tmp_path):
    base = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    m = quantize_model(copy.deepcopy(base), 4, 32)
    with pytest.raises(Qwen2Error, match="group_size=32, not 64"):
        save_quantized(m, tmp_path / "a", 4, 64)
    untied = copy.deepcopy(m)
    untied.config = copy.deepcopy(m.config)
    untied.config.tie_word_embeddings = False
    with pytest.raises(Qwen2Error, match="lm_head is quantized"):
        save_quantized(untied, tmp_path / "c")
    with pytest.raises(Qwen2Error, match="already quantized"):
        gptq_model(m, 4, 32, _random_calib(512), progress=False)
    with pytest.raises(Qwen2Error, match="calib_ids"):
        quantize_model(copy.deepcopy(base), 4, 32, method="gptq")


def test_moe_experts_without_tokens_fall_back_to_rtn(tmp_path):
    """MoE: each expert is GPTQ'd on the tokens routed to it; one that no calibration token chose
    is rounded to nearest."""
    _, path = make_hf_checkpoint(tmp_path / "moe", TINY_MOE, seed=4)
    base = qwen2.load_model(path, dtype="float32")
    ids = _random_calib(TINY_MOE["vocab_size"], n=1, length=3, seed=6)  # 3 tokens x top-2 of 8 experts
    chosen = {}

    def record(mod, args, out):
        chosen["e"] = out[2]
    hook = base.model.layers[0].mlp.gate.register_forward_hook(record)
    base(ids)
    hook.remove()
    unused = set(range(TINY_MOE["num_experts"])) - set(chosen["e"].flatten().tolist())
    assert unused  # at most 6 of the 8 experts were picked
    m = gptq_model(copy.deepcopy(base), 4, 32, ids, lm_head=False, progress=False)  # (an int4 file's float head)
    for e, mlp in enumerate(m.model.layers[0].mlp.experts):
        rtn = quantize_tensor(base.model.layers[0].mlp.experts[e].down_proj.weight, 4, 32, sym=False)[0]
        assert torch.equal(mlp.down_proj.quantized()[0], rtn) == (e in unused), e
    assert all(isinstance(m_, QuantLinear) for n, m_ in m.named_modules() if n.endswith("_proj"))
    assert torch.isfinite(m(ids)).all()
    # the file names every expert's (and the shared expert's) parts; it loads back to the same model
    out = save_quantized(m, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for e in range(TINY_MOE["num_experts"]):
        assert {f"model.layers.1.mlp.experts.{e}.{p}.qweight" for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert {"model.layers.0.mlp.shared_expert.gate_proj.qzeros", "model.layers.0.self_attn.v_proj.bias",
            "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"} <= names
    assert not any("gate_up_proj" in n or "qkv_proj" in n for n in names)
    m.lm_head = QuantLinear.from_linear(m.lm_head, 8, -1, m.dtype)  # what loading does to an int4 file's float head
    test_ids = _random_calib(TINY_MOE["vocab_size"], n=2, length=9, seed=8)
    torch.testing.assert_close(qwen2.load_model(out, dtype="float32")(test_ids), m(test_ids), atol=0, rtol=0)


def test_cli_gptq_end_to_end(ckpt, tmp_path, capsys):
    """qwen2 quantize --method gptq on a checkpoint with the real tokenizer: the file equals GPTQ in
    memory on the same calibration windows; --calib takes a text file."""
    out = tmp_path / "g4"
    assert cli(["quantize", str(ckpt), str(out), "--bits", "4", "--method", "gptq", "--calib-samples", "3",
                "--calib-len", "48", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "GPTQ on 3 x 48 calibration tokens" in err and "GPTQ" in err and "wrote" in err
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is False  # GPTQ's default
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.down_proj.qweight" in set(f.keys())
    loaded = qwen2.load_model(out, dtype="float32")
    ids = calibration_ids(qwen2.load_tokenizer(ckpt), 3, 48)
    mem = gptq_model(qwen2.load_model(ckpt, dtype="float32"), 4, 32, ids, progress=False)
    test_ids = _random_calib(1000, n=1, length=10, seed=7)
    torch.testing.assert_close(loaded(test_ids), mem(test_ids), atol=0, rtol=0)

    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 60)
    out2 = tmp_path / "g4b"
    assert cli(["quantize", str(ckpt), str(out2), "--bits", "4", "--method", "gptq", "--calib", str(text),
                "--calib-samples", "2", "--calib-len", "32", "--dtype", "float32", "--sym"]) == 0
    assert json.loads((out2 / "config.json").read_text())["quantization_config"]["sym"] is True
    mem2 = gptq_model(qwen2.load_model(ckpt, dtype="float32"), 4, 32,
                      calibration_ids(qwen2.load_tokenizer(ckpt), 2, 32, text.read_text()), sym=True, progress=False)
    torch.testing.assert_close(qwen2.load_model(out2, dtype="float32")(test_ids), mem2(test_ids), atol=0, rtol=0)
    capsys.readouterr()
    assert cli(["quantize", str(ckpt), str(tmp_path / "x"), "--bits", "4", "--calib", str(text)]) == 1
    assert "--method gptq" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    assert cli(["quantize", str(ckpt), str(tmp_path / "y"), "--bits", "4", "--method", "gptq",
                "--calib", str(short)]) == 1
    assert "fewer than one sample" in capsys.readouterr().err


# ------------------------------------------------ official GPTQ-Int8 layout (AutoGPTQ / GPTQModel)
def _autogptq_pack(intweight: torch.Tensor, zeros: torch.Tensor, bits: int):
    """AutoGPTQ's QuantLinear.pack loops: levels [in, out] and zero points [n_groups, out] ->
    qweight int32 [in * bits / 32, out], qzeros int32 [n_groups, out * bits / 32] (z - 1 stored)."""
    per = 32 // bits
    iw = intweight.to(torch.int64)
    qweight = torch.zeros(iw.shape[0] // per, iw.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= iw[row * per + j] << (bits * j)
    z = zeros.to(torch.int64) - 1
    qzeros = torch.zeros(z.shape[0], z.shape[1] // per, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= z[:, col * per + j] << (bits * j)
    as_i32 = lambda t: torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32)
    return as_i32(qweight), as_i32(qzeros)


def _gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits):
    """GPTQModel's dequantize_weight (classic format, zeros + 1) -> W^T [in, out], float32."""
    per, maxq = 32 // bits, 2 ** bits - 1
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, per), wf.unsqueeze(0)).to(torch.int16)
    zeros = (torch.bitwise_and(zeros, maxq) + 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, per, -1), wf.unsqueeze(-1)).to(torch.int16)
    weight = torch.bitwise_and(weight, maxq).reshape(-1, weight.shape[2])
    return scales.float()[g_idx.long()] * (weight - zeros[g_idx.long()]).float()


@pytest.mark.parametrize("dims,group_size,sym", [("0.5B", 128, True), ("1.5B", 128, True), ("0.5B", -1, True),
                                                 ("0.5B", 128, False)])
def test_official_int8_layout_equals_reference(tmp_path, dims, group_size, sym):
    """GPTQ-Int8 as released (bits 8, group 128, sym, AutoGPTQ's packing) at real dims: weights
    equal GPTQModel's reference dequantization; per-channel symmetric int8 lands on the int8
    kernel, grouped or asymmetric int8 (which it cannot hold) is dequantized to float."""
    import json as _json

    from safetensors.torch import save_file
    from test_awq import config, float_tensors, reference_model, shapes
    cfg = config(dims)
    g = torch.Generator().manual_seed(7)
    tensors, ref = float_tensors(cfg, g), {}
    for i in range(cfg["num_hidden_layers"]):
        for name, (out_f, in_f) in shapes(cfg).items():
            gs = in_f if group_size == -1 else group_size
            n_groups = in_f // gs
            q = torch.randint(0, 256, (in_f, out_f), generator=g)
            z = torch.full((n_groups, out_f), 128) if sym else torch.randint(1, 256, (n_groups, out_f), generator=g)
            s = (torch.rand(n_groups, out_f, generator=g) * 0.0004 + 0.0001).half()
            g_idx = (torch.arange(in_f) // gs).to(torch.int32)
            qw, qz = _autogptq_pack(q, z, 8)
            p = f"model.layers.{i}.{name}"
            tensors.update({f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": s, f"{p}.g_idx": g_idx})
            ref[p] = _gptqmodel_dequantize(qw, qz, s, g_idx, 8)
    d = tmp_path / "gptq8"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "gptq", "bits": 8, "group_size": group_size, "sym": sym, "desc_act": False,
          "static_groups": False, "true_sequential": True, "damp_percent": 0.01}
    (d / "config.json").write_text(_json.dumps(dict(cfg, quantization_config=qc)))
    model = qwen2.load_model(d, dtype="float32")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, QuantLinear) == (group_size == -1 and sym)
    for i in range(cfg["num_hidden_layers"]):
        for mod, parts in {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           "mlp.down_proj": ("mlp.down_proj",)}.items():
            m = model.get_submodule(f"model.layers.{i}.{mod}")
            got = m.dequantized().float() if isinstance(m, QuantLinear) else m.weight
            want = torch.cat([ref[f"model.layers.{i}.{p}"].T for p in parts])
            assert torch.equal(got, want) if not isinstance(m, QuantLinear) else \
                (got - want).abs().max() <= 1e-7  # int8 scales held as float32: one rounding of q * s
    ids = torch.randint(0, cfg["vocab_size"], (2, 20), generator=g)
    with torch.no_grad():
        ours, want = model(ids), reference_model(tmp_path, cfg, tensors, ref)(ids)
    assert (ours - want).abs().max().item() <= 1e-4 * want.std().item()
