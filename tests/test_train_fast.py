"""The training step's fast paths against the plain ones they replace: the frozen head's fused
log-prob (no logits kept for backward) against cross-entropy on the full logits, right-padded
batches run unmasked against the masked model, LoRA computing in bfloat16 over a bfloat16 base
against float32, and the cheap dropout mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen2
from qwen2.model.lora import add_lora, fast_dropout, lora_parameters
from qwen2.train import loss as L
from util import TINY

CFG = dict(TINY, tie_word_embeddings=False)


def _batch(vocab, seed=0, lengths=(12, 9, 5)):
    """Right-padded rows (as qwen2.train.data.collate makes them), a few positions unscored."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return ids, mask, labels


def _lora_model(path, dtype=torch.float32, seed=1):
    m = add_lora(qwen2.load_model(path, dtype=dtype), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def _reference_logprobs(model, ids, mask, labels):
    """The plain way: full logits of the masked model, log-softmax, the scored labels."""
    logits = model(ids, attention_mask=mask)[:, :-1]
    target = labels[:, 1:]
    sel = target != -100
    return torch.log_softmax(logits[sel].float(), -1).gather(1, target[sel][:, None])[:, 0]


def _grads(model):
    return [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("chunk", [256, 5])
def test_frozen_head_logprobs_and_gradients_equal_full_logits(tiny_ckpt, monkeypatch, chunk):
    monkeypatch.setattr(L, "FROZEN_CHUNK", chunk)   # 5: several chunks, the last one short
    _, path = tiny_ckpt
    ids, mask, labels = _batch(TINY["vocab_size"])
    ours = _lora_model(path)
    ref = _lora_model(path)
    lp, rows = L.token_logprobs(ours, ids, mask, labels)
    assert lp.grad_fn is not None and "FrozenHeadLogp" in type(lp.grad_fn).__name__
    want = _reference_logprobs(ref, ids, mask, labels)
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    assert rows.tolist() == torch.nonzero(labels[:, 1:] != -100)[:, 0].tolist()
    w = torch.linspace(0.5, 1.5, lp.numel())   # a non-uniform upstream gradient
    (lp * w).sum().backward()
    (want * w).sum().backward()
    for a, b in zip(_grads(ours), _grads(ref)):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_frozen_quantized_head(tmp_path, bits):
    """A quantized lm_head (QLoRA from a `qwen2 quantize` file): the fused path equals
    cross-entropy on its dequantized weight."""
    from qwen2.quant.linear import QuantLinear
    from util import make_hf_checkpoint
    _, path = make_hf_checkpoint(tmp_path / "ck", CFG)
    ours = _lora_model(path)
    ref = _lora_model(path)
    ours.lm_head = QuantLinear.from_linear(ours.lm_head, bits, 32)
    with torch.no_grad():
        ref.lm_head.weight.copy_(ours.lm_head.dequantized())
    ids, mask, labels = _batch(CFG["vocab_size"], seed=2)
    lp, _ = L.token_logprobs(ours, ids, mask, labels)
    assert "FrozenHeadLogp" in type(lp.grad_fn).__name__
    want = _reference_logprobs(ref, ids, mask, labels)
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)
    lp.sum().backward()
    want.sum().backward()
    for a, b in zip(_grads(ours), _grads(ref)):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-3)


def test_right_padded_batches_run_unmasked_with_the_same_result(tiny_ckpt, monkeypatch):
    _, path = tiny_ckpt
    model = _lora_model(path)
    ids, mask, labels = _batch(TINY["vocab_size"], seed=3)
    seen = []
    orig = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, i, attention_mask=None, **kw:
                        seen.append(attention_mask) or orig(self, i, attention_mask=attention_mask, **kw))
    with torch.no_grad():
        lp, _ = L.token_logprobs(model, ids, mask, labels)
        assert seen[-1] is None                       # right padding: no mask built
        want = _reference_logprobs(model, ids, mask, labels)
        assert seen[-1] is not None
        left = torch.flip(mask, [1])                  # left padding keeps the mask
        L.token_logprobs(model, ids, left, labels.masked_fill(left == 0, -100))
        assert seen[-1] is not None
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)


