"""Same weights in, same logits out: our model against transformers on random-weight checkpoints
saved by transformers itself, at the real dims of the released sizes (fewer layers)."""
from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2.model.config import PRESETS
from util import TINY, hf_model, make_hf_checkpoint


def dims(name, **kw):
    d = {k: v for k, v in PRESETS[name].items() if k not in ("model_type", "torch_dtype")}
    d.update(kw)
    return d


CONFIGS = {
    "0.5B": dims("Qwen2-0.5B", num_hidden_layers=2, max_window_layers=2),
    "1.5B": dims("Qwen2-1.5B", num_hidden_layers=2, max_window_layers=2),
    "moe-top4-norm": dict(TINY, hidden_size=128, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                          moe_intermediate_size=64, shared_expert_intermediate_size=192, num_hidden_layers=3,
                          decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False),
    "moe-sparse-step2": dict(TINY, hidden_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                             moe_intermediate_size=64, shared_expert_intermediate_size=96, num_hidden_layers=2,
                             decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=False),
    "sliding": dict(TINY, num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1),
}
# Big dims: one layer each, reduced vocab (memory); still run in CI.
BIG = {
    "7B": dims("Qwen2-7B", num_hidden_layers=1, vocab_size=4096, max_window_layers=1),
    "72B": dims("Qwen2-72B", num_hidden_layers=1, vocab_size=2048, max_window_layers=1),
    "57B-A14B": dims("Qwen2-57B-A14B", num_hidden_layers=1, vocab_size=4096, num_experts=12,
                     max_window_layers=1),
}


def _ids(vocab, b, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


def check_fp32_parity(tmp_path, config, seq=24, std=0.05):
    ref, path = make_hf_checkpoint(tmp_path / "ck", config, std=std)
    ours = qwen2.load_model(path, dtype="float32")
    ids = _ids(config["vocab_size"], 2, seq)
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.std().item(), f"max abs diff {err} vs logits std {want.std().item()}"
    return ref, ours, path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_match_transformers(tmp_path, name):
    check_fp32_parity(tmp_path, CONFIGS[name], seq=24 if name != "sliding" else 20)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BIG))
def test_fp32_logits_match_transformers_big_dims(tmp_path, name):
    check_fp32_parity(tmp_path, BIG[name], seq=8, std=0.02)


def test_sliding_window_changes_the_result(tmp_path):
    """The window really is applied: the same weights with the window off give other logits."""
    cfg = CONFIGS["sliding"]
    _, ours, path = check_fp32_parity(tmp_path, cfg, seq=20)
    full = dict(cfg, use_sliding_window=False)
    _, path2 = make_hf_checkpoint(tmp_path / "full", full)
    ids = _ids(cfg["vocab_size"], 1, 20)
    with torch.no_grad():
        assert not torch.allclose(ours(ids), qwen2.load_model(path2, dtype="float32")(ids), atol=1e-3)


def test_bf16_error_no_worse_than_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = CONFIGS["0.5B"]
    ref32, path = make_hf_checkpoint(tmp_path / "ck", cfg, std=0.05)
    ref16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours16 = qwen2.load_model(path, dtype="bfloat16")
    assert ours16.dtype == torch.bfloat16
    ids = _ids(cfg["vocab_size"], 4, 32, seed=3)
    with torch.no_grad():
        want = ref32(ids).logits.float()
        theirs = ref16(ids).logits.float()
        got = ours16(ids)
    our_err = (got - want).abs().mean().item()
    their_err = (theirs - want).abs().mean().item()
    assert our_err <= 1.5 * their_err, (our_err, their_err)
    assert (got - want).abs().max().item() <= 1.5 * (theirs - want).abs().max().item()
    top = want.argmax(-1)
    ours_agree = (got.argmax(-1) == top).float().mean().item()
    theirs_agree = (theirs.argmax(-1) == top).float().mean().item()
    assert ours_agree >= theirs_agree - 1e-9, (ours_agree, theirs_agree)


