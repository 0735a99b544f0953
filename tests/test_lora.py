"""LoRA against PEFT on transformers' Qwen2: same loss, same gradient for every A and B (fused
q/k/v and gate/up included), adapters that go both ways in PEFT's file format, merge, the adapter
switch, and LoRA over int4/int8 weights (QLoRA) against the same weights dequantized."""
from __future__ import annotations

import json

import pytest
import torch

import qwen2
from qwen2.errors import Qwen2Error
from qwen2.io.adapter import load_adapter, save_adapter
from qwen2.model.lora import TARGETS, LoRALinear, adapter_disabled, add_lora, lora_modules, merge_lora, peft_name
from util import TINY, hf_model, make_hf_checkpoint, peft_lora

peft = pytest.importorskip("peft")

CFG = dict(TINY, tie_word_embeddings=False)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100
    return ids, mask, labels


def _randomize(model, seed=1):
    """Non-zero B (fresh adapters have B = 0, which would make every A gradient zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in (*m.lora_A.values(), *m.lora_B.values()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _peft_params(peft_model):
    """PEFT module path (model.layers.0.self_attn.q_proj) -> its LoraLayer."""
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def _pair(tmp_path, config, targets, r=4, alpha=8.0):
    _, path = make_hf_checkpoint(tmp_path / "ck", config)
    ours = add_lora(qwen2.load_model(path, dtype="float32"), r=r, alpha=alpha, targets=targets)
    _randomize(ours)
    ref = peft.get_peft_model(hf_model(config), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                                 lora_dropout=0.0))
    theirs = _peft_params(ref)
    with torch.no_grad():
        for name, m in lora_modules(ours):
            for part in m.lora_A.keys():
                layer = theirs[peft_name(name, part)]
                layer.lora_A["default"].weight.copy_(m.lora_A[part])
                layer.lora_B["default"].weight.copy_(m.lora_B[part])
    return ours, ref, theirs, path


@pytest.mark.parametrize("targets", [TARGETS, ("q_proj", "v_proj"), ("k_proj", "up_proj", "o_proj")],
                         ids=["all", "q-v", "k-up-o"])
def test_loss_and_every_lora_gradient_match_peft(tmp_path, targets):
    ours, ref, theirs, _ = _pair(tmp_path, CFG, targets)
    assert sum(1 for _ in lora_modules(ours)) > 0
    # only the adapters train
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids, mask, labels = _batch(CFG["vocab_size"])
    loss = ours(ids, attention_mask=mask, labels=labels).loss
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    want.backward()
    n = 0
    for name, m in lora_modules(ours):
        for part in m.lora_A.keys():
            layer = theirs[peft_name(name, part)]
            for mine, their in ((m.lora_A[part], layer.lora_A["default"].weight),
                                (m.lora_B[part], layer.lora_B["default"].weight)):
                scale = their.grad.abs().max().item()
                assert scale > 0
                torch.testing.assert_close(mine.grad, their.grad, atol=1e-4 * scale, rtol=1e-3,
                                           msg=f"{name} {part}")
                n += 1
    assert n == 2 * len(theirs) == 2 * CFG["num_hidden_layers"] * len(targets)


def test_saved_adapter_loads_in_peft_and_matches_our_merged_model(tmp_path):
    ours, _, _, path = _pair(tmp_path, CFG, TARGETS)
    save_adapter(ours, tmp_path / "adapter", base_model=str(path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == list(TARGETS)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in keys

    ids, mask, _ = _batch(CFG["vocab_size"], seed=3)
    theirs = peft.PeftModel.from_pretrained(hf_model(CFG), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        unmerged = ours(ids, attention_mask=mask)
        merged = merge_lora(ours)(ids, attention_mask=mask)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    keep = mask.bool()
    torch.testing.assert_close(merged[keep], want[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unmerged[keep], want[keep], atol=1e-4, rtol=1e-4)


def test_peft_saved_adapter_loads_into_ours(tmp_path):
    _, path = make_hf_checkpoint(tmp_path / "ck", CFG)
    ref = peft_lora(CFG, 4, 0.2, r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"], use_rslora=True)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_adapter(qwen2.load_model(path, dtype="float32"), tmp_path / "theirs")
    ids, mask, _ = _batch(CFG["vocab_size"], seed=5)
    with torch.no_grad():
        want = ref.eval()(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
        base = hf_model(CFG)(input_ids=ids, attention_mask=mask).logits
        with adapter_disabled(ours):
            off = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
    assert (got[keep] - base[keep]).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(off[keep], base[keep], atol=1e-4, rtol=1e-4)


def test_merge_unmerge_round_trip(tiny_ckpt):
    model = add_lora(qwen2.load_model(tiny_ckpt[1], dtype="float32"), r=3, alpha=6)
    _randomize(model)
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        before = model(ids)
        w0 = model.model.layers[0].self_attn.qkv_proj.base.weight.clone()
        for _, m in lora_modules(model):
            m.merge()
        merged = model(ids)
        for _, m in lora_modules(model):
            m.unmerge()
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.base.weight, w0, atol=1e-6, rtol=0)


def test_bad_adapters_are_one_line_errors(tmp_path, tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    with pytest.raises(Qwen2Error, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["lm_head"]}))
    with pytest.raises(Qwen2Error, match="lm_head"):
        load_adapter(model, tmp_path)
    src = add_lora(qwen2.load_model(tiny_ckpt[1], dtype="float32"), r=2, alpha=4, targets=["q_proj"])
    save_adapter(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=3)))
    with pytest.raises(Qwen2Error, match="shape"):
        load_adapter(qwen2.load_model(tiny_ckpt[1], dtype="float32"), tmp_path / "a")


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_gradients_equal_lora_on_the_dequantized_weights(tmp_path, bits):
    """The base stays quantized (buffers, no float copy kept); loss and gradients equal a float
    model holding exactly the dequantized weights."""
    from qwen2.quant.linear import QuantLinear, quantize_model
    cfg = dict(TINY, hidden_size=64, intermediate_size=128)
    _, path = make_hf_checkpoint(tmp_path / "ck", cfg)
    q = quantize_model(qwen2.load_model(path, dtype="float32"), bits, 32, lm_head=False)
    ref = qwen2.load_model(path, dtype="float32")
    with torch.no_grad():
        for (name, m), (_, r) in zip(q.named_modules(), ref.named_modules()):
            if isinstance(m, QuantLinear):
                r.weight.copy_(m.dequantized())
    add_lora(q, r=4, alpha=8)
    add_lora(ref, r=4, alpha=8)
    _randomize(q)
    _randomize(ref)
    assert all(isinstance(m.base, QuantLinear) for _, m in lora_modules(q))
    ids, mask, labels = _batch(cfg["vocab_size"], seed=6)
    for model in (q, ref):
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    got = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(TARGETS)
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-4 * want[n].abs().max().item(), rtol=1e-3, msg=n)


def test_adapter_over_gguf_blocks(tmp_path):
    """An adapter (saved by PEFT) over a GGUF file loaded at its own precision and prepared for
    serving (the block kernels): `with_adapter` runs it beside the blocks (no float copy) without
    changing the base model, and equals the adapter merged into the dequantized weights (itself
    equal to PEFT: the tests above), as closely as the block kernels equal the dequantized model."""
    from gguf import GGMLQuantizationType as Q
    from qwen2.engine.runner import prepare
    from qwen2.io.adapter import with_adapter
    from qwen2.io.gguf import load_gguf_model
    from qwen2.quant.blocks import BlockLinear
    from test_gguf import IDS, write_gguf
    types = {"token_embd.weight": Q.F16, "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1,
             "blk.0.attn_v.weight": Q.Q5_0, "blk.0.attn_output.weight": Q.Q5_1, "blk.1.ffn_up.weight": Q.Q4_0}
    path = write_gguf(tmp_path / "m.gguf", hf_model(CFG), types, default=Q.Q8_0)
    theirs = peft_lora(CFG, 6, 0.1, r=4, lora_alpha=8, target_modules=list(TARGETS))
    theirs.save_pretrained(tmp_path / "ad")

    base = load_gguf_model(path)
    assert prepare(base) == "gguf-blocks"
    dequantized = load_gguf_model(path, dtype="float32")
    with torch.inference_mode():
        want_base = dequantized(IDS)
        want = merge_lora(load_adapter(dequantized, tmp_path / "ad"))(IDS)
        before = base(IDS)
        model = with_adapter(base, tmp_path / "ad")
        got = model(IDS)
        after = base(IDS)
    assert any(isinstance(m, LoRALinear) and isinstance(m.base, BlockLinear) for m in model.modules())
    kernels = (before - want_base).abs().max().item() + 1e-5 * want.abs().max().item()
    assert (want - want_base).abs().max().item() > 10 * kernels   # the adapter matters beyond that
    assert (got - want).abs().max().item() <= 2 * kernels
    assert torch.equal(before, after)   # the base model is untouched by the adapter view
    assert not any(isinstance(m, LoRALinear) for m in base.modules())


def test_load_with_adapter_over_int4_keeps_it_quantized(tmp_path, ckpt):
    """`qwen2.load(q4, adapter=)` on a `qwen2 quantize` checkpoint: a LoRA beside the int4 linears
    (no float copy), the function `with_adapter` gives over the same loaded checkpoint (checked
    against the dequantized model on GGUF blocks above), and not the base's."""
    from qwen2.cli import main
    from qwen2.io.adapter import with_adapter
    from qwen2.quant.linear import QuantLinear
    assert main(["quantize", str(ckpt), str(tmp_path / "q4"), "--bits", "4"]) == 0
    ours = add_lora(qwen2.load_model(ckpt, dtype="float32"), r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    _randomize(ours)
    save_adapter(ours, tmp_path / "ad")
    llm = qwen2.load(tmp_path / "q4", adapter=tmp_path / "ad", mode="eager")
    assert any(isinstance(m, LoRALinear) and isinstance(m.base, QuantLinear) for m in llm.model.modules())
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == m.in_features for m in llm.model.modules())
    base = qwen2.load(tmp_path / "q4", mode="eager")
    ids = torch.tensor([llm.tokenizer.encode("LoRA over int4 weights")])
    with torch.inference_mode():
        got, off, want = llm.model(ids), base.model(ids), with_adapter(base.model, tmp_path / "ad")(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - off).abs().max().item() > 1e-2
    with pytest.raises(Qwen2Error, match="lora_A.weight has shape"):
        bad = add_lora(qwen2.load_model(ckpt, dtype="float32"), r=2, targets=("q_proj",))
        save_adapter(bad, tmp_path / "r2")
        cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
        (tmp_path / "r2" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=3)))
        qwen2.load(tmp_path / "q4", adapter=tmp_path / "r2", mode="eager")
