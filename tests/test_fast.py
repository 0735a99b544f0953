"""Fast paths (fused projections, pre-packed weights) against the exact path, at their own
tolerance. The exact path itself is held to transformers by tests/test_model*.py."""
import copy

import pytest
import torch

import qwen2
from qwen2.quant.linear import PackedLinear, pack_linears


@pytest.fixture(scope="module")
def exact(tiny_ckpt):
    return qwen2.load_model(tiny_ckpt[1], dtype="float32")


def _decode(model, ids, steps):
    """Greedy prefill + decode with the static cache; returns (tokens, per-step logits)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits = [model(ids, cache=cache, logits_to_keep=1)[:, -1]]
    toks = []
    for _ in range(steps):
        toks.append(logits[-1].argmax(-1))
        logits.append(model(toks[-1][:, None], cache=cache, logits_to_keep=1)[:, -1])
    return torch.stack(toks, 1), torch.stack(logits, 1)


def test_projections_are_built_fused(exact):
    """q/k/v and gate/up are one matmul each from the start (the HF parts live only in the files)."""
    attn, mlp = exact.model.layers[0].self_attn, exact.model.layers[0].mlp
    assert type(attn.qkv_proj) is torch.nn.Linear and not hasattr(attn, "q_proj")
    assert type(mlp.gate_up_proj) is torch.nn.Linear and not hasattr(mlp, "gate_proj")
    c = exact.config
    assert attn.qkv_proj.out_features == (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    assert mlp.gate_up_proj.out_features == 2 * c.intermediate_size


def test_attention_kernel_is_called(exact):
    model = copy.deepcopy(exact)
    calls = []

    def hook(q, k, v, mask, is_causal, q_pos, k_pos):
        calls.append(q.shape)
        return exact.model.layers[0].self_attn.attn_fn(q, k, v, mask, is_causal, q_pos, k_pos)
    model.model.layers[1].self_attn.attn_fn = hook
    ids = torch.randint(0, exact.config.vocab_size, (1, 5))
    torch.testing.assert_close(model(ids), exact(ids), atol=1e-5, rtol=1e-5)
    assert calls == [(1, exact.config.num_attention_heads, 5, exact.config.head_dim)]


def test_packed_bf16_matches_plain_bf16(tiny_ckpt):
    plain = qwen2.load_model(tiny_ckpt[1], dtype="bfloat16")
    fast = pack_linears(copy.deepcopy(plain))
    if PackedLinear.supported(torch.bfloat16):
        assert isinstance(fast.model.layers[0].self_attn.qkv_proj, PackedLinear)
        assert isinstance(fast.lm_head, PackedLinear)
    else:  # no AVX512: packing leaves the model as it was
        assert type(fast.lm_head) is torch.nn.Linear
    ids = torch.randint(0, plain.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    for n in (1, 40):  # decode-sized and prefill-sized matmuls
        torch.testing.assert_close(fast(ids[:, :n]), plain(ids[:, :n]), atol=2e-2, rtol=2e-2)
    t_plain, _ = _decode(plain, ids[:, :8], 8)
    t_fast, _ = _decode(fast, ids[:, :8], 8)
    assert torch.equal(t_plain, t_fast)


def test_packed_linear_with_bias_and_batches():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).bfloat16()
    packed = PackedLinear(lin) if PackedLinear.supported(torch.bfloat16) else lin
    for shape in ((1, 1, 64), (3, 7, 64), (100, 64)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        torch.testing.assert_close(packed(x), lin(x), atol=1e-2, rtol=1e-2)
