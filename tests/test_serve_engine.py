"""Engine behaviours the server relies on: prompt logprobs (SamplingParams.prompt_logprobs) equal to
transformers' log_softmax of the same random checkpoint, through chunked prefill, batching and
preemption; one request's failure ending that request alone; round-robin admission."""
import pytest
import torch
from util import TINY, make_hf_checkpoint

import qwen2
from qwen2.engine import runner
from qwen2.engine.core import Engine
from qwen2.engine.generate import generate
from qwen2.engine.paged import KVPool
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf, path = make_hf_checkpoint(tmp_path_factory.mktemp("plp"), TINY, seed=5, std=0.2)
    model = qwen2.load_model(path, dtype="float32")
    runner.prepare(model)   # the speed path every command runs
    return hf, model


def reference(hf, prompt):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)


def check(hf, prompt, lps, k):
    ref = reference(hf, prompt)
    assert len(lps) == len(prompt) and lps[0] is None
    for pos, lp in enumerate(lps[1:]):
        assert lp.token_id == prompt[pos + 1]
        assert lp.logprob == pytest.approx(ref[pos, prompt[pos + 1]].item(), abs=2e-5)
        top = ref[pos].topk(k)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=2e-5)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def test_prompt_logprobs_equal_transformers_chunked_and_batched(models):
    """Prompts longer than a step's token budget (chunked prefill), batched with plain generation,
    with and without tokens drawn afterwards; max_new_tokens=0 returns the logprobs alone."""
    hf, model = models
    ps = prompts([1, 7, 45, 130, 300])
    outs = {}
    eng = Engine(model, None, max_batch=8, max_batched_tokens=48)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=i % 3, temperature=0, prompt_logprobs=3),
                        lambda o, i=i: outs.setdefault(i, []).append(o))
    eng.add_request("plain", ps[2], SamplingParams(max_new_tokens=9, temperature=0), lambda o: None)
    eng.run_until_done()
    for i, p in enumerate(ps):
        got = [o.prompt_logprobs for o in outs[i] if o.prompt_logprobs is not None]
        assert len(got) == 1, "prompt logprobs come once, with the first output"
        check(hf, p, got[0], 3)
        assert outs[i][-1].finished and outs[i][-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outs[i]) == i % 3


def test_prompt_logprobs_survive_preemption(models):
    """A pool too small for everyone: scoring requests are preempted mid-prefill and recomputed;
    each prompt position is scored once and the values are still transformers'."""
    hf, model = models
    cfg = model.config
    decoding = prompts([20] * 5, seed=1)
    scoring = prompts([160, 200], seed=2)
    eng = Engine(model, None, max_batch=8, max_batched_tokens=8,
                 kv_cache_memory=KVPool.bytes_per_block(cfg, 16, model.dtype) * 36)
    preempted = []
    real = eng._preempt
    eng._preempt = lambda req: (preempted.append((req.id, len(req.row.prompt_logprobs or []))), real(req))
    outs = {}
    for i, p in enumerate(decoding):
        eng.add_request(f"d{i}", p, SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True),
                        lambda o: None)
    for i, p in enumerate(scoring):
        eng.add_request(f"s{i}", p, SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=1),
                        lambda o, i=i: outs.setdefault(i, []).append(o))
    eng.run_until_done()
    assert any(r.startswith("s") and 1 < n < len(scoring[0]) for r, n in preempted), preempted  # mid-prefill
    for i, p in enumerate(scoring):
        got = [o.prompt_logprobs for o in outs[i] if o.prompt_logprobs is not None]
        assert len(got) == 1
        check(hf, p, got[0], 1)


def test_offline_generate_returns_prompt_logprobs(models):
    hf, model = models
    ps = prompts([12, 30], seed=3)
    done = generate(model, ps, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    for p, c in zip(ps, done):
        assert c.token_ids == [] and c.finish_reason == "length"
        check(hf, p, c.prompt_logprobs, 0)


def test_zero_tokens_needs_prompt_logprobs():
    with pytest.raises(Qwen2Error):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(Qwen2Error):
        SamplingParams(prompt_logprobs=-1)


# --------------------------------------------------------------------------- fault isolation
class FailingDecoder:
    """A tokenizer whose stream decoder fails on one token id: the failure belongs to the
    requests that draw that token, no one else."""

    def __init__(self, bad: int):
        self.bad = bad

    def stream_decoder(self, skip_special_tokens=True):
        bad = self.bad

        class D:
            def feed(self, tok):
                if tok == bad:
                    raise RuntimeError("injected detokenizer failure")
                return f"<{tok}>"

            def flush(self):
                return ""
        return D()


def test_one_request_failing_leaves_the_others_exact(models):
    """Failures in detokenizing, in sampling and in the forward itself (an id past the
    embedding) each end only their own request; the rest equal their run alone."""
    hf, model = models
    ps = prompts([9, 14, 21, 30, 5, 11, 17, 26], seed=7)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    want = generate(model, ps, params)
    bad_tok = want[0].token_ids[3]           # prompt 0's fourth token fails to detokenize
    outs = {}
    eng = Engine(model, FailingDecoder(bad_tok), max_batch=16, max_batched_tokens=64)
    sink = lambda i: lambda o: outs.setdefault(i, []).append(o)   # noqa: E731
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, params, sink(i))
    for _ in range(3):
        eng.step()
    # joining mid-run: an id past the embedding (the forward raises), and a generator on a device
    # that does not exist (sampling raises)
    eng.add_request("bad-id", [1, 2, model.config.vocab_size + 5], params, sink("bad-id"))
    sampled = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, ignore_eos=True)
    req = eng.add_request("bad-sampling", ps[1], sampled, sink("bad-sampling"))
    req.generator = object()
    eng.run_until_done()
    for i, w in enumerate(want):
        got = [t for o in outs[i] for t in o.token_ids]
        if i == 0 or bad_tok in w.token_ids:
            assert outs[i][-1].finish_reason == "error" and "detokenizing" in outs[i][-1].error
            assert got == w.token_ids[:w.token_ids.index(bad_tok)]
        else:
            assert got == w.token_ids and outs[i][-1].finish_reason == "length"
    for name, stage in (("bad-id", "running the model"), ("bad-sampling", "sampling")):
        assert [o.finish_reason for o in outs[name]] == ["error"] and stage in outs[name][0].error
    assert eng.stats.finished["error"] == 2 + sum(bad_tok in w.token_ids for w in want)
    assert eng.pool.allocator.num_free == eng.pool.num_blocks


def test_admission_is_round_robin_over_groups(models):
    """A group of 40 requests queued first cannot starve a later single request: it is admitted
    at the next free slot (FIFO admission would put it behind all 40), as is a third arriving with
    it, before the big group's next turn; every group's requests keep their order."""
    hf, model = models
    ps = prompts([6] * 42, seed=9)
    eng = Engine(model, None, max_batch=2, max_batched_tokens=64)
    admitted = []
    params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    for i in range(40):
        eng.add_request(f"big{i}", ps[i], params, lambda o: None, group="big")
    eng.step()
    eng.add_request("small", ps[40], params, lambda o: None)
    eng.add_request("later", ps[41], params, lambda o: None)
    while eng.has_work():
        before = {r.id for r in eng.running}
        eng.step()
        admitted += [r.id for r in eng.running if r.id not in before]
    order = ["big0", "big1"] + admitted
    assert order[3:6] == ["small", "later", "big3"], order[:8]
    assert [r for r in order if r.startswith("big")] == [f"big{i}" for i in range(40)]
