"""Dual Chunk Attention against a straightforward implementation of its definition, its cache /
chunked-prefill consistency, equality with plain attention within one chunk; chunked prefill and
KV-cache sizing."""
import math

import pytest
import torch

from qwen2 import KVCache, load_model, preset
from qwen2.model.longctx import (DualChunkAttention, apply_config, dual_chunk_attention, enable_dual_chunk_attention,
                           kv_cache_bytes, prefill)
from qwen2.model.rope import rotate_half


def _rope(x, pos, inv_freq):
    ang = pos * inv_freq.double()
    cos, sin = torch.cat((ang, ang)).cos(), torch.cat((ang, ang)).sin()
    return x * cos + rotate_half(x) * sin


def reference_dca(attn, x, chunk_size, local_size, original_max=0):
    """DCA by definition, one pair at a time (float64): query i, key j <= i; chunk_len =
    chunk_size - local_size; the key sits at j % chunk_len; the query sits at i % chunk_len (same
    chunk), min(i % chunk_len + chunk_len, chunk_size) (previous chunk) or min(2 chunk_len - 1,
    chunk_size) (earlier chunks); one softmax over all keys."""
    T = x.shape[1]
    cl = chunk_size - local_size
    nh, nkv, d = attn.n_heads, attn.n_kv, attn.head_dim
    q, k, v = attn.qkv_proj(x)[0].double().split([nh * d, nkv * d, nkv * d], dim=-1)
    q, k, v = q.reshape(T, nh, d), k.reshape(T, nkv, d), v.reshape(T, nkv, d)
    inv = attn.dca_inv_freq
    scale2 = max(1.0, 0.1 * math.log(T / original_max) + 1) ** 2 if original_max else 1.0
    out = torch.zeros(T, nh, d, dtype=torch.float64)
    for h in range(nh):
        g = h // (nh // nkv)
        for i in range(T):
            scores = []
            for j in range(i + 1):
                ci, cj = i // cl, j // cl
                qp = i % cl if ci == cj else (min(i % cl + cl, chunk_size) if cj == ci - 1 else min(2 * cl - 1, chunk_size))
                scores.append(_rope(q[i, h], qp, inv) @ _rope(k[j, g], j % cl, inv) / math.sqrt(d) * scale2)
            p = torch.stack(scores).softmax(0)
            out[i, h] = p @ v[: i + 1, g]
    return attn.o_proj(out.reshape(1, T, nh * d).float())


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return tiny_ckpt[1]


@pytest.mark.parametrize("chunk_size,local_size,original_max", [(12, 4, 0), (10, 0, 0), (9, 3, 8), (10, 6, 0)])
def test_dca_matches_reference_definition(tiny, chunk_size, local_size, original_max):
    model = enable_dual_chunk_attention(load_model(tiny, dtype="float32"), chunk_size, local_size, original_max)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, DualChunkAttention)
    torch.manual_seed(0)
    T = 33  # four chunks of 8 (or 10, 6): intra, successive and inter all occur
    x = torch.randn(1, T, model.config.hidden_size)
    pos = torch.arange(T)[None]
    cos = sin = None  # DCA rotates by itself
    with torch.no_grad():
        ours = attn(x, cos, sin, None, None, True, pos, pos)
        ref = reference_dca(attn, x, chunk_size, local_size, original_max)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_dca_whole_forward_equals_cached_path(tiny):
    model = enable_dual_chunk_attention(load_model(tiny, dtype="float32"), chunk_size=16, local_size=4)
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 50))
    full = model(ids)
    cache = model.new_cache(2, 64)
    torch.testing.assert_close(model(ids[:, :44], cache=cache), full[:, :44], rtol=1e-4, atol=1e-4)
    for n in range(44, 50):
        step = model(ids[:, n:n + 1], cache=cache)[:, 0]
        torch.testing.assert_close(step, full[:, n], rtol=1e-4, atol=1e-4)

    # Left padding: a padded row equals the same prompt alone.
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :13] = 0
    padded = model(ids, attention_mask=mask)
    torch.testing.assert_close(padded[1, 13:], model(ids[1:, 13:])[0], rtol=1e-4, atol=1e-4)


def test_dca_chunked_prefill_equals_whole_prefill(tiny):
    model = enable_dual_chunk_attention(load_model(tiny, dtype="float32"), chunk_size=16, local_size=4)
    ids = torch.randint(0, 512, (1, 60))
    last = prefill(model, ids, model.new_cache(1, 64), chunk_size=9)
    torch.testing.assert_close(last[:, -1], model(ids)[:, -1], rtol=1e-4, atol=1e-4)