def test_lora_over_bf16_trains_like_float32(tiny_ckpt):
    """Over a bfloat16 base the adapters compute in bfloat16 (float32 master weights and
    gradients): loss and gradients within bfloat16 rounding of the float32 run."""
    _, path = tiny_ckpt
    ids, mask, labels = _batch(TINY["vocab_size"], seed=4)
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        m = _lora_model(path, dtype)
        assert all(p.dtype == torch.float32 for p in lora_parameters(m))
        lp, _ = L.token_logprobs(m, ids, mask, labels)
        loss = -lp.mean()
        loss.backward()
        runs.append((loss.item(), _grads(m)))
    (l32, g32), (l16, g16) = runs
    assert abs(l16 - l32) < 2e-2 * abs(l32)
    for a, b in zip(g16, g32):
        assert a.dtype == torch.float32
        cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.99, cos
        assert (a - b).norm() < 0.1 * b.norm()


def test_fast_dropout():
    x = torch.randn(512, 256, requires_grad=True)
    torch.manual_seed(0)
    y = fast_dropout(x, 0.1)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    keep = 65536 / (65536 - round(0.1 * 65536))
    torch.testing.assert_close(y[~dropped], x[~dropped] * keep)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad == 0, dropped)        # the same mask in backward
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], keep))
    # seeded: the same mask again; a fresh draw differs
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x.detach(), 0.1) == 0, dropped)
    assert not torch.equal(fast_dropout(x.detach(), 0.1) == 0, dropped)
    # a training LoRA applies it to the adapter's input only; eval mode does not
    m = torch.nn.Linear(256, 8, bias=False)
    from qwen2.model.lora import LoRALinear
    lora = LoRALinear(m, [("q_proj", 8)], {"q_proj"}, r=2, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B["q_proj"].fill_(1.0)
    xs = torch.randn(4, 256)
    lora.eval()
    assert torch.equal(lora(xs), lora(xs))
    lora.train()
    assert not torch.equal(lora(xs), lora(xs))


def test_int4_checkpoint_load_lets_go_of_the_file_pages(tmp_path, monkeypatch):
    """QLoRA's base from a `qwen2 quantize --bits 4` file: every packed GPTQ tensor and the float
    head (rounded to int8) are released from resident memory once copied, a block of head rows
    at a time; the model equals the one quantized in memory (tests/test_gptq.py checks logits).
    Measured on Qwen2.5-Coder-1.5B's int4 file: load peak 3367 -> 1487 MiB (docs/finetune.md)."""
    import qwen2.io.load as load_mod
    from qwen2.io.gptq import save_quantized
    from qwen2.quant.linear import QuantLinear, quantize_model
    from util import make_hf_checkpoint
    _, path = make_hf_checkpoint(tmp_path / "ck", CFG)
    ref = quantize_model(qwen2.load_model(path, dtype=torch.bfloat16), 4, 32, lm_head=False)
    save_quantized(ref, tmp_path / "q4")
    released = []
    orig = load_mod.release_pages
    monkeypatch.setattr(load_mod, "release_pages", lambda t: released.append(t) or orig(t))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q4" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    m = qwen2.load_model(tmp_path / "q4", dtype=torch.bfloat16)
    spans = {(t.data_ptr(), t.numel() * t.element_size()) for t in released}
    packed = [n for n in names if n.rpartition(".")[2] in ("qweight", "qzeros", "scales", "g_idx")]
    assert packed and len(spans) >= len(packed)
    head_blocks = [t for t in released if t.shape[-1] == CFG["hidden_size"] and t.dtype == torch.bfloat16]
    assert sum(t.shape[0] for t in head_blocks) >= CFG["vocab_size"]
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bits == 8
    ref.lm_head = QuantLinear.from_linear(ref.lm_head, 8, -1, torch.bfloat16)
    for (n, a), (_, b) in zip(sorted(m.named_buffers()), sorted(ref.named_buffers())):
        if a is not None and n != "rotary.inv_freq":
            assert torch.equal(a, b), n