@pytest.mark.parametrize("name", ["0.5B", "moe-top4-norm", "sliding"])
def test_cached_decode_equals_full_forward(tmp_path, name):
    cfg = dict(CONFIGS[name])
    if name == "0.5B":
        cfg["vocab_size"] = 2048  # decode steps dominate; the vocab does not matter here
    _, path = make_hf_checkpoint(tmp_path / "ck", cfg)
    model = qwen2.load_model(path, dtype="float32")
    ids = _ids(cfg["vocab_size"], 2, 18)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :10], cache=cache)]
        steps.append(model(ids[:, 10:13], cache=cache))  # a multi-token chunk after a prefill
        for i in range(13, 18):
            steps.append(model(ids[:, i:i + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    assert torch.allclose(inc, full, atol=1e-4 * full.std().item() * 10, rtol=0)


@pytest.mark.parametrize("name", ["0.5B", "moe-sparse-step2", "sliding"])
def test_left_padded_batch_equals_single_runs(tmp_path, name):
    cfg = dict(CONFIGS[name])
    if name == "0.5B":
        cfg["vocab_size"] = 2048
    _, path = make_hf_checkpoint(tmp_path / "ck", cfg)
    model = qwen2.load_model(path, dtype="float32")
    lens = [11, 4, 8]
    seqs = [_ids(cfg["vocab_size"], 1, n, seed=10 + n)[0] for n in lens]
    t = max(lens)
    ids = torch.zeros(len(lens), t, dtype=torch.long)
    mask = torch.zeros(len(lens), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    extra = _ids(cfg["vocab_size"], len(lens), 4, seed=99)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        cache = model.new_cache(len(lens), t + 4)
        model(ids, attention_mask=mask, cache=cache)
        dec = [model(extra[:, j:j + 1], cache=cache) for j in range(4)]
        for i, s in enumerate(seqs):
            single = model(s[None])
            torch.testing.assert_close(batched[i, t - len(s):], single[0], atol=1e-4, rtol=1e-4)
            full = model(torch.cat([s, extra[i]])[None])
            for j in range(4):
                torch.testing.assert_close(dec[j][i, 0], full[0, len(s) + j], atol=1e-4, rtol=1e-4)


def test_batch_matches_transformers_with_padding(tmp_path):
    """transformers' own left-padded batch gives the same logits on the real tokens."""
    ref, path = make_hf_checkpoint(tmp_path / "ck", TINY)
    model = qwen2.load_model(path, dtype="float32")
    ids = _ids(TINY["vocab_size"], 2, 9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,shard", [("float32", None), ("bfloat16", 300_000)])
def test_saved_checkpoint_loads_in_transformers(tmp_path, dtype, shard):
    from transformers import AutoModelForCausalLM
    cfg = CONFIGS["moe-top4-norm"] if shard else TINY
    _, path = make_hf_checkpoint(tmp_path / "ck", cfg)
    ours = qwen2.load_model(path, dtype=dtype)
    kw = {"max_shard_bytes": shard} if shard else {}
    out = qwen2.save_model(ours, tmp_path / "saved", **kw)
    if shard:
        assert (out / "model.safetensors.index.json").exists()
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=ours.dtype).eval()
    again = qwen2.load_model(out, dtype=dtype)
    ids = _ids(cfg["vocab_size"], 2, 12)
    with torch.no_grad():
        a, b, c = ours(ids), theirs(ids).logits.float(), again(ids)
    assert torch.equal(a, c)
    tol = 1e-5 if dtype == "float32" else 0.05 * a.std().item()
    assert (a - b).abs().max().item() <= tol


def test_logits_to_keep_and_float_output(tiny_ckpt):
    _, path = tiny_ckpt
    model = qwen2.load_model(path, dtype="bfloat16")
    ids = _ids(TINY["vocab_size"], 1, 7)
    with torch.no_grad():
        full, last = model(ids), model(ids, logits_to_keep=1)
    assert full.dtype == torch.float32 and last.shape == (1, 1, TINY["vocab_size"])
    torch.testing.assert_close(last[0, 0], full[0, -1])
    assert not model.training and all(p.requires_grad for p in model.parameters())  # eval mode, trainable


def test_tied_embeddings_share_storage(tiny_ckpt):
    _, path = tiny_ckpt
    model = qwen2.load_model(path, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_head_is_loaded(tmp_path):
    cfg = dict(TINY, tie_word_embeddings=False)
    ref, path = make_hf_checkpoint(tmp_path / "ck", cfg)
    model = qwen2.load_model(path, dtype="float32")
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_random_init_model_from_preset_runs():
    cfg = qwen2.preset("Qwen2-0.5B", num_hidden_layers=1, vocab_size=1000)
    model = qwen2.Qwen2(cfg)
    emb = model.model.embed_tokens.weight  # nn.Embedding's own init, N(0, 1)
    assert torch.isfinite(emb).all() and 0.9 < float(emb.std()) < 1.1
    ids = _ids(1000, 1, 5)
    with torch.no_grad():
        assert model(ids).shape == (1, 5, 1000)
    assert hf_model  # util import used by other tests
