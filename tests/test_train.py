"""Training: the loss and its gradients equal transformers' on the same weights, and a few
optimizer steps lower the loss. Everything the loaders build is a plain trainable nn.Module."""
from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2.model.decoder import IGNORE_INDEX, CausalLMOutput
from util import TINY, TINY_MOE, make_hf_checkpoint


def _batch(vocab, seed=0):
    """Two rows, the second left-padded by 4; labels: the ids, IGNORE_INDEX on padding, on the
    first real token of the padded row (it would be scored from a padding position, whose logits
    are meaningless) and on one token in the middle."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[1, 4] = IGNORE_INDEX
    labels[0, 6] = IGNORE_INDEX
    return ids, mask, labels


def _grad(model, hf_name, config):
    """Our gradient for the transformers parameter `hf_name` (fused projections: its rows)."""
    h, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // h
    rows = {"q_proj": (0, h * d), "k_proj": (h * d, (h + kv) * d), "v_proj": ((h + kv) * d, (h + 2 * kv) * d)}
    mod, _, leaf = hf_name.rpartition(".")
    parent, _, proj = mod.rpartition(".")
    params = dict(model.named_parameters())
    if proj in rows and f"{parent}.qkv_proj.{leaf}" in params:
        a, b = rows[proj]
        return params[f"{parent}.qkv_proj.{leaf}"].grad[a:b]
    if proj in ("gate_proj", "up_proj") and f"{parent}.gate_up_proj.{leaf}" in params:
        g = params[f"{parent}.gate_up_proj.{leaf}"].grad
        half = g.shape[0] // 2
        return g[:half] if proj == "gate_proj" else g[half:]
    return params[hf_name].grad


@pytest.mark.parametrize("config", [TINY, dict(TINY, tie_word_embeddings=False), TINY_MOE],
                         ids=["tied", "untied", "moe"])
def test_loss_and_gradients_match_transformers(tmp_path, config):
    ref, path = make_hf_checkpoint(tmp_path / "ck", config)
    ours = qwen2.load_model(path, dtype="float32")
    assert all(p.requires_grad for p in ours.parameters())
    ids, mask, labels = _batch(config["vocab_size"])

    out = ours(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, CausalLMOutput)
    logits, loss = out
    assert loss.dtype == torch.float32 and loss.dim() == 0
    want = ref(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-5)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], want.logits[keep], atol=1e-4, rtol=1e-4)

    loss.backward()
    want.loss.backward()
    names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.bias",
             "model.layers.1.self_attn.o_proj.weight"]
    if config.get("num_experts"):
        names += ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert.up_proj.weight",
                  "model.layers.1.mlp.shared_expert_gate.weight"]
    else:
        names += ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                  "model.layers.1.mlp.down_proj.weight"]
    if not config["tie_word_embeddings"]:
        names.append("lm_head.weight")
    theirs = dict(ref.named_parameters())
    for name in names:
        g, w = _grad(ours, name, config), theirs[name].grad
        assert g is not None, name
        scale = w.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, w, atol=1e-4 * scale, rtol=1e-3, msg=name)


def test_loss_ignores_masked_labels_and_matches_cross_entropy(tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="float32")
    ids, mask, labels = _batch(TINY["vocab_size"], seed=1)
    logits, loss = model(ids, attention_mask=mask, labels=labels)
    scored = [(b, t) for b in range(2) for t in range(11) if labels[b, t + 1] != IGNORE_INDEX]
    manual = torch.stack([-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]] for b, t in scored]).mean()
    torch.testing.assert_close(loss.double(), manual, atol=1e-6, rtol=1e-6)
    # the plain call is unchanged: logits only
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
    assert isinstance(plain, torch.Tensor)
    torch.testing.assert_close(plain, logits.detach())
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=labels, logits_to_keep=1)


def test_bf16_loss_is_computed_in_float32(tiny_ckpt):
    model = qwen2.load_model(tiny_ckpt[1], dtype="bfloat16")
    ids, mask, labels = _batch(TINY["vocab_size"], seed=2)
    logits, loss = model(ids, attention_mask=mask, labels=labels)
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    loss.backward()
    assert model.model.embed_tokens.weight.grad.dtype == torch.bfloat16


def test_sgd_steps_lower_the_loss(tmp_path):
    cfg = dict(TINY, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    _, path = make_hf_checkpoint(tmp_path / "ck", cfg, seed=7)
    model = qwen2.load_model(path, dtype="float32").train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg["vocab_size"], (4, 16), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    # the tie survives training: one tensor, updated once per step
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_quantized_weights_are_buffers(tiny_ckpt):
    from qwen2.quant.linear import QuantLinear, quantize_model
    model = quantize_model(qwen2.load_model(tiny_ckpt[1], dtype="float32"), 4, 32)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant and all(name in dict(m.named_buffers()) for m in quant for name in ("qweight", "scales"))
    assert all(not any(p is m.qweight for p in model.parameters()) for m in quant)
    # what is still float (norms, embeddings, biases) trains
    assert all(p.requires_grad for p in model.parameters())