def test_dca_equals_plain_attention_within_one_chunk(tiny_ckpt):
    hf, path = tiny_ckpt
    plain = load_model(path, dtype="float32")
    dca = enable_dual_chunk_attention(load_model(path, dtype="float32"), chunk_size=40, local_size=8)
    ids = torch.randint(0, 512, (2, 32))  # chunk_len 32: everything is intra-chunk
    torch.testing.assert_close(dca(ids), plain(ids), rtol=1e-5, atol=1e-5)
    longer = torch.randint(0, 512, (1, 48))  # past one chunk the re-mapped positions differ
    assert (dca(longer)[:, 40:] - plain(longer)[:, 40:]).abs().max() > 1e-3


def test_dca_from_config(tiny):
    model = load_model(tiny, dtype="float32")
    model.config.dual_chunk_attention_config = {"chunk_size": 24, "local_size": 8}
    apply_config(model)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn, DualChunkAttention) and (attn.chunk_size, attn.local_size, attn.chunk_len) == (24, 8, 16)


def test_dca_blocking_bounds_memory_without_changing_results():
    torch.manual_seed(2)
    b, h, kv, t, d = 1, 4, 2, 70, 16
    qs = [torch.randn(b, h, t, d) for _ in range(3)]
    k, v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    pos = torch.arange(t)[None]
    whole = dual_chunk_attention(*qs, k, v, pos, pos, chunk_len=16)
    blocked = dual_chunk_attention(*qs, k, v, pos, pos, chunk_len=16, budget_bytes=4 * 4 * h * t * 5)  # 5 rows
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)


def test_chunked_prefill_equals_whole_forward(tiny_ckpt):
    hf, path = tiny_ckpt
    model = load_model(path, dtype="float32")
    ids = torch.randint(0, 512, (2, 100))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    last = prefill(model, ids, model.new_cache(2, 128), attention_mask=mask, chunk_size=16)
    torch.testing.assert_close(last[:, -1], model(ids, attention_mask=mask)[:, -1], rtol=1e-4, atol=1e-4)


def test_kv_cache_bytes_qwen2_0_5b_32k():
    cfg = preset("Qwen2-0.5B")
    n = kv_cache_bytes(cfg, 32768, torch.bfloat16)
    assert n == 24 * 2 * 2 * 64 * 32768 * 2 == 384 * 2 ** 20  # 384 MiB in bfloat16
    # the static cache holds one spare slot (see KVCache)
    assert KVCache(cfg, 1, 32768, torch.bfloat16, device="meta").nbytes() == kv_cache_bytes(cfg, 32769, torch.bfloat16)
    assert kv_cache_bytes(cfg, 32768, torch.float32) == 768 * 2 ** 20


def test_attention_variant_is_a_declared_choice(tiny):
    """The layer attention comes from the config (decoder.ATTENTION); switching a built model's
    config rebuilds the attention modules around the same projections."""
    from qwen2.model.attention import Attention, sdpa_attention
    from qwen2.model.decoder import ATTENTION
    from qwen2.model.longctx import LognAttention, enable_logn_attention
    assert set(ATTENTION) == {"sdpa", "logn", "dual_chunk"}
    model = load_model(tiny, dtype="float32")
    assert model.config.attention == "sdpa"
    assert all(type(l.self_attn) is Attention and l.self_attn.attn_fn is sdpa_attention for l in model.model.layers)
    qkv = model.model.layers[0].self_attn.qkv_proj
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids)
        enable_logn_attention(model, seq_length=8)
        out = model(ids)
    attn = model.model.layers[0].self_attn
    assert model.config.attention == "logn" and model.qwen1["use_logn_attn"]
    # plain Attention with another kernel: what the serving engine's packed steps can run
    assert type(attn) is Attention and isinstance(attn.attn_fn, LognAttention) and attn.qkv_proj is qkv
    torch.testing.assert_close(out[:, :8], plain[:, :8], atol=1e-6, rtol=1e-6)  # 1-based positions <= 8
    assert (out[:, 8:] - plain[:, 8:]).abs().max() > 1e-3


def test_dca_generates_through_the_engine(tiny):
    """A dual-chunk-attention model on the one engine (one sequence per step, chunked prefill):
    every greedy token equals a plain static-cache loop over the model's own forward, across
    chunk boundaries; several prompts run one after another."""
    from qwen2.engine.generate import generate
    from qwen2.engine.sampling import SamplingParams
    model = enable_dual_chunk_attention(load_model(tiny, dtype="float32"), chunk_size=16, local_size=4)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (37, 5)]

    def reference(ids, n):
        cache = model.new_cache(1, len(ids) + n)
        out, nxt = [], prefill(model, torch.tensor([ids]), cache, chunk_size=7)[:, -1].argmax(-1)
        for _ in range(n):
            out.append(int(nxt))
            nxt = model(nxt[:, None], cache=cache, logits_to_keep=1)[:, -1].argmax(-1)
        return out

    got = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in got] == [reference(p, 20) for p in prompts]
